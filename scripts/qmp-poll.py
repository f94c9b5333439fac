#!/usr/bin/env python3
"""Polls a daemon's QMP monitor as a management tool would while scripts/bench.sh measures it
(`--qmp-poll`): `query-blockstats`, then `query-blockstats` with `query-nodes`, every
INTERVAL seconds until SIGTERM or SIGINT. Prints one summary line at the end: polls made,
errors, and the slowest reply.

Usage: qmp-poll.py SOCKET [INTERVAL]   (default 0.1 s; needs the Python package qemu.qmp)
"""
import asyncio
import signal
import sys
import time

from qemu.qmp import ExecuteError, QMPClient


async def poll(path, interval):
    qmp = QMPClient("bench-poll")
    deadline = time.monotonic() + 10
    while True:
        try:
            await qmp.connect(path)
            break
        except (OSError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    polls = errors = 0
    slowest = 0.0
    while not stop.is_set():
        start = time.monotonic()
        for args in (None, {"query-nodes": True}):
            try:
                await qmp.execute("query-blockstats", args)
            except ExecuteError as e:
                errors += 1
                if errors == 1:
                    print(f"qmp-poll: {e}", file=sys.stderr)
        polls += 1
        took = time.monotonic() - start
        slowest = max(slowest, took)
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, interval - took))
        except asyncio.TimeoutError:
            pass
    await qmp.disconnect()
    print(f"qmp-poll: {polls} polls, {errors} errors, slowest {slowest * 1000:.1f} ms")
    return errors == 0


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    interval = float(sys.argv[2]) if len(sys.argv) == 3 else 0.1
    sys.exit(0 if asyncio.run(poll(sys.argv[1], interval)) else 1)


main()
