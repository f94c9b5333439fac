"""What the QMP test scripts share: their first two arguments, the count of checks that held,
the expected-error check, a scratch disk and its nodes, running the daemon under test until
its monitors listen, and a deadline for the whole script.

Every script takes `strata|qsd BINARY` first (more arguments after those are its own). It
imports this module from its own directory, which Python puts first on the module path.
Nothing here writes to stdout: some scripts talk to tests/qmp.rs over it.
"""
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError

DAEMON, BINARY = sys.argv[1], sys.argv[2]
STRATA = DAEMON == "strata"
_passed = 0

# No script takes more than a minute or two; one that waits longer waits on something that
# will not come (a command without a reply, a client that never connects).
DEADLINE_S = 300


def _descendants():
    """Where each process this script started, and each of their threads, waits: one line a
    thread with its state and kernel wait channel (a daemon stuck in the kernel shows here)."""
    parents, lines = {os.getpid()}, []
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid not in parents:
                continue
            parents.add(pid)
            for tid in os.listdir(f"/proc/{pid}/task"):
                task = f"/proc/{pid}/task/{tid}"
                with open(f"{task}/stat") as f:
                    stat = f.read()
                with open(f"{task}/wchan") as f:
                    wchan = f.read()
                name = stat[stat.index("(") + 1:stat.rindex(")")]
                state = stat.rsplit(")", 1)[1].split()[0]
                lines.append(f"  pid {pid} tid {tid} {name}: state {state}, waits in {wchan or '-'}")
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return "\n".join(lines) or "  (none)"


def _past_deadline(signum, frame):
    """SIGALRM at the deadline: shows where every asyncio task and every process started here
    waits, then raises so that the daemon is stopped on the way out and the test fails instead
    of hanging."""
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no running loop: the traceback of the exception shows the wait
        tasks = set()
    for task in tasks:
        task.print_stack(file=sys.stderr)
    print(f"processes started by {sys.argv[0]}:\n{_descendants()}", file=sys.stderr)
    raise TimeoutError(f"{sys.argv[0]} against {DAEMON} did not finish in {DEADLINE_S} s")


signal.signal(signal.SIGALRM, _past_deadline)
signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)


def check(condition, what):
    """Counts a check that holds; raises AssertionError(what) for one that does not."""
    global _passed
    if not condition:
        raise AssertionError(what)
    _passed += 1


def passed():
    """How many checks have held."""
    return _passed


async def expect_error(qmp, cmd, args, desc=None, cls="GenericError", contains=()):
    """Runs a command that must fail with error class `cls` (QMP's usual GenericError unless
    given) and, when given, exactly the text `desc` and a text holding every string of
    `contains`; returns the error text."""
    try:
        await qmp.execute(cmd, args)
    except ExecuteError as e:
        info = e.error.error
        check(info.class_ == cls, f"{cmd} {args}: class {info.class_}, expected {cls}")
        if desc is not None:
            check(info.desc == desc, f"{cmd} {args}: desc {info.desc!r}, expected {desc!r}")
        for part in contains:
            check(part in info.desc, f"{cmd} {args}: desc {info.desc!r} lacks {part!r}")
        return info.desc
    raise AssertionError(f"{cmd} {args} succeeded, expected {cls} {desc or ''}")


def monitor_args(*sockets):
    """Daemon arguments for a QMP monitor listening on each Unix socket (m0, m1, ...)."""
    argv = []
    for i, path in enumerate(sockets):
        argv += ["--chardev", f"socket,id=m{i},path={path},server=on,wait=off",
                 "--monitor", f"chardev=m{i}"]
    return argv


def scratch_disk(prefix, size=16 << 20):
    """Makes a temporary directory named `prefix`... holding a sparse `disk.img` of `size`
    bytes; returns the paths of both."""
    dirpath = tempfile.mkdtemp(prefix=prefix)
    image = os.path.join(dirpath, "disk.img")
    with open(image, "wb") as f:
        f.truncate(size)
    return dirpath, image


def raw_disk_args(image, options=""):
    """Daemon arguments for node d0, raw over the file node f0 on `image`, both with `options`
    (",discard=unmap", ...)."""
    return ["--blockdev", f"driver=file,node-name=f0,filename={image}{options}",
            "--blockdev", f"driver=raw,node-name=d0,file=f0{options}"]


def unix_sockets(path):
    """The (flags, state) of every Unix socket bound to `path`, from /proc/net/unix: flags
    00010000 is a listening socket, state 03 a connected one (accepted sockets carry the
    listener's path)."""
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f]
    return [(row[3], row[5]) for row in rows[1:] if len(row) == 8 and row[7] == path]


def listening(path):
    """Whether a socket listens on `path`: the file exists from bind(), but a connect before
    listen() is refused."""
    return any(flags == "00010000" for flags, _ in unix_sockets(path))


@contextlib.contextmanager
def running(argv, log_path, monitors, cwd=None):
    """Starts the daemon `argv` (its output to `log_path`) and yields its process once every
    socket of `monitors` listens. On an error, writes the end of the log to stderr. At the end
    a daemon still running gets SIGTERM and is waited for (killed after 30 s, and given up on
    10 s after that)."""
    log = open(log_path, "w")
    daemon = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        deadline = time.monotonic() + 20
        while not all(listening(m) for m in monitors):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the daemon did not start its monitors")
            time.sleep(0.05)
        yield daemon
    except BaseException:
        log.flush()
        sys.stderr.write(open(log_path).read()[-4000:])
        raise
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                try:
                    daemon.wait(10)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{DAEMON} survived SIGKILL for 10 s:\n"
                                         f"{_descendants()}") from None
                raise
        log.close()


def check_exit(daemon):
    """The daemon, stopped by SIGTERM, exited with 0."""
    code = daemon.returncode
    check(code == 0, f"{DAEMON} exited with {code} after SIGTERM")


def check_no_sandbox_refusals(log_path):
    """Every call the daemon made was one its sandbox allows (strata logs a refused one)."""
    with open(log_path) as log:
        refused = [line for line in log if "sandbox refuses" in line]
    check(not refused, f"the sandbox refused calls: {refused}")
