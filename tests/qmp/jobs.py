#!/usr/bin/env python3
"""QMP jobs and blockdev-create: the same checks against strata and qemu-storage-daemon (QSD).

Usage: jobs.py strata|qsd DAEMON_BINARY STRATA_BENCH_BINARY

A management tool's sequence: blockdev-create file -> blockdev-add file node ->
blockdev-create qcow2 on it (with a backing file) -> blockdev-add qcow2 node ->
block-export-add (and, strata-only, the same with strata's raw creation), checked with qemu-img (check, info) and through the export with libblkio
(strata-bench verify: reads equal the backing file's data, a written pattern reads back).
JOB_STATUS_CHANGE sequences, query-jobs, job verbs in the wrong state and unknown ids, and
failing creations are compared with what QSD 7.2 does. Prints "N passed, 0 failed".
"""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient

from harness import (DAEMON, BINARY, STRATA, check, check_exit, check_no_sandbox_refusals,
                     expect_error, monitor_args, passed, running)

BENCH = sys.argv[3]
MiB = 1 << 20


class Events:
    """Every JOB_STATUS_CHANGE a client receives, by job id."""

    def __init__(self, qmp):
        self.by_job = {}
        self.task = asyncio.create_task(self.collect(qmp))

    async def collect(self, qmp):
        with qmp.listener("JOB_STATUS_CHANGE") as listener:
            async for event in listener:
                data = event["data"]
                self.by_job.setdefault(data["id"], []).append(data["status"])

    async def until(self, job, last):
        deadline = time.monotonic() + 20
        while last not in self.by_job.get(job, []):
            check(time.monotonic() < deadline, f"job {job} reached {last}: {self.by_job.get(job)}")
            await asyncio.sleep(0.02)
        return self.by_job[job]


async def job_info(qmp, job):
    jobs = {j["id"]: j for j in await qmp.execute("query-jobs")}
    return jobs.get(job)


async def create(qmp, events, job, options):
    """blockdev-create, waits for the job to conclude; returns its query-jobs entry."""
    await qmp.execute("blockdev-create", {"job-id": job, "options": options})
    await events.until(job, "concluded")
    return await job_info(qmp, job)


def qemu_img(*args):
    out = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


async def checks(d, mon, other_mon):
    qmp = QMPClient("jobs")
    await qmp.connect(mon)
    other = QMPClient("jobs-other")
    await other.connect(other_mon)
    events, other_events = Events(qmp), Events(other)
    await asyncio.sleep(0.1)
    names = {c["name"] for c in await qmp.execute("query-commands")}
    for cmd in ["blockdev-create", "query-jobs", "job-cancel", "job-pause", "job-resume",
                "job-complete", "job-finalize", "job-dismiss"]:
        check(cmd in names, f"query-commands lists {cmd}")
    check(await qmp.execute("query-jobs") == [], "no job at first")

    # 1. The file, as QEMU's events and query-jobs show it: blockdev-create jobs finalize on
    # their own and wait for job-dismiss (QEMU creates them with JOB_MANUAL_DISMISS).
    overlay = os.path.join(d, "overlay.qcow2")
    info = await create(qmp, events, "mkfile", {"driver": "file", "filename": overlay, "size": 0})
    check(info == {"id": "mkfile", "type": "create", "status": "concluded",
                   "current-progress": 1, "total-progress": 1}, f"query-jobs {info}")
    check(os.path.getsize(overlay) == 0, "the file exists, empty")
    await expect_error(qmp, "blockdev-create", {"job-id": "mkfile", "options": {
        "driver": "file", "filename": overlay, "size": 0}}, "Job ID 'mkfile' already in use")
    # Every verb but dismiss is refused in 'concluded', with QEMU's text.
    for verb in ["cancel", "pause", "complete", "finalize"]:
        await expect_error(qmp, f"job-{verb}", {"id": "mkfile"},
                           f"Job 'mkfile' in state 'concluded' cannot accept command verb '{verb}'")
    await expect_error(qmp, "job-resume", {"id": "mkfile"},
                       "Can't resume a job that was not paused")
    await qmp.execute("job-dismiss", {"id": "mkfile"})
    sequence = ["created", "running", "waiting", "pending", "concluded", "null"]
    check(await events.until("mkfile", "null") == sequence,
          f"events {events.by_job['mkfile']}")
    check(await other_events.until("mkfile", "null") == sequence,
          "the other monitor's client got the same events")
    check(await job_info(qmp, "mkfile") is None, "a dismissed job is gone")
    for verb in ["cancel", "pause", "resume", "complete", "finalize", "dismiss"]:
        await expect_error(qmp, f"job-{verb}", {"id": "mkfile"}, "Job not found")

    # 2. qcow2 onto the file node, with a backing file; then the qcow2 node, exported.
    base = os.path.join(d, "base.raw")
    out = subprocess.run([BENCH, "fill", "--path", base, "--size", str(32 * MiB)],
                         capture_output=True, text=True)
    check(out.returncode == 0, f"strata-bench fill: {out.stderr}")
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "ovl-file",
                                       "filename": overlay})
    info = await create(qmp, events, "mkqcow2", {
        "driver": "qcow2", "file": "ovl-file", "size": 32 * MiB, "cluster-size": 65536,
        "backing-file": base, "backing-fmt": "raw", "refcount-bits": 16})
    check("error" not in info, f"qcow2 created: {info}")
    await qmp.execute("job-dismiss", {"id": "mkqcow2"})
    check(await events.until("mkqcow2", "null") == sequence, "qcow2 job events")
    code, text = qemu_img("check", "-U", overlay)
    check(code == 0, f"qemu-img check: {text}")
    code, text = qemu_img("info", "-U", "--output=json", overlay)
    image = json.loads(text)
    check(image["format"] == "qcow2" and image["virtual-size"] == 32 * MiB
          and image["cluster-size"] == 65536, f"qemu-img info {image}")
    check(image["backing-filename"] == base and image.get("backing-filename-format") == "raw",
          f"backing {image}")
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "ovl", "file": "ovl-file"})
    sock = os.path.join(d, "ovl.sock")
    await qmp.execute("block-export-add", {"type": "vhost-user-blk", "id": "e-ovl",
                                           "node-name": "ovl", "writable": True,
                                           "addr": {"type": "unix", "path": sock}})
    out = subprocess.run([BENCH, "verify", "--target", DAEMON, "--path", sock,
                          "--backend", "qcow2", "--source", base,
                          "--expect-size", str(32 * MiB)], capture_output=True, text=True)
    check(out.returncode == 0, f"libblkio through the export: {out.stdout}{out.stderr}")
    await qmp.execute("block-export-del", {"id": "e-ovl", "mode": "hard"})
    deadline = time.monotonic() + 10
    while any(e["id"] == "e-ovl" for e in await qmp.execute("query-block-exports")):
        check(time.monotonic() < deadline, "the export went away")
        await asyncio.sleep(0.05)
    await qmp.execute("blockdev-del", {"node-name": "ovl"})
    await qmp.execute("blockdev-del", {"node-name": "ovl-file"})
    # verify restored the base's data over what it wrote: the overlay reads as its base.
    code, text = qemu_img("compare", overlay, base)
    check(code == 0, f"qemu-img compare overlay base: {text}")
    code, text = qemu_img("check", overlay)
    check(code == 0, f"qemu-img check after writes: {text}")

    # 3. Failing creations conclude with an error, as QEMU's.
    missing_dir = os.path.join(d, "no-such-dir", "x.img")
    info = await create(qmp, events, "nodir", {"driver": "file", "filename": missing_dir,
                                               "size": MiB})
    check(info["status"] == "concluded" and
          info.get("error", "").startswith(f"Could not create '{missing_dir}': "
                                           "No such file or directory"), f"nodir {info}")
    check(events.by_job["nodir"] == ["created", "running", "aborting", "concluded"],
          f"nodir events {events.by_job['nodir']}")
    info = await create(qmp, events, "nonode", {"driver": "qcow2", "file": "zz", "size": MiB})
    check(info.get("error") == "Cannot find device='zz' nor node-name='zz'", f"nonode {info}")
    unaligned = os.path.join(d, "unaligned.qcow2")
    open(unaligned, "wb").close()
    info = await create(qmp, events, "unaligned", {
        "driver": "qcow2", "file": {"driver": "file", "filename": unaligned}, "size": 1000})
    check(info.get("error") == "Image size must be a multiple of 512 bytes", f"size {info}")
    info = await create(qmp, events, "badfmt", {
        "driver": "qcow2", "file": {"driver": "file", "filename": unaligned},
        "size": MiB, "backing-fmt": "raw"})
    check(info.get("error") == "Backing format cannot be used without backing file",
          f"backing-fmt alone {info}")
    for job in ["nodir", "nonode", "unaligned", "badfmt"]:
        await qmp.execute("job-dismiss", {"id": job})

    # 4. Refused before any job: arguments, drivers, ids.
    await expect_error(qmp, "blockdev-create", {"options": {"driver": "file"}},
                       "Parameter 'job-id' is missing")
    await expect_error(qmp, "blockdev-create", {"job-id": "j"}, "Parameter 'options' is missing")
    await expect_error(qmp, "blockdev-create", {"job-id": "1j", "options": {
        "driver": "file", "filename": missing_dir, "size": 0}}, "Invalid job ID '1j'")
    # raw: no case in QEMU 7.2's schema; strata's own BlockdevCreateOptionsRaw (6. below).
    await expect_error(qmp, "blockdev-create", {"job-id": "j", "options": {"driver": "raw"}},
                       "Parameter 'options.file' is missing" if STRATA else
                       "Driver does not support blockdev-create")
    await expect_error(qmp, "blockdev-create", {"job-id": "j", "options": {
        "driver": "raw", "file": "x"}}, "Parameter 'options.size' is missing" if STRATA else
        "Parameter 'options.file' is unexpected")
    await expect_error(qmp, "blockdev-create", {"job-id": "j", "options": {
        "driver": "qcow2", "size": MiB}}, "Parameter 'options.file' is missing")
    await expect_error(qmp, "blockdev-create", {"job-id": "j", "options": {
        "driver": "file", "filename": missing_dir, "size": 1, "preallocation": "xx"}},
        "Parameter 'preallocation' does not accept value 'xx'")
    await expect_error(qmp, "blockdev-create", {"job-id": "j", "auto-dismiss": False, "options": {
        "driver": "file", "filename": missing_dir, "size": 0}},
                       "Parameter 'auto-dismiss' is unexpected")
    await expect_error(qmp, "job-cancel", {}, "Parameter 'id' is missing")
    await expect_error(qmp, "query-jobs", {"x": 1}, "Parameter 'x' is unexpected")

    # 5. Preallocation of a new file.
    full = os.path.join(d, "full.img")
    info = await create(qmp, events, "full", {"driver": "file", "filename": full,
                                              "size": 4 * MiB, "preallocation": "full",
                                              "nocow": True})
    check("error" not in info, f"preallocation=full {info}")
    st = os.stat(full)
    check(st.st_size == 4 * MiB and st.st_blocks * 512 >= 4 * MiB, f"allocated: {st}")
    await qmp.execute("job-dismiss", {"id": "full"})
    check(await qmp.execute("query-jobs") == [], "every job dismissed")
    if STRATA:
        # strata-only: qcow2 preallocation=metadata is not supported, and says so.
        info = await create(qmp, events, "meta", {
            "driver": "qcow2", "file": {"driver": "file", "filename": unaligned},
            "size": MiB, "preallocation": "metadata"})
        check("preallocation=metadata" in info.get("error", ""), f"metadata refused: {info}")
        await qmp.execute("job-dismiss", {"id": "meta"})
        await raw_checks(qmp, events, d)
    events.task.cancel()
    other_events.task.cancel()
    await qmp.disconnect()
    await other.disconnect()


async def raw_checks(qmp, events, d):
    """strata-only: blockdev-create of a raw image (BlockdevCreateOptionsRaw) onto a file node
    or an inline one; refused on a node that cannot grow and on a node in use."""
    # 6. The management-tool sequence: file (job), file node, raw on it, raw node, export.
    path = os.path.join(d, "disk.raw")
    size = 24 * MiB
    info = await create(qmp, events, "mkraw-file", {"driver": "file", "filename": path,
                                                    "size": 0})
    check("error" not in info, f"raw's file created: {info}")
    await qmp.execute("job-dismiss", {"id": "mkraw-file"})
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "raw-file",
                                       "filename": path})
    info = await create(qmp, events, "mkraw", {"driver": "raw", "file": "raw-file",
                                               "size": size})
    check(info == {"id": "mkraw", "type": "create", "status": "concluded",
                   "current-progress": 1, "total-progress": 1}, f"raw created: {info}")
    await qmp.execute("job-dismiss", {"id": "mkraw"})
    check(os.path.getsize(path) == size, f"the file has the raw image's size: "
                                         f"{os.path.getsize(path)}")
    await qmp.execute("blockdev-add", {"driver": "raw", "node-name": "rawd", "file": "raw-file"})
    nodes = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
    for name in ["raw-file", "rawd"]:
        check(nodes[name]["image"]["virtual-size"] == size, f"{name}: {nodes[name]['image']}")
    sock = os.path.join(d, "raw.sock")
    await qmp.execute("block-export-add", {"type": "vhost-user-blk", "id": "e-raw",
                                           "node-name": "rawd", "writable": True,
                                           "addr": {"type": "unix", "path": sock}})
    exports = await qmp.execute("query-block-exports")
    check([e["node-name"] for e in exports if e["id"] == "e-raw"] == ["rawd"],
          f"query-block-exports {exports}")
    # Read and written through the export with libblkio: the capacity is the image's size,
    # and the pattern written lands in the file.
    out = subprocess.run([BENCH, "verify", "--target", DAEMON, "--path", sock,
                          "--backend", "raw", "--expect-size", str(size),
                          "--check-file", path], capture_output=True, text=True)
    check(out.returncode == 0, f"libblkio through the raw export: {out.stdout}{out.stderr}")

    # 7. Refused: a node in use (by the raw node and, through it, the export), a node that
    # cannot grow (null-co), a node that does not exist.
    info = await create(qmp, events, "rawused", {"driver": "raw", "file": "raw-file",
                                                 "size": MiB})
    check(info.get("error") == "Node 'raw-file' is in use by node(s) rawd; blockdev-create "
          "writes only onto a node nothing else uses", f"used node {info}")
    check(os.path.getsize(path) == size, "a refused creation leaves the file as it was")
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "nul", "size": MiB})
    info = await create(qmp, events, "rawnull", {"driver": "raw", "file": "nul",
                                                 "size": 2 * MiB})
    check(info.get("error") == "Node 'nul' cannot be resized: a raw image is created only on "
          "a node that can grow (a file node on a regular file)", f"null-co {info}")
    info = await create(qmp, events, "rawnone", {"driver": "raw", "file": "zz", "size": MiB})
    check(info.get("error") == "Cannot find device='zz' nor node-name='zz'", f"no node {info}")
    for job in ["rawused", "rawnull", "rawnone"]:
        await qmp.execute("job-dismiss", {"id": job})
    await qmp.execute("block-export-del", {"id": "e-raw", "mode": "hard"})
    deadline = time.monotonic() + 10
    while any(e["id"] == "e-raw" for e in await qmp.execute("query-block-exports")):
        check(time.monotonic() < deadline, "the raw export went away")
        await asyncio.sleep(0.05)
    for node in ["rawd", "raw-file", "nul"]:
        await qmp.execute("blockdev-del", {"node-name": node})

    # 8. Inline file, onto a file holding data: the new image is that many zeros.
    old = os.path.join(d, "old.raw")
    with open(old, "wb") as f:
        f.write(b"\xa5" * (3 * MiB))
    info = await create(qmp, events, "rawinline", {
        "driver": "raw", "file": {"driver": "file", "filename": old}, "size": MiB})
    check("error" not in info, f"raw on an inline file: {info}")
    await qmp.execute("job-dismiss", {"id": "rawinline"})
    with open(old, "rb") as f:
        data = f.read()
    check(len(data) == MiB and data == bytes(MiB), f"a raw image of zeros: {len(data)} bytes")
    nodes = {n["node-name"] for n in await qmp.execute("query-named-block-nodes")}
    check(not nodes, f"the inline node is closed with its job: {nodes}")
    check(await qmp.execute("query-jobs") == [], "every raw job dismissed")


def main():
    d = tempfile.mkdtemp(prefix="strata-qmp-jobs-")
    mon0, mon1 = os.path.join(d, "m0.sock"), os.path.join(d, "m1.sock")
    argv = [BINARY, *monitor_args(mon0, mon1)]
    if STRATA:
        argv += ["--sandbox-allow-dir", d]
    log = os.path.join(d, "daemon.log")
    try:
        with running(argv, log, [mon0, mon1]) as daemon:
            asyncio.run(checks(d, mon0, mon1))
            check(daemon.poll() is None, "the daemon is still running")
        check_exit(daemon)
        if STRATA:
            check_no_sandbox_refusals(log)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"qmp jobs ({DAEMON}): {passed()} passed, 0 failed")


main()
