#!/usr/bin/env python3
"""query-blockstats and block-latency-histogram-set: the same checks against strata and
qemu-storage-daemon (QSD) 7.2.

Usage: stats.py strata|qsd BINARY FAULTFS_MOUNT|-

Run by tests/qmp.rs, which does the libblkio I/O this script asks for: it prints
`IO SOCKET OP OFFSET LEN` and reads the request's result (0 or -errno) on stdin; `CLOSE
SOCKET` disconnects that client; `FAULT COMMAND` gives the strata-faultfs mount at
FAULTFS_MOUNT a command (fail the next read, ...), for I/O errors.

Checked for both daemons: the shape of the answers (the same keys, the types), argument
errors. strata-only (QSD 7.2 counts no traffic of its exports, whose block backends have no
name, and has no block-latency-histogram-set; each check says which): the counts, bytes,
failed and invalid requests of every export and node, matching the I/O done exactly, and
the latency histograms.
"""
import asyncio
import os
import shutil
import sys

from qemu.qmp import QMPClient

from harness import (DAEMON, BINARY, STRATA, check, check_exit, expect_error, monitor_args,
                     passed, raw_disk_args, running, scratch_disk)

FAULTFS = sys.argv[3]
SIZE = 16 << 20

# QEMU 7.2's BlockDeviceStats members, those always present.
STATS_KEYS = {
    "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations",
    "flush_operations", "unmap_operations", "rd_total_time_ns", "wr_total_time_ns",
    "flush_total_time_ns", "unmap_total_time_ns", "wr_highest_offset", "rd_merged",
    "wr_merged", "unmap_merged", "failed_rd_operations", "failed_wr_operations",
    "failed_flush_operations", "failed_unmap_operations", "invalid_rd_operations",
    "invalid_wr_operations", "invalid_flush_operations", "invalid_unmap_operations",
    "account_invalid", "account_failed", "timed_stats",
}
# ... and those present only when they have a value.
OPTIONAL_STATS_KEYS = {"idle_time_ns", "rd_latency_histogram", "wr_latency_histogram",
                       "flush_latency_histogram"}
FILE_SPECIFIC_KEYS = {"driver", "discard-nb-ok", "discard-nb-failed", "discard-bytes-ok"}


def ask(line):
    """A request to tests/qmp.rs; its answer."""
    print(line, flush=True)
    answer = sys.stdin.readline()
    if not answer:
        raise AssertionError(f"no answer to {line!r}")
    return int(answer)


def io(sock, op, offset=0, length=0):
    return ask(f"IO {sock} {op} {offset} {length}")


def check_stats_shape(stats, where):
    keys = set(stats)
    check(STATS_KEYS <= keys, f"{where}: missing {STATS_KEYS - keys}")
    check(keys <= STATS_KEYS | OPTIONAL_STATS_KEYS,
          f"{where}: unexpected {keys - STATS_KEYS - OPTIONAL_STATS_KEYS}")
    for k in keys - {"account_invalid", "account_failed", "timed_stats"}:
        if k.endswith("_histogram"):
            h = stats[k]
            check(set(h) == {"boundaries", "bins"}, f"{where}: {k} keys {set(h)}")
            check(len(h["bins"]) == len(h["boundaries"]) + 1, f"{where}: {k} {h}")
        else:
            check(isinstance(stats[k], int) and stats[k] >= 0, f"{where}: {k}={stats[k]!r}")
    check(isinstance(stats["account_invalid"], bool), f"{where}: account_invalid")
    check(stats["timed_stats"] == [], f"{where}: timed_stats")
    for k in ("rd_merged", "wr_merged", "unmap_merged"):
        check(stats[k] == 0, f"{where}: {k}")


def check_node_shape(entry, where, children):
    """A node entry (QEMU's bdrv_query_bds_stats): `children` maps node names to their file
    child's name (None: a protocol node, which has driver-specific stats)."""
    name = entry["node-name"]
    child = children[name]
    keys = {"node-name", "stats"} | ({"parent"} if child else {"driver-specific"})
    check(set(entry) == keys, f"{where} {name}: keys {set(entry)}, expected {keys}")
    check_stats_shape(entry["stats"], f"{where} {name}")
    if child:
        check(entry["parent"]["node-name"] == child, f"{where} {name}: parent")
        check_node_shape(entry["parent"], f"{where} {name}.parent", children)
    else:
        ds = entry["driver-specific"]
        check(set(ds) == FILE_SPECIFIC_KEYS and ds["driver"] == "file",
              f"{where} {name}: driver-specific {ds}")


def by_node(entries):
    return {e["node-name"]: e for e in entries}


def counts(stats):
    """The counters a test compares."""
    return {k: v for k, v in stats.items()
            if k.endswith(("_operations", "_bytes")) or k == "wr_highest_offset"}


def expect(**nonzero):
    """Counters all zero but those given."""
    c = {k: 0 for k in STATS_KEYS if k.endswith(("_operations", "_bytes"))}
    c["wr_highest_offset"] = 0
    for k, v in nonzero.items():
        check(k in c, f"test bug: {k}")
        c[k] = v
    return c


async def checks(dirpath, mon):
    qmp = QMPClient("stats")
    await qmp.connect(mon)
    e0 = os.path.join(dirpath, "e0.sock")
    children = {"f0": None, "d0": "f0", "f1": None, "d1": "f1"}

    # The shape of the answers, before any I/O.
    nodes = await qmp.execute("query-blockstats", {"query-nodes": True})
    names = {e["node-name"] for e in nodes}
    check(names == ({"f0", "d0", "f1", "d1"} if STRATA and FAULTFS != "-" else {"f0", "d0"}),
          f"nodes {names}")
    for entry in nodes:
        check_node_shape(entry, "query-nodes", children)
        check("idle_time_ns" not in entry["stats"], "no idle time before any request")
    await expect_error(qmp, "query-blockstats", {"query-nodes": "x"},
                       "Invalid parameter type for 'query-nodes', expected: boolean")
    await expect_error(qmp, "query-blockstats", {"bogus": 1},
                       "Parameter 'bogus' is unexpected")
    exports = await qmp.execute("query-blockstats")
    if STRATA:
        # strata-only: an entry per export, as QEMU's for a guest device.
        check([e["qdev"] for e in exports] == (["e0", "e1"] if FAULTFS != "-" else ["e0"]),
              f"export entries {exports}")
        e = exports[0]
        check(set(e) == {"device", "qdev", "node-name", "stats", "parent"}, f"keys {set(e)}")
        check(e["device"] == "" and e["node-name"] == "d0", f"{e}")
        check_stats_shape(e["stats"], "e0")
        check(e["stats"]["account_invalid"] and e["stats"]["account_failed"], "accounted")
        check_node_shape(e["parent"], "e0.parent", children)
    else:
        # QSD 7.2 lists block backends with a name or a device only: its exports have neither.
        check(exports == [], f"QSD lists no export: {exports}")

    # Histograms: QSD 7.2 has no block-latency-histogram-set (a system emulator command).
    if not STRATA:
        await expect_error(qmp, "block-latency-histogram-set", {"id": "e0"}, cls="CommandNotFound")
    else:
        hset = "block-latency-histogram-set"
        await expect_error(qmp, hset, {"id": "nope"}, "Device 'nope' not found",
                           cls="DeviceNotFound")
        await expect_error(qmp, hset, {"id": "e0", "boundaries": [10, 5]},
                           "Device 'e0' set read boundaries fail")
        await expect_error(qmp, hset, {"id": "e0", "boundaries-write": [0, 5]},
                           "Device 'e0' set write boundaries fail")
        await expect_error(qmp, hset, {"id": "e0", "boundaries": []},
                           "Device 'e0' set read boundaries fail")
        await expect_error(qmp, hset, {"id": "e0", "boundaries": "x"},
                           "Invalid parameter type for 'boundaries', expected: array")
        await expect_error(qmp, hset, {"id": "e0", "boundaries-read": ["x"]},
                           "Parameter 'boundaries-read[0]' expects uint64")
        # QEMU takes a negative boundary as its two's complement; strata refuses it.
        await expect_error(qmp, hset, {"id": "e0", "boundaries-write": [5, -1]},
                           "Parameter 'boundaries-write[1]' expects a non-negative integer, "
                           "got -1")
        await expect_error(qmp, hset, {"id": "e0", "boundaries-zap": [1]},
                           "Parameter 'boundaries-zap' is unexpected")
        await expect_error(qmp, hset, {}, "Parameter 'id' is missing")
        # A list that fails changes nothing, even when the lists before it were good.
        await expect_error(qmp, hset, {"id": "e0", "boundaries": [5], "boundaries-flush": [0]},
                           "Device 'e0' set flush boundaries fail")
        stats = (await qmp.execute("query-blockstats"))[0]["stats"]
        check(not OPTIONAL_STATS_KEYS & set(stats), f"no histogram after failures: {stats}")
        check(await qmp.execute(hset, {"id": "e0", "boundaries": [1000, 1000000],
                                       "boundaries-flush": [7]}) == {}, "set")
        # A node name (QEMU takes devices only): the node's own histogram.
        check(await qmp.execute(hset, {"id": "d0", "boundaries-read": [50000]}) == {}, "node")
        stats = (await qmp.execute("query-blockstats"))[0]["stats"]
        check(stats["rd_latency_histogram"] == {"boundaries": [1000, 1000000], "bins": [0, 0, 0]}
              and stats["wr_latency_histogram"]["boundaries"] == [1000, 1000000]
              and stats["flush_latency_histogram"] == {"boundaries": [7], "bins": [0, 0]},
              f"histograms set: {stats}")

    # I/O on e0, with its exact expected effect.
    check(io(e0, "write", 0, 4096) == 0, "write")
    check(io(e0, "write", 8192, 8192) == 0, "write")
    for _ in range(4):
        check(io(e0, "read", 0, 4096) == 0, "read")
    check(io(e0, "read", 0, 16384) == 0, "read")
    check(io(e0, "flush") == 0, "flush")
    check(io(e0, "flush") == 0, "flush")
    check(io(e0, "discard", 0, 4096) == 0, "discard")
    check(io(e0, "write-zeroes", 16384, 8192) == 0, "write-zeroes")
    # Beyond the end: refused before any I/O.
    check(io(e0, "read", SIZE, 4096) < 0, "read beyond the end fails")
    check(io(e0, "write", SIZE - 512, 4096) < 0, "write beyond the end fails")

    exports = await qmp.execute("query-blockstats")
    nodes = by_node(await qmp.execute("query-blockstats", {"query-nodes": True}))
    for name, entry in nodes.items():
        check_node_shape(entry, "after I/O", children)
    done = dict(rd_operations=5, rd_bytes=4 * 4096 + 16384, wr_operations=3,
                wr_bytes=4096 + 8192 + 8192, flush_operations=2, unmap_operations=1,
                unmap_bytes=4096, wr_highest_offset=16384 + 8192)
    if not STRATA:
        # QSD 7.2 counts nothing per node either, but the highest offset written.
        for name in ("d0", "f0"):
            check(counts(nodes[name]["stats"]) == expect(wr_highest_offset=24576),
                  f"QSD {name}: {nodes[name]['stats']}")
    else:
        stats = exports[0]["stats"]
        check_stats_shape(stats, "e0 after I/O")
        check(counts(stats) == expect(invalid_rd_operations=1, invalid_wr_operations=1, **done),
              f"e0 counts: {counts(stats)}")
        check("idle_time_ns" in stats, "idle time after requests")
        # Histograms count every request once (failed ones too; refused ones not).
        for kind, n in (("rd", 5), ("wr", 3), ("flush", 2)):
            bins = stats[f"{kind}_latency_histogram"]["bins"]
            check(sum(bins) == n, f"{kind} histogram {bins}: {n} requests")
        check(exports[0]["parent"]["stats"] == nodes["f0"]["stats"]
              or counts(exports[0]["parent"]["stats"]) == counts(nodes["f0"]["stats"]),
              "the export's parent entry is f0's")
        # The nodes saw the same requests, minus those the export refused.
        check(counts(nodes["d0"]["stats"]) == expect(**done), f"d0: {nodes['d0']['stats']}")
        check(counts(nodes["f0"]["stats"]) == expect(**done), f"f0: {nodes['f0']['stats']}")
        d0 = nodes["d0"]["stats"]
        check(sum(d0["rd_latency_histogram"]["bins"]) == 5
              and d0["rd_latency_histogram"]["boundaries"] == [50000]
              and "wr_latency_histogram" not in d0, f"d0 histogram {d0}")
        ds = nodes["f0"]["driver-specific"]
        check(ds["discard-nb-ok"] == 1 and ds["discard-bytes-ok"] == 4096
              and ds["discard-nb-failed"] == 0, f"f0 discards {ds}")
        # New boundaries start empty; only those named change; none at all turns all off.
        hset = "block-latency-histogram-set"
        await qmp.execute(hset, {"id": "e0", "boundaries-read": [3]})
        stats = (await qmp.execute("query-blockstats"))[0]["stats"]
        check(stats["rd_latency_histogram"] == {"boundaries": [3], "bins": [0, 0]}
              and sum(stats["wr_latency_histogram"]["bins"]) == 3, f"reset read: {stats}")
        await qmp.execute(hset, {"id": "e0"})
        stats = (await qmp.execute("query-blockstats"))[0]["stats"]
        check(not {k for k in stats if k.endswith("_histogram")}, f"all off: {stats}")

    if STRATA and FAULTFS != "-":
        # strata-only: I/O errors (strata-faultfs fails the file's next read, then write).
        e1 = os.path.join(dirpath, "e1.sock")
        check(ask("FAULT fail read EIO once") == 0, "fault set")
        check(io(e1, "read", 0, 4096) < 0, "the read fails")
        check(ask("FAULT fail write EIO once") == 0, "fault set")
        check(io(e1, "write", 4096, 4096) < 0, "the write fails")
        check(io(e1, "read", 8192, 4096) == 0, "the next read succeeds")
        failed = dict(failed_rd_operations=1, failed_wr_operations=1, rd_operations=1,
                      rd_bytes=4096)
        exports = await qmp.execute("query-blockstats")
        nodes = by_node(await qmp.execute("query-blockstats", {"query-nodes": True}))
        check(counts(exports[1]["stats"]) == expect(**failed), f"e1: {exports[1]}")
        for name in ("d1", "f1"):
            check(counts(nodes[name]["stats"]) == expect(**failed), f"{name}: {nodes[name]}")
        check(ask(f"CLOSE {e1}") == 0, "close")
    check(ask(f"CLOSE {e0}") == 0, "close")
    await qmp.disconnect()


def main():
    dirpath, image = scratch_disk("strata-qmp-stats-", SIZE)
    mon = os.path.join(dirpath, "m0.sock")
    argv = [BINARY, *raw_disk_args(image, ",discard=unmap"),
            "--export", "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                        f"addr.path={os.path.join(dirpath, 'e0.sock')},writable=on",
            *monitor_args(mon)]
    if STRATA and FAULTFS != "-":
        faulty = os.path.join(FAULTFS, "faulty.img")  # SIZE bytes, made by tests/qmp.rs
        argv += ["--blockdev", f"driver=file,node-name=f1,filename={faulty},cache.direct=on",
                 "--blockdev", "driver=raw,node-name=d1,file=f1",
                 "--export", "type=vhost-user-blk,id=e1,node-name=d1,addr.type=unix,"
                             f"addr.path={os.path.join(dirpath, 'e1.sock')},writable=on"]
    try:
        with running(argv, os.path.join(dirpath, "daemon.log"), [mon]) as daemon:
            asyncio.run(checks(dirpath, mon))
            check(daemon.poll() is None, "the daemon is still running")
    finally:
        shutil.rmtree(dirpath, ignore_errors=True)
    check_exit(daemon)
    print(f"qmp stats ({DAEMON}): {passed()} passed, 0 failed", flush=True)


main()
