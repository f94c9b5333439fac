#!/usr/bin/env python3
"""Jobs at daemon exit: the same checks against strata and qemu-storage-daemon (QSD).

Usage: jobs_exit.py strata|qsd BINARY

A blockdev-create of a fully preallocated file is running when the daemon gets SIGTERM. As
QEMU does (job_cancel_sync_all), the daemon cancels the job, waits for it and dismisses every
job: the client receives the jobs' last events (aborting, concluded, null) before the monitor
closes, the job never reports success after the signal unless it had finished, the file is
whole (its full size, allocated) or was never made, and what the daemon did not make (an
image file of a node, a file an earlier job made) is still there, unchanged. Prints "N passed, 0 failed".
"""
import asyncio
import os
import shutil
import signal
import tempfile
import time

from qemu.qmp import QMPClient

from harness import DAEMON, BINARY, STRATA, check, check_exit, monitor_args, passed, running

MiB = 1 << 20
SIZE = 256 * MiB  # long enough to write that SIGTERM lands while it is written


async def checks(d, mon, daemon):
    qmp = QMPClient("jobs-exit")
    await qmp.connect(mon)
    events = []

    async def collect():
        with qmp.listener("JOB_STATUS_CHANGE") as listener:
            async for event in listener:
                events.append((event["data"]["id"], event["data"]["status"]))

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.1)
    # A job concluded before the exit, and a node on a file the daemon did not make.
    await qmp.execute("blockdev-create", {"job-id": "small", "options": {
        "driver": "file", "filename": os.path.join(d, "small.img"), "size": MiB}})
    deadline = time.monotonic() + 20
    while ("small", "concluded") not in events:
        check(time.monotonic() < deadline, f"the small job concluded: {events}")
        await asyncio.sleep(0.02)
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "keep",
                                       "filename": os.path.join(d, "keep.img")})
    big = os.path.join(d, "big.img")
    await qmp.execute("blockdev-create", {"job-id": "big", "options": {
        "driver": "file", "filename": big, "size": SIZE, "preallocation": "full"}})
    daemon.send_signal(signal.SIGTERM)
    # The daemon ends the job and sends its events before it closes the monitor.
    deadline = time.monotonic() + 60
    while qmp.runstate.name == "RUNNING" and ("small", "null") not in events:
        check(time.monotonic() < deadline, f"the big job concluded: {events}")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    statuses = [s for j, s in events if j == "big"]
    print("big:", statuses)
    check(statuses[:2] == ["created", "running"], f"big: {statuses}")
    # Concluded and dismissed before the daemon left.
    check(statuses[-2:] == ["concluded", "null"], f"big: {statuses}")
    finished = "pending" in statuses
    if not finished:
        check("aborting" in statuses, f"a cancelled job aborts: {statuses}")
    small = [s for j, s in events if j == "small"]
    check(small == ["created", "running", "waiting", "pending", "concluded", "null"],
          f"the concluded job is only dismissed: {small}")
    task.cancel()
    try:
        await qmp.disconnect()
    except Exception:  # the daemon closed the connection first
        pass
    return finished


def main():
    d = tempfile.mkdtemp(prefix="strata-qmp-exit-")
    mon = os.path.join(d, "m0.sock")
    keep = os.path.join(d, "keep.img")
    content = os.urandom(64 * 1024)
    with open(keep, "wb") as f:
        f.write(content)
    argv = [BINARY, *monitor_args(mon)]
    if STRATA:
        argv += ["--sandbox-allow-dir", d]
    try:
        with running(argv, os.path.join(d, "daemon.log"), [mon]) as daemon:
            finished = asyncio.run(checks(d, mon, daemon))
            daemon.wait(60)
            check_exit(daemon)
            big = os.path.join(d, "big.img")
            if os.path.exists(big):
                st = os.stat(big)
                check(st.st_size == SIZE and st.st_blocks * 512 >= SIZE,
                      f"no half image: size {st.st_size}, allocated {st.st_blocks * 512} "
                      f"(job {'finished' if finished else 'cancelled'})")
            with open(keep, "rb") as f:
                check(f.read() == content, "the node's file is unchanged")
            check(os.path.getsize(os.path.join(d, "small.img")) == MiB,
                  "the earlier job's file is still there")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"qmp jobs at exit ({DAEMON}): {passed()} passed, 0 failed")


main()
