#!/usr/bin/env bash
# Benchmarks strata against qemu-storage-daemon (QSD) and io_uring directly on the image (the
# limit), with one libblkio client (bench/, `strata-bench`) for every target.
#
# Backends: file (a fully allocated 1 GiB raw image, aio=io_uring, cache.direct=on), null
# (null-co, per-request overhead only; no io_uring row) and qcow2 (a 1 GiB qcow2 image, 64k
# clusters, every cluster allocated with data, on the same file driver; no io_uring row).
# ram: a loop device over a 1 GiB file in /dev/shm (set up and torn down by the script, as
# root), served with driver=host_device (aio=io_uring, cache.direct=on) + raw: a block device
# in RAM, stable and CPU-bound, so the daemons' own cost shows (the file rows ride on this
# machine's virtio disk, whose speed swings); io_uring runs directly on the loop device.
# qcow2-ram (only when asked): the qcow2 image above copied to /dev/shm behind a loop device,
# served with driver=host_device + qcow2, so the format's own cost shows; same workloads and
# checks as qcow2. qcow2-alloc (only when asked): an empty qcow2 (4 GiB virtual, 64k clusters)
# on a RAM loop device (filled once), created anew (qemu-img create) before every daemon
# start, so each run writes into unallocated clusters: workloads randwrite-4k-qd1,
# randwrite-4k-qd32 and randwrite-64k-qd32; after each run qemu-img check, and the share of
# clusters the run allocated in the log.
# rbd (only when asked: --backends rbd; needs root and Ceph's packages): a single-node test
# cluster of its own (scripts/ceph-test-cluster.sh in a fresh directory, on a free port from
# 46799 up, stopped and removed at exit), a 1 GiB image written through once with
# `rbd bench`, served by both daemons with driver=rbd,cache.direct=on (librbd's cache off in
# both); workloads 4k randread/randwrite at QD1 and QD32; no io_uring row; the OSD's CPU per I/O
# is reported too (it shares the CPUs with the daemon and the client).
# Workloads: 4k randread/randwrite at QD1 and QD32, 128k sequential read/write at QD8, 4k
# randread QD32 on 2 queues; qcow2 runs randread-4k-qd1, randread-4k-qd32 and randwrite-4k-qd32
# (all of --workloads when that is given). qcow2 writes write the data already there, so the
# image keeps the content of its raw source (checked before and after the rounds).
# Fixed rate (--rates 1000,10000,50000): 4k random reads issued at each rate (IOPS) at QD1 and
# QD4 (--rate-qds), workloads named like randread-4k-qd1-r10k, on the file, null and ram
# backends; the report adds a table of the daemons' CPU per second (% of one CPU, utime+stime
# over the window) and p50/p99 latency, strata beside QSD. Without --workloads only the
# fixed-rate workloads run.
# Polling client (a workload name ending in -poll, e.g. randread-4k-qd1-poll, also after -2q
# or -r10k): the client never sleeps, it calls libblkio's do_io without waiting for a
# completion in a loop, on every target alike, so a QD1 latency holds no wake-up of the
# client (which differs between targets: the loop device's completion wakes the direct
# io_uring client, the daemon's notification the vhost-user one). The report's "p50 added
# over direct" uses the randread-4k-qd1-poll rows when strata and io_uring have them. The
# client spins on its CPU for the whole run.
# Rounds alternate the targets per workload (A B C A B C ...); each daemon is started fresh for
# each workload with num-queues matching it and stopped after. The report gives medians over
# rounds as a table and as JSON (target/bench/ by default).
#
#   scripts/bench.sh                 full run: 3 rounds x 5 s per workload and target (~14 min)
#   scripts/bench.sh --short         CI smoke run (< 60 s): every workload briefly (and one at a
#                                    fixed rate, one with a polling client), data verify;
#                                    fails only on errors or wrong data, never on timing
#   options: --rounds N  --duration S  --ramp S  --out DIR  --image FILE
#            --targets strata,qsd,io_uring  --backends file,null,qcow2,ram,qcow2-ram,qcow2-alloc,rbd
#            --workloads W1,W2,...
#            --strata BIN  --qsd BIN  --require-strata  --no-build
#            --daemon-cpu N  --client-cpu N   (defaults 0 and 1 when there are 2+ CPUs)
#            --unpinned       no taskset: the scheduler places daemon and client
#            --rates R1,R2,...  --rate-qds Q1,Q2,...   (fixed-rate load, see above)
#            --wait-idle S    before each run, wait up to S s for other work (and steal) to go quiet
#            --max-steal PCT  run again (up to 3 times in all) a run in which the hypervisor took
#                             more than PCT % of one CPU from this VM (steal); the report keeps
#                             the attempt with the least steal and the log says which runs
#                             were retried
#            --qmp-poll       give each daemon a QMP monitor and poll query-blockstats on it
#                             every 100 ms while it is measured (scripts/qmp-poll.py, needs
#                             the Python package qemu.qmp); a summary line per run
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }

SHORT=0
ROUNDS=""
DURATION=""
RAMP=""
OUT="$ROOT/target/bench"
IMAGE=""
TARGETS="strata,qsd,io_uring"
BACKENDS="file,null,qcow2"
WORKLOADS="randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,randwrite-4k-qd32,read-128k-qd8,write-128k-qd8,randread-4k-qd32-2q"
QCOW2_WORKLOADS="randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd32"
QALLOC_WORKLOADS="randwrite-4k-qd1,randwrite-4k-qd32,randwrite-64k-qd32"
RBD_WORKLOADS="randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,randwrite-4k-qd32"
WORKLOADS_SET=0
RATES=""
RATE_QDS="1,4"
STRATA="$ROOT/target/release/strata"
QSD=/usr/bin/qemu-storage-daemon
REQUIRE_STRATA=0
BUILD=1
DAEMON_CPU=""
UNPINNED=0
WAIT_IDLE=0
MAX_STEAL=""
QMP_POLL=0
CLIENT_CPU=""
IMAGE_SIZE=$((1024 * 1024 * 1024))
# qcow2-alloc: the image's virtual size (large, so that most random writes of a run allocate)
# and the RAM device under it (room for every cluster plus metadata).
QALLOC_SIZE=$((4 * IMAGE_SIZE))
QALLOC_DEV_SIZE=$((QALLOC_SIZE + IMAGE_SIZE / 2))

die() {
    echo "bench: error: $*" >&2
    exit 1
}
need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
    --short) SHORT=1 ;;
    --rounds) need_arg "$@"; ROUNDS=$2; shift ;;
    --duration) need_arg "$@"; DURATION=$2; shift ;;
    --ramp) need_arg "$@"; RAMP=$2; shift ;;
    --out) need_arg "$@"; OUT=$2; shift ;;
    --image) need_arg "$@"; IMAGE=$2; shift ;;
    --targets) need_arg "$@"; TARGETS=$2; shift ;;
    --backends) need_arg "$@"; BACKENDS=$2; shift ;;
    --workloads) need_arg "$@"; WORKLOADS=$2; WORKLOADS_SET=1; shift ;;
    --strata) need_arg "$@"; STRATA=$2; shift ;;
    --qsd) need_arg "$@"; QSD=$2; shift ;;
    --require-strata) REQUIRE_STRATA=1 ;;
    --no-build) BUILD=0 ;;
    --wait-idle) need_arg "$@"; WAIT_IDLE=$2; shift ;;
    --max-steal) need_arg "$@"; MAX_STEAL=$2; shift ;;
    --rates) need_arg "$@"; RATES=$2; shift ;;
    --rate-qds) need_arg "$@"; RATE_QDS=$2; shift ;;
    --qmp-poll) QMP_POLL=1 ;;
    --daemon-cpu) need_arg "$@"; DAEMON_CPU=$2; shift ;;
    --client-cpu) need_arg "$@"; CLIENT_CPU=$2; shift ;;
    --unpinned) UNPINNED=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

if ((SHORT)); then
    ROUNDS=${ROUNDS:-1}
    DURATION=${DURATION:-0.4}
    RAMP=${RAMP:-0.1}
else
    ROUNDS=${ROUNDS:-3}
    DURATION=${DURATION:-5}
    RAMP=${RAMP:-1}
fi
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds wants a positive integer, got '$ROUNDS'"
[[ $DURATION =~ ^[0-9]*\.?[0-9]+$ ]] || die "--duration wants seconds, got '$DURATION'"
[[ $RAMP =~ ^[0-9]*\.?[0-9]+$ ]] || die "--ramp wants seconds, got '$RAMP'"
[[ $WAIT_IDLE =~ ^[0-9]+$ ]] || die "--wait-idle wants whole seconds, got '$WAIT_IDLE'"
[[ -z $MAX_STEAL || $MAX_STEAL =~ ^[0-9]+$ ]] || die "--max-steal wants a whole percentage, got '$MAX_STEAL'"
for b in ${BACKENDS//,/ }; do
    [[ $b =~ ^(file|null|qcow2|ram|qcow2-ram|qcow2-alloc|rbd)$ ]] ||
        die "unknown backend '$b' (file, null, qcow2, ram, qcow2-ram, qcow2-alloc, rbd)"
done
if [[ -n $RATES ]]; then
    rated=()
    for r in ${RATES//,/ }; do
        [[ $r =~ ^[1-9][0-9]*$ ]] || die "--rates wants requests per second, got '$r'"
        for qd in ${RATE_QDS//,/ }; do
            [[ $qd =~ ^[1-9][0-9]*$ ]] || die "--rate-qds wants queue depths, got '$qd'"
            rated+=("randread-4k-qd$qd-r$r")
        done
    done
    rated=$(IFS=,; echo "${rated[*]}")
    if ((WORKLOADS_SET)); then WORKLOADS=$WORKLOADS,$rated; else WORKLOADS=$rated; fi
fi
if ((SHORT)) && [[ -z $RATES ]]; then
    # The smoke run takes the fixed-rate path too.
    WORKLOADS=$WORKLOADS,randread-4k-qd4-r2000
fi
if ((SHORT)); then
    # And the polling client's, on two queues (the daemon is started with as many).
    WORKLOADS=$WORKLOADS,randread-4k-qd4-2q-poll
fi
if ((WORKLOADS_SET)); then
    QCOW2_WORKLOADS=$WORKLOADS
    QALLOC_WORKLOADS=$WORKLOADS
    RBD_WORKLOADS=$WORKLOADS
fi
if ((!SHORT)) && ((ROUNDS < 3)); then
    echo "bench: note: fewer than 3 rounds; medians are less robust" >&2
fi

START_TIME=$SECONDS
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
# One run at a time per output directory: runs share the images (a verify racing another run's
# writes would fail) and would disturb each other's timing anyway.
exec 9>"$OUT/.lock"
if ! flock -n 9; then
    echo "bench: another bench run is using $OUT; waiting for it to finish" >&2
    flock 9
fi
IMAGE=${IMAGE:-$OUT/bench.img}
QCOW2_IMG=$OUT/bench.qcow2
QCOW2_SRC=$OUT/bench-qcow2-src.raw
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS="$OUT/results-$STAMP.jsonl"
: >"$RESULTS"
RUNDIR=$(mktemp -d /tmp/strata-bench.XXXXXX)
BENCH="$ROOT/target/release/strata-bench"

# ---------------------------------------------------------------------------------------------
# Build the client and (if it builds) strata.
MISSING=()
has_target() { [[ ,$TARGETS, == *,$1,* ]]; }
has_backend() { [[ ,$BACKENDS, == *,$1,* ]]; }
if ((BUILD)); then
    echo "bench: building strata-bench" >&2
    cargo build --release -q -p strata-bench || die "strata-bench does not build"
    if has_target strata && [[ $STRATA == "$ROOT/target/release/strata" ]]; then
        echo "bench: building strata" >&2
        if ! cargo build --release -q --bin strata 2>"$OUT/logs/strata-build.log"; then
            tail -n 20 "$OUT/logs/strata-build.log" >&2 || true
            if ((REQUIRE_STRATA)); then
                die "strata does not build (log: $OUT/logs/strata-build.log)"
            fi
            echo "bench: WARNING: strata does not build; its rows are skipped" >&2
            MISSING+=("strata=strata did not build")
        fi
    fi
fi
POLL_PYTHON=""
if ((QMP_POLL)); then
    # The interpreter itself, not a wrapper (pyenv's shim) that a SIGTERM would end instead.
    POLL_PYTHON=$(python3 -c 'import sys, qemu.qmp; print(sys.executable)' 2>/dev/null) ||
        die "--qmp-poll needs python3 with qemu.qmp (pip install qemu.qmp)"
fi
[[ -x $BENCH ]] || die "$BENCH not found (build it: cargo build --release -p strata-bench)"
if has_target strata && ((${#MISSING[@]} == 0)) && [[ ! -x $STRATA ]]; then
    ((REQUIRE_STRATA)) && die "strata binary $STRATA not found"
    echo "bench: WARNING: $STRATA not found; strata rows are skipped" >&2
    MISSING+=("strata=binary not found")
fi
if ((${#MISSING[@]})); then
    TARGETS=$(tr ',' '\n' <<<"$TARGETS" | grep -vx strata | paste -sd, -)
fi
if has_target strata; then
    # Snapshot the binary: a rebuild during the run must not mix two strata versions.
    cp "$STRATA" "$RUNDIR/strata"
    echo "bench: strata: $STRATA ($(stat -c %y "$STRATA" | cut -d. -f1), tree $(git describe --always --dirty 2>/dev/null || echo unknown))" >&2
    STRATA="$RUNDIR/strata"
fi
if has_target qsd && [[ ! -x $QSD ]]; then
    die "qemu-storage-daemon not found at $QSD (scripts/install-deps.sh installs it)"
fi
[[ -n $TARGETS ]] || die "no targets left to run"

# ---------------------------------------------------------------------------------------------
# CPU pinning: daemon and client on different cores when there are two.
NCPU=$(nproc)
if ((UNPINNED)); then
    [[ -z $DAEMON_CPU$CLIENT_CPU ]] || die "--unpinned does not go with --daemon-cpu/--client-cpu"
    DAEMON_PIN=()
    CLIENT_PIN=()
    PIN_NOTE="not pinned (--unpinned)"
elif ((NCPU >= 2)) || [[ -n $DAEMON_CPU$CLIENT_CPU ]]; then
    DAEMON_CPU=${DAEMON_CPU:-0}
    CLIENT_CPU=${CLIENT_CPU:-1}
    [[ $DAEMON_CPU != "$CLIENT_CPU" ]] || die "--daemon-cpu and --client-cpu must differ"
    DAEMON_PIN=(taskset -c "$DAEMON_CPU")
    CLIENT_PIN=(taskset -c "$CLIENT_CPU")
    PIN_NOTE="daemon pinned to CPU $DAEMON_CPU, client to CPU $CLIENT_CPU (taskset); io_uring target: client on CPU $CLIENT_CPU"
else
    DAEMON_PIN=()
    CLIENT_PIN=()
    PIN_NOTE="not pinned (only $NCPU CPU)"
fi

# ---------------------------------------------------------------------------------------------
# The image: 1 GiB raw, fully written (not just fallocated: unwritten extents read as zeroes
# without touching the disk), reused between runs.
[[ $IMAGE != *,* ]] || die "image path must not contain a comma: $IMAGE"
if has_backend file; then
    alloc=0
    if [[ -f $IMAGE ]]; then
        alloc=$(($(stat -c '%b * %B' "$IMAGE")))
    fi
    if [[ ! -f $IMAGE ]] || (($(stat -c %s "$IMAGE") != IMAGE_SIZE)) || ((alloc < IMAGE_SIZE)); then
        echo "bench: creating $IMAGE (1 GiB, fully written)" >&2
        rm -f "$IMAGE"
        dd if=/dev/zero of="$IMAGE" bs=4M count=$((IMAGE_SIZE / 4194304)) oflag=direct conv=fsync status=none ||
            die "cannot create $IMAGE"
    fi
fi

# RAM loop devices: files in /dev/shm behind loop devices, removed at exit (cleanup).
RAM_DEVS=()
RAM_FILES=()
# Until the full cleanup below takes over: a failure in between leaves no device behind.
trap 'for d in "${RAM_DEVS[@]}"; do losetup -d "$d"; done; rm -f "${RAM_FILES[@]}"' EXIT
RAM_DEV=""
ram_device() { # NAME SIZE CONTENT(zeroes|sparse|a file to copy) -> RAM_DEV: a new loop device
    local file
    ((EUID == 0)) || die "the $1 backend needs root (losetup)"
    file=$(mktemp "/dev/shm/strata-bench-$1.XXXXXX") || die "cannot create a file in /dev/shm"
    RAM_FILES+=("$file")
    case $3 in
    zeroes) # written once, so that reads touch real pages
        dd if=/dev/zero of="$file" bs=4M count=$(($2 / 4194304)) status=none ||
            die "cannot fill $file" ;;
    sparse) ;;
    *) cp "$3" "$file" || die "cannot copy $3 to $file" ;;
    esac
    truncate -s "$2" "$file" || die "cannot size $file"
    RAM_DEV=$(losetup -f --show "$file") || die "losetup failed for $file"
    RAM_DEVS+=("$RAM_DEV")
    echo "bench: $1 backend: $RAM_DEV over $file" >&2
}
RAMDEV=""
if has_backend ram; then
    ram_device ram "$IMAGE_SIZE" zeroes
    RAMDEV=$RAM_DEV
fi

# The qcow2 image: converted with qemu-img from a raw source that strata-bench fills with its
# source pattern (every 8 bytes: their own offset XOR a constant; no zero blocks, so every
# cluster is allocated with data). Both are reused between runs. The "$QCOW2_IMG.ok" stamp says
# the image holds the source's content: it is removed while a run writes to the image and put
# back when the run ends with the content checked, so an interrupted run regenerates it.
QCOW2_SRC_ID="strata-bench source pattern v1, $IMAGE_SIZE bytes"
QCOW2_ID="qcow2 from $QCOW2_SRC_ID, cluster_size=65536"
QCOW2_ACTIVE=0
if { has_backend qcow2 || has_backend qcow2-ram; } && { has_target strata || has_target qsd; }; then
    QEMU_IMG=$(command -v qemu-img) || die "qemu-img not found (scripts/install-deps.sh installs it)"
    [[ $QCOW2_IMG != *,* ]] || die "output path must not contain a comma: $QCOW2_IMG"
    if [[ ! -f $QCOW2_SRC || $(cat "$QCOW2_SRC.ok" 2>/dev/null) != "$QCOW2_SRC_ID" ]] ||
        (($(stat -c %s "$QCOW2_SRC") != IMAGE_SIZE)); then
        echo "bench: creating $QCOW2_SRC (1 GiB raw, source pattern)" >&2
        rm -f "$QCOW2_SRC" "$QCOW2_SRC.ok" "$QCOW2_SRC.tmp" "$QCOW2_IMG.ok"
        "$BENCH" fill --path "$QCOW2_SRC.tmp" --size "$IMAGE_SIZE" >&2 || die "cannot create $QCOW2_SRC"
        mv "$QCOW2_SRC.tmp" "$QCOW2_SRC"
        echo "$QCOW2_SRC_ID" >"$QCOW2_SRC.ok"
    fi
    if [[ ! -f $QCOW2_IMG || $(cat "$QCOW2_IMG.ok" 2>/dev/null) != "$QCOW2_ID" || $QCOW2_SRC -nt $QCOW2_IMG ]]; then
        echo "bench: creating $QCOW2_IMG (qemu-img convert -f raw -O qcow2 of $QCOW2_SRC)" >&2
        rm -f "$QCOW2_IMG" "$QCOW2_IMG.ok" "$QCOW2_IMG.tmp"
        "$QEMU_IMG" convert -f raw -O qcow2 -o cluster_size=65536 -t none -T none \
            "$QCOW2_SRC" "$QCOW2_IMG.tmp" || die "qemu-img convert failed"
        # Every guest cluster must be allocated with data (no zero or unallocated ranges).
        map=$("$QEMU_IMG" map -f qcow2 --output=json "$QCOW2_IMG.tmp") || die "qemu-img map failed"
        if grep -Eq '"(data|present)": false|"zero": true' <<<"$map"; then
            die "qemu-img convert left unallocated or zero clusters in $QCOW2_IMG.tmp: $map"
        fi
        mv "$QCOW2_IMG.tmp" "$QCOW2_IMG"
        echo "$QCOW2_ID" >"$QCOW2_IMG.ok"
    fi
    # From here on the run writes to the image: it is clean again only if the run completes.
    if has_backend qcow2; then
        rm -f "$QCOW2_IMG.ok"
        QCOW2_ACTIVE=1
    fi
fi
QCOW2_RAMDEV=""
if has_backend qcow2-ram && { has_target strata || has_target qsd; }; then
    size=$(stat -c %s "$QCOW2_IMG") || die "no $QCOW2_IMG"
    ram_device qcow2-ram "$(((size + 511) / 512 * 512))" "$QCOW2_IMG"
    QCOW2_RAMDEV=$RAM_DEV
fi
QALLOC_DEV=""
if has_backend qcow2-alloc && { has_target strata || has_target qsd; }; then
    QEMU_IMG=$(command -v qemu-img) || die "qemu-img not found (scripts/install-deps.sh installs it)"
    # Filled once, like a real block device: a write never makes the kernel allocate memory
    # behind it. (Over a sparse file, each new cluster cost the loop device's worker 16 page
    # allocations, and that cost swung 2x from run to run, for both daemons alike.) The image
    # is made anew over the old content before each run; what lies in clusters it does not
    # reference does not matter.
    ram_device qcow2-alloc "$QALLOC_DEV_SIZE" zeroes
    QALLOC_DEV=$RAM_DEV
fi
# An empty qcow2 on the qcow2-alloc device, for the next daemon.
fresh_qalloc() {
    "$QEMU_IMG" create -q -f qcow2 -o cluster_size=65536 "$QALLOC_DEV" "$QALLOC_SIZE" ||
        die "qemu-img create on $QALLOC_DEV failed"
}
# After a run: the image must be clean, and the log says how much of it the run allocated (a
# run that allocated nearly every cluster early measured mostly writes in place).
check_qalloc() {
    local out
    out=$("$QEMU_IMG" check -f qcow2 "$QALLOC_DEV" 2>&1) ||
        die "qemu-img check found errors in the qcow2-alloc image after $*: $out"
    echo "bench: qcow2-alloc after $*: $(grep -o '[0-9]*/[0-9]* = [0-9.]*% allocated' <<<"$out") clusters" >&2
}

# Images just written must not be written back during the first measured rounds.
sync

# ---------------------------------------------------------------------------------------------
# Daemons.
DPID=""
CEPH_DIR=""
OSD_PID=""
RBD_IMAGE=strata-bench
SOCK=""
DLOG=""
POLLPID=""

daemon_cmd() { # TARGET BACKEND NQ SOCK -> prints nothing, fills CMD
    local target=$1 backend=$2 nq=$3 sock=$4 bin node
    case $target in
    strata) bin=$STRATA ;;
    qsd) bin=$QSD ;;
    *) die "no daemon for target $target" ;;
    esac
    CMD=("${DAEMON_PIN[@]}" "$bin")
    case $backend in
    file)
        node=d0
        CMD+=(--blockdev "driver=file,node-name=f0,filename=$IMAGE,aio=io_uring,cache.direct=on"
            --blockdev "driver=raw,node-name=d0,file=f0")
        ;;
    null)
        node=n0
        # --blockdev takes integers only (QAPI): size=1G is refused by QSD.
        if [[ $target == qsd ]]; then
            CMD+=(--blockdev "driver=null-co,node-name=n0,size=$IMAGE_SIZE,read-zeroes=off")
        else
            CMD+=(--blockdev "driver=null-co,node-name=n0,size=$IMAGE_SIZE")
        fi
        ;;
    ram)
        node=d0
        CMD+=(--blockdev "driver=host_device,node-name=f0,filename=$RAMDEV,aio=io_uring,cache.direct=on"
            --blockdev "driver=raw,node-name=d0,file=f0")
        ;;
    qcow2)
        node=d0
        CMD+=(--blockdev "driver=file,node-name=f0,filename=$QCOW2_IMG,aio=io_uring,cache.direct=on"
            --blockdev "driver=qcow2,node-name=d0,file=f0")
        ;;
    qcow2-ram | qcow2-alloc)
        node=d0
        local dev=$QCOW2_RAMDEV
        [[ $backend == qcow2-ram ]] || dev=$QALLOC_DEV
        CMD+=(--blockdev "driver=host_device,node-name=f0,filename=$dev,aio=io_uring,cache.direct=on"
            --blockdev "driver=qcow2,node-name=d0,file=f0")
        ;;
    rbd)
        node=d0
        CMD+=(--blockdev "driver=rbd,node-name=d0,pool=rbd,image=$RBD_IMAGE,conf=$CEPH_CONF,cache.direct=on")
        ;;
    *) die "unknown backend $backend" ;;
    esac
    CMD+=(--export "type=vhost-user-blk,id=e0,node-name=$node,addr.type=unix,addr.path=$sock,writable=on,num-queues=$nq")
    if ((QMP_POLL)); then
        CMD+=(--chardev "socket,id=qmp0,path=$sock.qmp,server=on,wait=off" --monitor chardev=qmp0)
    fi
}

show_log() {
    if [[ -n $DLOG && -f $DLOG ]]; then
        echo "---- daemon log ($DLOG) ----" >&2
        tail -n 40 "$DLOG" >&2 || true
        echo "----" >&2
    fi
}

listening() { # PATH: whether a socket listens there (the file exists from bind(), a connect
    # before listen() is refused)
    awk -v p="$1" '$NF == p && $4 == "00010000" { found = 1 } END { exit !found }' /proc/net/unix
}

start_daemon() { # TARGET BACKEND NQ
    local target=$1 backend=$2 nq=$3 i
    SOCK="$RUNDIR/$target-$backend-$nq.sock"
    DLOG="$OUT/logs/$target-$backend-q$nq.log"
    rm -f "$SOCK"
    daemon_cmd "$target" "$backend" "$nq" "$SOCK"
    echo "+ ${CMD[*]}" >"$DLOG"
    "${CMD[@]}" >>"$DLOG" 2>&1 </dev/null 9>&- & # 9: the run lock stays with this script
    DPID=$!
    for ((i = 0; i < 500; i++)); do
        if ! kill -0 "$DPID" 2>/dev/null; then
            wait "$DPID" && rc=0 || rc=$?
            DPID=""
            show_log
            die "$target ($backend, num-queues=$nq) exited with status $rc before creating its socket"
        fi
        listening "$SOCK" && return 0
        sleep 0.02
    done
    show_log
    die "$target ($backend, num-queues=$nq) did not create $SOCK within 10 s"
}

start_poller() { # with --qmp-poll: poll the running daemon's monitor until stop_daemon
    ((QMP_POLL)) || return 0
    "$POLL_PYTHON" "$ROOT/scripts/qmp-poll.py" "$SOCK.qmp" 0.1 >"$DLOG.poll" 2>&1 </dev/null 9>&- &
    POLLPID=$!
}

stop_poller() {
    [[ -n $POLLPID ]] || return 0
    kill -TERM "$POLLPID" 2>/dev/null || true
    # Its summary line says how it went (the shell's status for it may be the signal's).
    wait "$POLLPID" 2>/dev/null || true
    POLLPID=""
    local summary
    summary=$(grep '^qmp-poll: .* polls, 0 errors' "$DLOG.poll" || true)
    if [[ -n $summary ]]; then
        echo "bench: $summary" >&2
    else
        echo "bench: WARNING: the QMP poller failed (log: $DLOG.poll)" >&2
    fi
}

stop_daemon() {
    stop_poller
    [[ -n $DPID ]] || return 0
    local pid=$DPID i rc=0
    DPID=""
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" || rc=$?
        show_log
        die "daemon (pid $pid) died during the run (status $rc)"
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 500; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.02
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "bench: WARNING: daemon pid $pid ignored SIGTERM for 10 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    rm -f "$SOCK"
    DLOG=""
}

cleanup() {
    local rc=$?
    [[ -z $POLLPID ]] || kill -TERM "$POLLPID" 2>/dev/null || true
    if [[ -n $DPID ]]; then
        kill -TERM "$DPID" 2>/dev/null || true
        sleep 0.2
        kill -KILL "$DPID" 2>/dev/null || true
        wait "$DPID" 2>/dev/null || true
    fi
    rm -rf "$RUNDIR"
    if [[ -n $CEPH_DIR ]]; then
        # The cluster's logs outlive it (an OSD that exits mid-run says why there).
        mkdir -p "$OUT/logs/ceph"
        cp "$CEPH_DIR"/log/*.log "$OUT/logs/ceph/" 2>/dev/null || true
        "$ROOT/scripts/ceph-test-cluster.sh" stop "$CEPH_DIR" || true
    fi
    local dev
    for dev in "${RAM_DEVS[@]}"; do
        losetup -d "$dev" 2>/dev/null || true
    done
    rm -f "${RAM_FILES[@]}"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The rbd test cluster: a directory and monitor port of its own (never the tests' cluster),
# stopped and removed at exit (trap above). The image is written through once, so that reads
# hit stored objects.
if has_backend rbd && { has_target strata || has_target qsd; }; then
    ((EUID == 0)) || die "the rbd backend needs root (scripts/ceph-test-cluster.sh)"
    CEPH_DIR=$(mktemp -d /tmp/strata-bench-ceph.XXXXXX)
    [[ $CEPH_DIR != *,* ]] || die "cluster path must not contain a comma: $CEPH_DIR"
    port=46799
    while ss -Htln "sport = :$port" | grep -q .; do
        ((++port < 46899)) || die "no free port for the test cluster's monitor in 46799-46898"
    done
    echo "bench: rbd: starting a test cluster in $CEPH_DIR (monitor port $port)" >&2
    cluster_env=$(STRATA_CEPH_PORT=$port "$ROOT/scripts/ceph-test-cluster.sh" start "$CEPH_DIR" \
        2>"$OUT/logs/ceph-test-cluster.log") ||
        die "the test cluster did not start (log: $OUT/logs/ceph-test-cluster.log)"
    eval "$cluster_env"
    OSD_PID=$(cat "$CEPH_DIR/run/osd.0.pid") || die "no OSD pid file in $CEPH_DIR/run"
    timeout 60 rbd create --size "$((IMAGE_SIZE / 1048576))M" "rbd/$RBD_IMAGE" ||
        die "rbd create failed"
    echo "bench: rbd: writing rbd/$RBD_IMAGE once (rbd bench, 4 MiB sequential writes)" >&2
    timeout 600 rbd bench --io-type write --io-size 4M --io-threads 4 --io-total "$IMAGE_SIZE" \
        --io-pattern seq "rbd/$RBD_IMAGE" >"$OUT/logs/rbd-fill.log" 2>&1 ||
        die "rbd bench (fill) failed (log: $OUT/logs/rbd-fill.log)"
fi

# Watchdog for one client call: a hung daemon must not hang the run (or CI).
CLIENT_LIMIT=$(awk -v d="$DURATION" -v r="$RAMP" 'BEGIN { printf "%d", d + r + 60 }')
client() { # ARGS...: run strata-bench pinned; on failure show the daemon's log
    if ! timeout --kill-after=5 "$CLIENT_LIMIT" "${CLIENT_PIN[@]}" "$BENCH" "$@"; then
        show_log
        die "strata-bench $1 failed (target args: ${*:2})"
    fi
}

queues_of() { # WORKLOAD -> number of queues
    if [[ $1 =~ -([0-9]+)q(-|$) ]]; then echo "${BASH_REMATCH[1]}"; else echo 1; fi
}

targets_for() { # BACKEND -> targets that apply
    local t out=()
    for t in ${TARGETS//,/ }; do
        [[ $1 != file && $1 != ram && $t == io_uring ]] && continue
        out+=("$t")
    done
    echo "${out[@]}"
}

rotated() { # ROUND TARGET... -> the targets, rotated left by ROUND-1
    # A target that always ran first would always meet the backend in the state the previous
    # workload left (a Ceph OSD's caches, a loop device's pages): rotating the order each round
    # spreads that drift over every target instead of handing it to one.
    local shift=$((($1 - 1) % ($# - 1))) args=("${@:2}")
    echo "${args[@]:shift}" "${args[@]:0:shift}"
}

image_of() { # BACKEND -> the image io_uring runs on directly (file, ram)
    if [[ $1 == ram ]]; then echo "$RAMDEV"; else echo "$IMAGE"; fi
}

workloads_for() { # BACKEND -> its workloads, space-separated
    case $1 in
    qcow2 | qcow2-ram) echo "${QCOW2_WORKLOADS//,/ }" ;;
    qcow2-alloc) echo "${QALLOC_WORKLOADS//,/ }" ;;
    rbd) echo "${RBD_WORKLOADS//,/ }" ;;
    *) echo "${WORKLOADS//,/ }" ;;
    esac
}

# Interference check: timing from a machine that is busy with other work is not comparable.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
# Steal: time the hypervisor ran other guests while this VM's CPUs wanted to run.
steal_ticks() { awk '/^cpu / { print $9; exit }' /proc/stat; }
b0=$(busy_ticks) s0=$(steal_ticks)
sleep 1
b1=$(busy_ticks) s1=$(steal_ticks)
busy_pct=$(((b1 - b0) * 100 / $(getconf CLK_TCK)))
steal_pct=$(((s1 - s0) * 100 / $(getconf CLK_TCK)))
wait_idle() { # up to WAIT_IDLE s until under 25% of one CPU is busy or stolen (0.5 s samples)
    local deadline=$((SECONDS + WAIT_IDLE)) a b c d
    while ((SECONDS < deadline)); do
        a=$(busy_ticks) c=$(steal_ticks)
        sleep 0.5
        b=$(busy_ticks) d=$(steal_ticks)
        (((b - a + d - c) * 200 / $(getconf CLK_TCK) < 25)) && return 0
    done
    echo "bench: note: machine still busy after waiting ${WAIT_IDLE}s; running anyway" >&2
}
if ((busy_pct > 25)); then
    echo "bench: WARNING: the machine is busy before the run (${busy_pct}% of one CPU in use by" \
        "other work); timings will be disturbed (see 'other CPU %' in the report)" >&2
else
    echo "bench: machine idle before the run (${busy_pct}% of one CPU busy)" >&2
fi
if ((steal_pct > 10)); then
    echo "bench: WARNING: the hypervisor takes ${steal_pct}% of one CPU from this VM (steal);" \
        "timings will be disturbed (see 'steal %' in the report)" >&2
fi
echo "bench: $PIN_NOTE" >&2
echo "bench: rounds=$ROUNDS duration=${DURATION}s ramp=${RAMP}s targets=$TARGETS backends=$BACKENDS" >&2
echo "bench: results -> $RESULTS" >&2

# ---------------------------------------------------------------------------------------------
# Verify: write a pattern through each target and read it back (file targets: also directly
# from the image). The null driver stores nothing: only completion status is checked there.
# qcow2: reads through the target must equal the raw source; then a pattern is written, read
# back, and the source data written back.
for backend in ${BACKENDS//,/ }; do
    for target in $(targets_for "$backend"); do
        if [[ $target == io_uring ]]; then
            client verify --target io_uring --backend "$backend" --path "$(image_of "$backend")" \
                --expect-size "$IMAGE_SIZE"
            continue
        fi
        [[ $backend != qcow2-alloc ]] || fresh_qalloc
        start_daemon "$target" "$backend" 1
        if [[ $backend == file || $backend == ram ]]; then
            client verify --target "$target" --backend "$backend" --path "$SOCK" \
                --expect-size "$IMAGE_SIZE" --check-file "$(image_of "$backend")"
        elif [[ $backend == qcow2 || $backend == qcow2-ram ]]; then
            client verify --target "$target" --backend "$backend" --path "$SOCK" \
                --expect-size "$IMAGE_SIZE" --source "$QCOW2_SRC"
        elif [[ $backend == qcow2-alloc ]]; then
            client verify --target "$target" --backend "$backend" --path "$SOCK" \
                --expect-size "$QALLOC_SIZE"
        elif [[ $backend == rbd ]]; then
            client verify --target "$target" --backend rbd --path "$SOCK" \
                --expect-size "$IMAGE_SIZE"
        else
            client verify --target "$target" --backend null --path "$SOCK" \
                --expect-size "$IMAGE_SIZE" --no-data
        fi
        stop_daemon
    done
done

# measure TARGET BACKEND WORKLOAD QUEUES ROUND FILE: one measured run, its JSON line in FILE.
RUN_OUT="$OUT/run-$STAMP.jsonl"
BEST_OUT="$OUT/best-$STAMP.jsonl"
measure() {
    local target=$1 backend=$2 wl=$3 nq=$4 round=$5 dest=$6
    : >"$dest"
    local common=(--target "$target" --backend "$backend" --workload "$wl"
        --duration "$DURATION" --ramp "$RAMP" --seed "$round" --round "$round" --out "$dest")
    # qcow2: writes carry the data already at their offset (the image stays equal to its
    # source).
    if [[ $backend == qcow2 || $backend == qcow2-ram ]]; then
        common+=(--write-source)
    fi
    if [[ $backend == rbd ]]; then
        common+=(--osd-pid "$OSD_PID")
    fi
    if [[ $target == io_uring ]]; then
        client run "${common[@]}" --path "$(image_of "$backend")"
    else
        [[ $backend != qcow2-alloc ]] || fresh_qalloc
        start_daemon "$target" "$backend" "$nq"
        start_poller
        client run "${common[@]}" --path "$SOCK" --daemon-pid "$DPID"
        stop_daemon
        [[ $backend != qcow2-alloc ]] || check_qalloc "$target $wl round $round"
    fi
}

# ---------------------------------------------------------------------------------------------
# Rounds: per workload, every target in turn (same seed within a round = same offsets); the
# order of the targets rotates from one round to the next.
for ((round = 1; round <= ROUNDS; round++)); do
    echo "bench: round $round/$ROUNDS" >&2
    for backend in ${BACKENDS//,/ }; do
        for wl in $(workloads_for "$backend"); do
            nq=$(queues_of "$wl")
            # shellcheck disable=SC2046 # targets are words without spaces
            for target in $(rotated "$round" $(targets_for "$backend")); do
                best_steal=""
                for attempt in 1 2 3; do
                    ((WAIT_IDLE == 0)) || wait_idle
                    measure "$target" "$backend" "$wl" "$nq" "$round" "$RUN_OUT"
                    steal=$(grep -o '"steal_fraction":[^,}]*' "$RUN_OUT" | cut -d: -f2)
                    # Of the attempts, the one with the least steal is kept.
                    if [[ -z $best_steal ]] ||
                        awk -v s="$steal" -v b="$best_steal" 'BEGIN { exit !(s < b) }'; then
                        best_steal=$steal
                        cp "$RUN_OUT" "$BEST_OUT"
                    fi
                    if [[ -n $MAX_STEAL && $attempt -lt 3 ]] &&
                        awk -v s="$steal" -v m="$MAX_STEAL" 'BEGIN { exit !(s * 100 > m) }'; then
                        echo "bench: $target $backend $wl round $round: steal $(awk -v s="$steal" \
                            'BEGIN { printf "%.0f", s * 100 }')% > ${MAX_STEAL}%, running it again" >&2
                        continue
                    fi
                    break
                done
                cat "$BEST_OUT" >>"$RESULTS"
            done
        done
    done
done
rm -f "$RUN_OUT" "$BEST_OUT"

# ---------------------------------------------------------------------------------------------
# qcow2 after the rounds: the write workloads must have left the source's content (read-only
# verify through each daemon), and the image must pass qemu-img check. Then it is clean again.
if ((QCOW2_ACTIVE)); then
    for target in $(targets_for qcow2); do
        start_daemon "$target" qcow2 1
        client verify --target "$target" --backend qcow2 --path "$SOCK" \
            --expect-size "$IMAGE_SIZE" --source "$QCOW2_SRC" --read-only
        stop_daemon
    done
    "$QEMU_IMG" check -q -f qcow2 "$QCOW2_IMG" || die "qemu-img check found errors in $QCOW2_IMG"
    echo "$QCOW2_ID" >"$QCOW2_IMG.ok"
fi
if [[ -n $QCOW2_RAMDEV ]]; then
    for target in $(targets_for qcow2-ram); do
        start_daemon "$target" qcow2-ram 1
        client verify --target "$target" --backend qcow2-ram --path "$SOCK" \
            --expect-size "$IMAGE_SIZE" --source "$QCOW2_SRC" --read-only
        stop_daemon
    done
    "$QEMU_IMG" check -q -f qcow2 "$QCOW2_RAMDEV" || die "qemu-img check found errors in the qcow2-ram image"
fi

# ---------------------------------------------------------------------------------------------
# Report.
report_args=(--results "$RESULTS" --json "$OUT/summary-$STAMP.json" --markdown "$OUT/summary-$STAMP.md"
    --expect "file=strata,qsd,io_uring" --expect "null=strata,qsd" --expect "qcow2=strata,qsd"
    --expect "ram=strata,qsd,io_uring" --expect "qcow2-ram=strata,qsd"
    --expect "qcow2-alloc=strata,qsd" --expect "rbd=strata,qsd")
for m in "${MISSING[@]}"; do
    report_args+=(--missing "$m")
done
echo >&2
"$BENCH" report "${report_args[@]}"
cp "$OUT/summary-$STAMP.json" "$OUT/latest.json"
cp "$OUT/summary-$STAMP.md" "$OUT/latest.md"
echo
echo "bench: $PIN_NOTE"
echo "bench: JSON summary: $OUT/summary-$STAMP.json (also latest.json); raw runs: $RESULTS"
echo "bench: done in $((SECONDS - START_TIME)) s"
