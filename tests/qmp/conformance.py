#!/usr/bin/env python3
"""QMP conformance: the same checks against strata and qemu-storage-daemon (QSD).

Usage: conformance.py strata|qsd BINARY

Starts the daemon with two monitors in a temporary directory, drives it with QEMU's own
client library (qemu.qmp) and with a raw socket for the protocol-level cases, and checks
replies, error classes and texts, and events. Checks marked strata-only are skipped for QSD
(each says why). Prints "N passed, 0 failed" and exits 0 when every check holds.
"""
import asyncio
import json
import os
import socket
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient

from harness import (DAEMON, BINARY, STRATA, check, check_exit, check_no_sandbox_refusals,
                     expect_error, monitor_args, passed, raw_disk_args, running, scratch_disk)


class Raw:
    """A client on a plain socket, for what qemu.qmp never sends."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(120)  # QSD takes seconds over a huge message
        self.sock.connect(path)
        self.buf = b""

    def recv(self):
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the daemon closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, raw):
        self.sock.sendall(raw if isinstance(raw, bytes) else raw.encode())

    def ask(self, raw):
        self.send(raw)
        return self.recv()

    def close(self):
        self.sock.close()


def error_of(reply):
    check("error" in reply, f"expected an error, got {reply}")
    return reply["error"]["class"], reply["error"]["desc"]


def protocol_checks(path):
    raw = Raw(path)
    greeting = raw.recv()
    version = greeting["QMP"]["version"]
    check(all(isinstance(version["qemu"][k], int) for k in ("major", "minor", "micro")),
          f"greeting version {version}")
    check(isinstance(version["package"], str), "greeting package")
    check(isinstance(greeting["QMP"]["capabilities"], list), "greeting capabilities")
    # Before negotiation every command is refused.
    check(error_of(raw.ask('{"execute": "query-version"}\n')) ==
          ("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"),
          "command before negotiation")
    reply = raw.ask('{"execute": "qmp_capabilities", "id": {"n": [1]}}\n')
    check(reply == {"return": {}, "id": {"n": [1]}}, f"negotiation reply {reply}")
    check(error_of(raw.ask('{"execute": "qmp_capabilities"}\n')) ==
          ("CommandNotFound", "Capabilities negotiation is already complete, command ignored"),
          "second negotiation")
    reply = raw.ask('{"execute": "query-version", "id": "v"}\n')
    check(reply["id"] == "v" and reply["return"] == version, f"query-version {reply}")
    # Malformed input: an error for each message, and the connection goes on.
    raw.send('{"execute": ')
    cls, desc = error_of(raw.ask('}\n'))
    check(cls == "GenericError" and desc.startswith("JSON parse error"), f"parse error {desc}")
    for text, desc in [
        ("[1, 2]", "QMP input must be a JSON object"),
        ('{"foo": 1}', "QMP input member 'foo' is unexpected"),
        ('{"execute": 1}', "QMP input member 'execute' must be a string"),
        ('{"execute": "query-version", "arguments": [1]}',
         "QMP input member 'arguments' must be an object"),
        ('{"execute": "query-version", "arguments": {"a": 1}}', "Parameter 'a' is unexpected"),
        ('{"execute": "no-such-command"}', "The command no-such-command has not been found"),
    ]:
        cls, got = error_of(raw.ask(text + "\n"))
        want = "CommandNotFound" if "has not been found" in desc else "GenericError"
        check((cls, got) == (want, desc), f"{text}: {cls} {got!r}")
    # A message over strata's 1 MiB bound: refused as a whole (strata drops what it would
    # buffer; QSD parses it and refuses the argument), then the next command is answered.
    huge = '{"execute": "query-version", "arguments": {"pad": "' + "a" * (1 << 20) + '"}}\n'
    cls, desc = error_of(raw.ask(huge))
    check(cls == "GenericError", "huge message")
    if STRATA:
        check("exceeds" in desc, f"strata-only: the bound is named: {desc}")
    check("return" in raw.ask('{"execute": "query-version"}\n'), "served after a huge message")
    # A client that leaves mid-message, and one that leaves before reading its reply.
    raw.send('{"execute": "query-named-block-nodes", "argu')
    raw.close()
    raw = Raw(path)
    raw.recv()
    raw.ask('{"execute": "qmp_capabilities"}\n')
    raw.send('{"execute": "query-named-block-nodes"}\n')
    raw.close()
    raw = Raw(path)
    check("QMP" in raw.recv(), "greeting after clients that left")
    raw.close()


async def session_checks(dirpath, mon0, mon1):
    qmp = QMPClient("conformance")
    await qmp.connect(mon0)
    other = QMPClient("other-monitor")
    await other.connect(mon1)
    names = {c["name"] for c in await qmp.execute("query-commands")}
    for cmd in ["qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
                "blockdev-add", "blockdev-del", "query-named-block-nodes", "block_resize",
                "block-export-add", "block-export-del", "query-block-exports"]:
        check(cmd in names, f"query-commands lists {cmd}")
    schema = await qmp.execute("query-qmp-schema")
    check(any(e.get("meta-type") == "command" for e in schema), "schema lists commands")
    await expect_error(qmp, "no-such-command", None,
                       "The command no-such-command has not been found", cls="CommandNotFound")
    # Argument validation names the member.
    await expect_error(qmp, "block_resize", {"node-name": "d0"},
                       "Parameter 'size' is missing")
    await expect_error(qmp, "block_resize", {"node-name": "d0", "size": "x"},
                       "Invalid parameter type for 'size', expected: integer")
    await expect_error(qmp, "block_resize", {"node-name": "zz", "size": 1 << 20},
                       "Cannot find device='' nor node-name='zz'")
    await expect_error(qmp, "query-block-exports", {"x": 1},
                       "Parameter 'x' is unexpected")

    image = os.path.join(dirpath, "new.img")
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    await expect_error(qmp, "blockdev-add", {"driver": "file", "node-name": "f1",
                                             "filename": image, "read-only": "yes"},
                       "Invalid parameter type for 'read-only', expected: boolean")
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "f1", "filename": image})
    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "d1", "file": "f1"})
    await expect_error(qmp, "blockdev-add", {"driver": "raw", "node-name": "d1", "file": "f1"})
    nodes = {n["node-name"]: n for n in
             await qmp.execute("query-named-block-nodes", {"flat": True})}
    check({"d0", "f0", "d1", "f1"} <= set(nodes), f"nodes {sorted(nodes)}")
    check(nodes["d1"]["drv"] == "raw" and nodes["f1"]["drv"] == "file", "drivers")
    check(nodes["d1"]["image"]["virtual-size"] == 32 << 20, "virtual-size")
    check(nodes["f1"]["file"] == image and nodes["d1"]["ro"] is False, "file and ro")

    sock = os.path.join(dirpath, "e1.sock")
    export = {"type": "vhost-user-blk", "id": "e1", "node-name": "d1", "writable": True,
              "addr": {"type": "unix", "path": sock}, "num-queues": 2,
              "logical-block-size": 4096}
    desc = await expect_error(qmp, "block-export-add", dict(export, **{"num-queues": "2"}))
    check("'num-queues'" in desc, f"the bad member is named: {desc}")
    await qmp.execute("block-export-add", export)
    check(os.path.exists(sock), "the new export's socket exists")
    await expect_error(qmp, "block-export-add", export,
                       "Block export id 'e1' is already in use")
    exports = await qmp.execute("query-block-exports")
    check({"type": "vhost-user-blk", "id": "e1", "node-name": "d1", "shutting-down": False}
          in exports, f"query-block-exports {exports}")
    await expect_error(qmp, "blockdev-del", {"node-name": "d1"})
    await expect_error(qmp, "blockdev-del", {"node-name": "f1"})
    await expect_error(qmp, "blockdev-del", {"node-name": "zz"},
                       "Failed to find node with node-name='zz'")

    # block_resize on the format node grows the file and the node.
    await qmp.execute("block_resize", {"node-name": "d1", "size": 64 << 20})
    check(os.path.getsize(image) == 64 << 20, "the image file grew")
    nodes = {n["node-name"]: n for n in
             await qmp.execute("query-named-block-nodes", {"flat": True})}
    check(nodes["d1"]["image"]["virtual-size"] == 64 << 20, "virtual-size after resize")

    if STRATA:
        # strata-only: mode=safe refuses while a frontend is connected, as QAPI documents it
        # (QSD 7.2's vhost-user-blk export takes no reference for a connected frontend and is
        # deleted anyway).
        frontend = socket.socket(socket.AF_UNIX)
        frontend.connect(sock)
        await asyncio.sleep(0.3)  # the export accepts on its own thread
        deadline = time.monotonic() + 10
        while True:
            try:
                await qmp.execute("block-export-del", {"id": "e1"})
                raise AssertionError("safe mode removed an export with a frontend")
            except ExecuteError as e:
                if "still in use" in e.error.error.desc:
                    break
                raise
            finally:
                check(time.monotonic() < deadline, "the frontend was seen in time")
        frontend.close()

    await expect_error(qmp, "block-export-del", {"id": "zz"},
                       "Export 'zz' is not found")
    await expect_error(qmp, "block-export-del", {"id": "e1", "mode": "soft"})
    with qmp.listener("BLOCK_EXPORT_DELETED") as mine, \
            other.listener("BLOCK_EXPORT_DELETED") as theirs:
        await qmp.execute("block-export-del", {"id": "e1", "mode": "hard"})
        for listener, who in [(mine, "this monitor"), (theirs, "the other monitor")]:
            event = await asyncio.wait_for(listener.get(), 10)
            check(event["data"] == {"id": "e1"}, f"event on {who}: {event}")
            ts = event["timestamp"]
            check(ts["seconds"] > 0 and 0 <= ts["microseconds"] < 1000000, "event timestamp")
    deadline = time.monotonic() + 10
    while any(e["id"] == "e1" for e in await qmp.execute("query-block-exports")):
        check(time.monotonic() < deadline, "export e1 went away")
        await asyncio.sleep(0.1)
    await qmp.execute("blockdev-del", {"node-name": "d1"})
    await qmp.execute("blockdev-del", {"node-name": "f1"})
    names = {n["node-name"] for n in await qmp.execute("query-named-block-nodes")}
    check(not names & {"d1", "f1"}, f"deleted nodes are gone: {names}")

    if STRATA:
        # strata-only: the sandbox confines QMP to --sandbox-allow-dir, and says so.
        with tempfile.TemporaryDirectory() as outside:
            image = os.path.join(outside, "x.img")
            with open(image, "wb") as f:
                f.truncate(1 << 20)
            desc = await expect_error(qmp, "blockdev-add", {"driver": "file", "node-name": "x",
                                                            "filename": image})
            check("sandbox" in desc and "--sandbox-allow-dir" in desc, f"sandbox named: {desc}")
    await qmp.disconnect()
    await other.disconnect()


def main():
    dirpath, image = scratch_disk("strata-qmp-")
    mon0, mon1 = os.path.join(dirpath, "m0.sock"), os.path.join(dirpath, "m1.sock")
    argv = [BINARY, *raw_disk_args(image),
            "--export", "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                        f"addr.path={os.path.join(dirpath, 'e0.sock')}",
            *monitor_args(mon0, mon1)]
    if STRATA:
        argv += ["--sandbox-allow-dir", dirpath]
    log = os.path.join(dirpath, "daemon.log")
    with running(argv, log, [mon0, mon1]) as daemon:
        protocol_checks(mon0)
        asyncio.run(session_checks(dirpath, mon0, mon1))
        check(daemon.poll() is None, "the daemon is still running")
    check_exit(daemon)
    if STRATA:
        check(not os.path.exists(mon0), "the monitor socket is removed at exit")
        check_no_sandbox_refusals(log)
    print(f"qmp conformance ({DAEMON}): {passed()} passed, 0 failed")


main()
