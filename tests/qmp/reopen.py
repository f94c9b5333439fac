#!/usr/bin/env python3
"""blockdev-reopen and x-blockdev-set-iothread against strata and qemu-storage-daemon (QSD).

Usage: reopen.py strata|qsd BINARY

Drives the daemon with QEMU's client library (qemu.qmp). The guest's side is a libblkio
client that the caller (tests/qmp.rs) runs: the script asks for an I/O by printing
"BLKIO write|read SOCKET OFFSET TAG" and reads the result ("ok", "ok TAG" for a read, or
"error TEXT") from its stdin. Checks:
- a node under a writable export cannot become read-only (QEMU's permission error), but a
  backing image below one (which it only reads) can be reopened;
- read-only and back (a file child opened inline following its parent), through exports and
  libblkio: writes through a read-only node are
  refused, and accepted (reaching the file) once it is read-write again, also for a file
  opened read-only at start (strata opens it again read-write);
- options other than the flags cannot change ("Cannot change the option 'x'"), an omitted
  flag goes back to its default, bad values and types are refused with QEMU's texts;
- atomicity: when a later entry is invalid, the earlier nodes keep their options;
- cache.direct on and off under I/O, cache.no-flush, discard, detect-zeroes as
  query-named-block-nodes shows them;
- x-blockdev-set-iothread where QSD accepts and refuses it;
- a host_device node on a loop device with 4096-byte sectors, given at start: cache.direct
  off and on again, with writes through each (sub-sector ones under O_DIRECT); under strata's
  sandbox the device is opened again with the new flags (skipped without root, except
  under CI);
- strata-only: under the sandbox, a file opened read-only outside --sandbox-allow-dir cannot
  become writable, and the error says why; an empty list changes nothing (QSD 7.2 aborts on
  it: an assertion in bdrv_reopen_multiple).
Prints "N passed, 0 failed" and exits 0 when every check holds.
"""
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient

from harness import (DAEMON, BINARY, STRATA, check, check_exit, check_no_sandbox_refusals,
                     expect_error, monitor_args, passed, running, unix_sockets)

BLOCK = 4096


def blkio(op, sock, offset, tag=0):
    """One request through the caller's libblkio client."""
    print(f"BLKIO {op} {sock} {offset} {tag}", flush=True)
    answer = sys.stdin.readline().strip()
    if not answer:
        raise AssertionError("the libblkio client did not answer")
    print(f"libblkio {op} at {offset} (tag {tag}) on {os.path.basename(sock)}: {answer}",
          file=sys.stderr)
    return answer


def pattern(tag):
    return bytes(((i % 251) ^ tag) & 0xFF for i in range(BLOCK))


def file_block(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(BLOCK)


async def node(qmp, name):
    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    return next(n for n in nodes if n["node-name"] == name)


async def flags(qmp, name):
    n = await node(qmp, name)
    return (n["ro"], n["cache"]["direct"], n["cache"]["no-flush"], n["detect_zeroes"])


class Exports:
    """Exports added and removed by id; each gets a socket of its own."""

    def __init__(self, qmp, dirpath):
        self.qmp, self.dirpath, self.count = qmp, dirpath, 0

    async def add(self, node_name, writable):
        self.count += 1
        eid = f"x{self.count}"
        sock = os.path.join(self.dirpath, f"{eid}.sock")
        await self.qmp.execute("block-export-add", {
            "type": "vhost-user-blk", "id": eid, "node-name": node_name,
            "writable": writable, "addr": {"type": "unix", "path": sock}})
        return eid, sock

    async def remove(self, eid):
        if not STRATA:
            await sessions_ended(os.path.join(self.dirpath, f"{eid}.sock"))
        await self.qmp.execute("block-export-del", {"id": eid, "mode": "hard"})
        # QSD removes the export when its last user lets go; wait until it is gone.
        for _ in range(100):
            ids = [e["id"] for e in await self.qmp.execute("query-block-exports")]
            if eid not in ids:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"export {eid} was not removed")


async def sessions_ended(sock):
    """Waits until the daemon has closed every connection it accepted on `sock` (the client
    has closed its end already).

    QSD 7.2 deadlocks when an export whose node is in an iothread is deleted while a
    client's session is still ending there: vhost_user_server_stop waits for the session in
    AIO_WAIT_WHILE, which releases the iothread's AioContext lock once, but
    blk_exp_request_shutdown took it too, so the iothread never gets it (3 of 240 runs here
    under load; one CI run hung on it). strata's exports are deleted without this wait."""
    for _ in range(200):
        if not any(state == "03" for _, state in unix_sockets(sock)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the daemon still holds a connection on {sock} after 10 s")


def opts(name, filename=None, **extra):
    o = {"driver": "file" if filename else "raw", "node-name": name}
    if filename:
        o["filename"] = filename
    o.update({k.replace("_", "-"): v for k, v in extra.items()})
    return o


def w(base, **extra):
    """`base` with `extra` options (underscores in names become dashes)."""
    o = dict(base)
    o.update({k.replace("_", "-"): v for k, v in extra.items()})
    return o


async def reopen(qmp, *entries):
    return await qmp.execute("blockdev-reopen", {"options": list(entries)})


async def checks(qmp, d):
    a, b, c = (os.path.join(d.allowed, n) for n in ("a.img", "b.img", "c.img"))
    f0, f1, f2 = opts("f0", a), opts("f1", b), opts("f2", c)
    d0 = opts("d0", file="f0")
    d2 = opts("d2", file="f2")
    exports = Exports(qmp, d.allowed)
    conflict = "Read-only block node '{}' cannot support read-write users"

    # A writable export holds write permission on its node and every node below it.
    await expect_error(qmp, "blockdev-reopen", {"options": [w(d0, read_only=True)]},
                       conflict.format("d0"))
    await expect_error(qmp, "blockdev-reopen", {"options": [w(f0, read_only=True)]},
                       conflict.format("f0"))
    check(blkio("write", d.e0, 0, 1) == "ok", "a write through e0 before any reopen")
    check(file_block(a, 0) == pattern(1), "the write reached a.img")

    # Read-only and back under the export's node, the export removed meanwhile.
    await exports.remove("e0")
    await reopen(qmp, w(d0, read_only=True), w(f0, read_only=True))
    check((await flags(qmp, "d0"))[0] and (await flags(qmp, "f0"))[0], "d0 and f0 read-only")
    await expect_error(qmp, "block-export-add", {
        "type": "vhost-user-blk", "id": "w", "node-name": "d0", "writable": True,
        "addr": {"type": "unix", "path": os.path.join(d.allowed, "w.sock")}})
    eid, sock = await exports.add("d0", False)
    check(blkio("write", sock, 0, 2).startswith("error"), "a write through a read-only node")
    check(blkio("read", sock, 0) == "ok 1", "reads go on")
    check(file_block(a, 0) == pattern(1), "a.img unchanged by the refused write")
    await exports.remove(eid)
    await reopen(qmp, w(d0), w(f0))
    check(not (await flags(qmp, "d0"))[0] and not (await flags(qmp, "f0"))[0],
          "read-only omitted: read-write again")
    eid, sock = await exports.add("d0", True)
    check(blkio("write", sock, BLOCK, 3) == "ok", "a write after the node is read-write again")
    check(file_block(a, BLOCK) == pattern(3), "the write reached a.img")
    await exports.remove(eid)

    # A file opened read-only at start becomes writable: strata opens it again read-write.
    eid, sock = await exports.add("d2", False)
    check(blkio("write", sock, 0, 4).startswith("error"), "c.img: refused while read-only")
    await exports.remove(eid)
    await reopen(qmp, w(f2, read_only=False), w(d2, read_only=False))
    eid, sock = await exports.add("d2", True)
    check(blkio("write", sock, 0, 5) == "ok", "c.img: a write once read-write")
    check(blkio("read", sock, 0) == "ok 5", "c.img: read back")
    check(file_block(c, 0) == pattern(5), "the write reached c.img")
    await expect_error(qmp, "blockdev-reopen", {"options": [w(f2, read_only=True)]},
                       conflict.format("f2"))
    await exports.remove(eid)

    # cache.direct on under a writable export's node (added after), then off again.
    d1 = opts("d1", file="f1")
    await qmp.execute("blockdev-add", d1)
    await reopen(qmp, w(f1, cache={"direct": True, "no-flush": True}, detect_zeroes="on"))
    check(await flags(qmp, "f1") == (False, True, True, "on"), "f1's new flags shown")
    eid, sock = await exports.add("d1", True)
    check(blkio("write", sock, 512, 6) == "ok", "a write at 512 with O_DIRECT")
    check(file_block(b, 512) == pattern(6), "it reached b.img")
    await exports.remove(eid)
    await reopen(qmp, w(f1, discard="unmap", detect_zeroes="unmap"))
    check(await flags(qmp, "f1") == (False, False, False, "unmap"),
          "omitted cache options back to their defaults")
    eid, sock = await exports.add("d1", True)
    check(blkio("write", sock, 1024, 7) == "ok", "a write at 1024 without O_DIRECT")
    check(blkio("read", sock, 512) != "ok 6", "the block at 512 was partly overwritten")
    await exports.remove(eid)
    check(file_block(b, 1024) == pattern(7), "it reached b.img")

    # A file child opened inline with its parent follows it (QEMU's reopen queue takes it).
    e = os.path.join(d.allowed, "e.img")
    d3 = {"driver": "raw", "node-name": "d3", "file": {"driver": "file", "filename": e}}
    await qmp.execute("blockdev-add", d3)
    await reopen(qmp, w(d3, read_only=True))
    inline = [n for n in await qmp.execute("query-named-block-nodes", {"flat": True})
              if n["drv"] == "file" and n["file"] == e]
    check(len(inline) == 1 and inline[0]["ro"], f"the inline file child is read-only: {inline}")
    await reopen(qmp, w(d3, read_only=False))
    eid, sock = await exports.add("d3", True)
    check(blkio("write", sock, 0, 10) == "ok", "d3: a write once read-write again")
    check(file_block(e, 0) == pattern(10), "it reached e.img")
    await exports.remove(eid)

    # A backing image is only read by a writable export above it: it may be reopened.
    base, ov = os.path.join(d.allowed, "base.img"), os.path.join(d.allowed, "ov.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, ov],
                   check=True)
    bf = opts("bf", base, read_only=True)
    await qmp.execute("blockdev-add", bf)
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": "bf",
                                       "file": {"driver": "file", "filename": ov}})
    eid, sock = await exports.add("ov", True)
    await reopen(qmp, w(bf, read_only=True, cache={"no-flush": True}))
    check((await flags(qmp, "bf"))[2], "the backing node reopened under a writable export")
    check(blkio("write", sock, 0, 11) == "ok", "the overlay still takes writes")
    await exports.remove(eid)

    # Only the flags change; QEMU's texts for the rest.
    cases = [
        (w(f1, filename=a), "Cannot change the option 'filename'"),
        (w(f1, locking="off"), "Cannot change the option 'locking'"),
        (w(f1, aio="io_uring"), "Cannot change the option 'aio'"),
        (w(f1, driver="host_device"), "Cannot change the option 'driver'"),
        ({"driver": "file", "filename": b}, "node-name not specified"),
        (opts("nosuch", b), "Failed to find node with node-name='nosuch'"),
        (w(f1, cache={"direct": "yes"}),
         "Invalid parameter type for 'options[0].cache.direct', expected: boolean"),
        (w(f1, read_only=1), "Invalid parameter type for 'options[0].read-only', expected: boolean"),
        (w(f1, discard="ignore", detect_zeroes="unmap"),
         "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"),
    ]
    for entry, desc in cases:
        await expect_error(qmp, "blockdev-reopen", {"options": [entry]}, desc)
    await expect_error(qmp, "blockdev-reopen", {}, "Parameter 'options' is missing")
    await expect_error(qmp, "blockdev-reopen", {"options": {}},
                       "Invalid parameter type for 'options', expected: array")

    # All or nothing: a bad second entry leaves the first node as it was.
    before = await flags(qmp, "f1")
    for second, desc in [(opts("nosuch", b), "Failed to find node with node-name='nosuch'"),
                         (w(f0, filename=b), "Cannot change the option 'filename'")]:
        await expect_error(qmp, "blockdev-reopen", {"options": [
            w(f1, read_only=True, cache={"no-flush": True}, detect_zeroes="on"), second]}, desc)
        check(await flags(qmp, "f1") == before, f"f1 unchanged after {desc!r}")
    eid, sock = await exports.add("d0", True)
    await expect_error(qmp, "blockdev-reopen", {"options": [
        w(f1, read_only=True), w(d0, read_only=True)]}, conflict.format("d0"))
    check(await flags(qmp, "f1") == before, "f1 unchanged after a permission conflict")

    # x-blockdev-set-iothread: where QSD accepts it (strata: nothing moves).
    refused = ("Node {} is associated with a BlockBackend and could be in use "
               "(use force=true to override this check)")
    sio = "x-blockdev-set-iothread"
    await expect_error(qmp, sio, {"node-name": "d0", "iothread": "io0"}, refused.format("d0"))
    await qmp.execute(sio, {"node-name": "d0", "iothread": "io0", "force": True})
    await qmp.execute(sio, {"node-name": "f0", "iothread": "io0"})
    await qmp.execute(sio, {"node-name": "f1", "iothread": None})
    await expect_error(qmp, sio, {"node-name": "f1", "iothread": "nosuch"},
                       "Cannot find iothread nosuch")
    await expect_error(qmp, sio, {"node-name": "nosuch", "iothread": "io0"},
                       "Failed to find node with node-name='nosuch'")
    await expect_error(qmp, sio, {"node-name": "f1"}, "Parameter 'iothread' is missing")
    check(blkio("write", sock, 0, 8) == "ok", "e0's node still serves after the iothread calls")
    check(file_block(a, 0) == pattern(8), "the write reached a.img")
    await exports.remove(eid)

    if d.loop:
        await host_device_checks(qmp, d, exports)

    if STRATA:
        # The sandbox lets the daemon write only files it opened writable, and those under
        # --sandbox-allow-dir: x.img, opened read-only outside them, stays read-only.
        await expect_error(qmp, "blockdev-reopen",
                           {"options": [opts("fx", os.path.join(d.other, "x.img"))]},
                           contains=["Permission denied", "--sandbox-allow-dir", "sandbox"])
        check((await flags(qmp, "fx"))[0], "fx still read-only")
        # All or nothing when a node fails to open again: f1, prepared first, stays as it was.
        before = await flags(qmp, "f1")
        await expect_error(qmp, "blockdev-reopen", {"options": [
            w(f1, read_only=True, cache={"no-flush": True}),
            opts("fx", os.path.join(d.other, "x.img"))]}, contains=["sandbox"])
        check(await flags(qmp, "f1") == before, "f1 unchanged after fx failed to reopen")
        eid, sock = await exports.add("d1", True)
        check(blkio("write", sock, 0, 9) == "ok", "f1 still writable")
        await exports.remove(eid)
        # An empty list changes nothing (QSD 7.2 aborts on it).
        check(await qmp.execute("blockdev-reopen", {"options": []}) == {}, "empty list")


async def host_device_checks(qmp, d, exports):
    """A host_device node on a 4k-sector loop device, given at start: opened again without
    O_DIRECT and with it, each time able to write (a 4 KiB write at 512 is a
    read-modify-write under O_DIRECT)."""
    hd = {"driver": "host_device", "node-name": "hd", "filename": d.loop}
    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "dh", "file": "hd"})
    eid, sock = await exports.add("dh", True)
    check(blkio("write", sock, 512, 11) == "ok", "hd: a write at 512 with O_DIRECT")
    await exports.remove(eid)
    await reopen(qmp, w(hd, cache={"direct": False}))
    check((await flags(qmp, "hd"))[1] is False, "hd: cache.direct off")
    eid, sock = await exports.add("dh", True)
    check(blkio("read", sock, 512) == "ok 11", "hd: the O_DIRECT write read back buffered")
    check(blkio("write", sock, 2 * BLOCK, 12) == "ok", "hd: a buffered write")
    await exports.remove(eid)
    await reopen(qmp, w(hd, cache={"direct": True}))
    check((await flags(qmp, "hd"))[1] is True, "hd: cache.direct on again")
    eid, sock = await exports.add("dh", True)
    check(blkio("read", sock, 2 * BLOCK) == "ok 12", "hd: the buffered write read with O_DIRECT")
    check(blkio("write", sock, 512, 13) == "ok", "hd: a write at 512 with O_DIRECT again")
    check(blkio("read", sock, 512) == "ok 13", "hd: read back")
    await exports.remove(eid)


class Dirs:
    def __init__(self):
        self.allowed = tempfile.mkdtemp(prefix="strata-reopen-")
        self.other = tempfile.mkdtemp(prefix="strata-reopen-other-")
        for path in ("a.img", "b.img", "c.img", "e.img", "base.img"):
            with open(os.path.join(self.allowed, path), "wb") as f:
                f.truncate(16 << 20)
        with open(os.path.join(self.other, "x.img"), "wb") as f:
            f.truncate(16 << 20)
        self.e0 = os.path.join(self.allowed, "e0.sock")
        self.mon = os.path.join(self.allowed, "m0.sock")
        # A block device for host_device: losetup needs root, which CI has; elsewhere the
        # host_device checks are skipped without it.
        self.loop = None
        if os.geteuid() != 0:
            if os.environ.get("CI") == "true":
                raise AssertionError("the host_device checks need root (losetup) under CI")
            print("host_device checks SKIPPED: losetup needs root", file=sys.stderr)
            return
        hd = os.path.join(self.allowed, "hd.img")
        with open(hd, "wb") as f:
            f.truncate(16 << 20)
        # Another test attaching a device at the same moment may take the free one first;
        # losetup then fails, and another try finds the next.
        for _ in range(10):
            attach = subprocess.run(["losetup", "--sector-size", "4096", "-f", "--show", hd],
                                    capture_output=True, text=True, timeout=60)
            if attach.returncode == 0:
                self.loop = attach.stdout.strip()
                return
            time.sleep(0.05)
        raise AssertionError(f"losetup -f --show {hd} failed: {attach.stderr}")

    def detach(self):
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False, timeout=60)


def main():
    d = Dirs()
    al = d.allowed
    argv = [BINARY, "--object", "iothread,id=io0",
            "--blockdev", f"driver=file,node-name=f0,filename={al}/a.img",
            "--blockdev", "driver=raw,node-name=d0,file=f0",
            "--blockdev", f"driver=file,node-name=f1,filename={al}/b.img",
            "--blockdev", f"driver=file,node-name=f2,filename={al}/c.img,read-only=on",
            "--blockdev", "driver=raw,node-name=d2,file=f2,read-only=on",
            "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                        f"addr.path={d.e0},writable=on",
            *monitor_args(d.mon)]
    if d.loop:
        argv += ["--blockdev",
                 f"driver=host_device,node-name=hd,filename={d.loop},cache.direct=on"]
    if STRATA:
        argv += ["--blockdev", f"driver=file,node-name=fx,filename={d.other}/x.img,read-only=on",
                 "--sandbox-allow-dir", al]
    log = os.path.join(al, "daemon.log")

    async def session():
        qmp = QMPClient("reopen")
        await qmp.connect(d.mon)
        try:
            await checks(qmp, d)
        finally:
            await qmp.disconnect()

    try:
        with running(argv, log, [d.mon]) as daemon:
            asyncio.run(session())
            check(daemon.poll() is None, "the daemon is still running")
    finally:
        d.detach()
        shutil.rmtree(d.other, ignore_errors=True)
    check_exit(daemon)
    if STRATA:
        check_no_sandbox_refusals(log)
    shutil.rmtree(d.allowed, ignore_errors=True)
    print(f"qmp reopen ({DAEMON}): {passed()} passed, 0 failed", file=sys.stderr)


main()
