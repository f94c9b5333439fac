#!/usr/bin/env python3
"""Sends one QMP command to a monitor socket and prints its reply (QEMU's qemu.qmp client).

    qmp-command.py SOCKET COMMAND [JSON-ARGUMENTS]

Exits 1 with the error when the command fails.
"""
import asyncio
import json
import sys

from qemu.qmp import QMPClient, ExecuteError


async def main(socket: str, command: str, arguments: dict) -> int:
    client = QMPClient("guest-test")
    await client.connect(socket)
    try:
        reply = await client.execute(command, arguments)
    except ExecuteError as e:
        print(f"{command}: {e.error.error.class_}: {e.error.error.desc}", file=sys.stderr)
        return 1
    finally:
        await client.disconnect()
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    args = json.loads(sys.argv[3]) if len(sys.argv) == 4 else {}
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], args)))
