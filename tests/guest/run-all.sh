#!/usr/bin/env bash
# Guest tests against strata: a Linux guest in QEMU (TCG) with vhost-user-blk-pci, 2 queues.
#   1. raw image file, logical block size 512: sysfs checks, fio --verify=crc32c (4k and 512 B
#      random writes), a pattern written on one boot and read back on a second boot (with a
#      restarted daemon in between);
#   2. the same over a loop device with 4096-byte sectors, logical block size 4096;
#   3. the same on a qcow2 overlay (made by strata img create) over a raw base image;
#   4. the same on a qcow2 overlay with logical block size 4096;
#   5. an rbd image of the Ceph test cluster (CEPH_CONF, as scripts/test.sh exports it): fio
#      with verification and the pattern, checked in `rbd export`'s copy of the image.
#   Each runs a guest discard test (blkdiscard, fio trim, BLKZEROOUT) on a node with
#   discard=unmap. After each, the pattern the guest wrote and the discard test's zeroes are
#   checked in the image on the host.
#   After scenario 1, a QEMU is killed with SIGKILL in the middle of fio: strata must survive
#   and serve the next QEMU, which runs fio without EVENT_IDX (event_idx=off).
#   The disk grows under fio (raw after the SIGKILL test, on its daemon; qcow2 after scenario 3,
#   from 256 MiB to 768 MiB, which needs a bigger L1 table): the host resizes the node with QMP
#   block_resize and the guest must see the new size at once (the config-change notice) while
#   fio keeps writing without an error.
#   Last, strata is restarted 10 times under a guest running verified random writes with
#   reconnect=1 (restart.sh): with SIGKILL (a crash) in raw and qcow2 write-through, 1 and 2
#   queues, and with SIGTERM (an upgrade) in raw 1 queue and qcow2 write-through 2 queues.
#   STRATA_LONG_TESTS=1: all eight configurations (SIGTERM on 1 and 2 queues too), 30 restarts
#   each.
#   Every configuration runs; the failed ones are listed at the end.
#
#   run-all.sh STRATA_BINARY
set -euo pipefail

strata="$(realpath "${1:?usage: run-all.sh STRATA_BINARY}")"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d /tmp/strata-guest.XXXXXX)"
daemon_pid="" loopdev=""

cleanup() {
    # A QEMU left running by a failed qemu_killed_mid_fio.
    [[ -s "$work/qemu.pid" ]] && kill -KILL "$(cat "$work/qemu.pid")" 2>/dev/null || true
    stop_daemon
    [[ -n "$loopdev" ]] && losetup -d "$loopdev" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# listening PATH: whether a socket listens at PATH (flags 00010000 in /proc/net/unix); the
# file exists from bind(), but a connect before listen() is refused.
listening() { awk -v p="$1" '$NF == p && $4 == "00010000" { found = 1 } END { exit !found }' /proc/net/unix; }

start_daemon() { # blockdev-args... ; sets daemon_pid
    local lbs="$1"; shift
    rm -f "$work/vm.sock"
    "$strata" "$@" \
        --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$work/vm.sock,writable=on,num-queues=2,logical-block-size=$lbs" \
        >>"$work/strata.log" 2>&1 &
    daemon_pid=$!
    for _ in $(seq 100); do
        listening "$work/vm.sock" && return 0
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "strata did not start; its log:" >&2
    cat "$work/strata.log" >&2
    return 1
}

stop_daemon() {
    if [[ -n "$daemon_pid" ]]; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        local rc=0
        wait "$daemon_pid" || rc=$?
        daemon_pid=""
        if ((rc != 0)); then
            echo "strata exited with status $rc after SIGTERM; its log:" >&2
            tail -n 40 "$work/strata.log" >&2
            return 1
        fi
    fi
}

# The disk resized under fio: the daemon runs with the monitor $work/qmp.sock (qmp_args); once
# the guest says fio is running, the node is resized with QMP block_resize, and the guest
# checks that it sees the new size while fio goes on (tests/resize.sh).
qmp_args=(--chardev "socket,id=m0,path=$work/qmp.sock,server=on,wait=off" --monitor chardev=m0)
resize_under_fio() { # lbs node new-size
    local lbs="$1" node="$2" new="$3" log="$work/resize-guest.log" marker="resize: fio running"
    echo "== the disk resized to $new bytes under fio (QMP block_resize of node $node)"
    rm -f "$log"
    "$here/run-guest.sh" --socket "$work/vm.sock" --test resize --queues 2 --lbs "$lbs" \
        --seed 7 --timeout 600 --log "$log" --append "strata.resize_to=$new" &
    local guest_pid=$!
    for _ in $(seq 1500); do
        grep -aq "$marker" "$log" 2>/dev/null && break
        kill -0 "$guest_pid" 2>/dev/null || break
        sleep 0.2
    done
    if ! grep -aq "$marker" "$log" 2>/dev/null; then
        wait "$guest_pid" || true
        echo "fio did not start in the resize guest; its log:" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
    if ! "$here/qmp-command.py" "$work/qmp.sock" block_resize \
            "{\"node-name\": \"$node\", \"size\": $new}"; then
        wait "$guest_pid" || true
        return 1
    fi
    wait "$guest_pid"
}

guest() { # test-name lbs size [extra run-guest args]
    local test="$1" lbs="$2" size="$3"; shift 3
    echo "== guest test $test (logical block size $lbs)"
    "$here/run-guest.sh" --socket "$work/vm.sock" --test "$test" --queues 2 --lbs "$lbs" \
        --size "$size" --wc back --seed 7 --timeout 600 "$@"
}

scenario() { # name lbs size image format blockdev-args...
    local name="$1" lbs="$2" size="$3" image="$4" format="$5"; shift 5
    echo "=== $name"
    start_daemon "$lbs" "$@"
    guest sysfs "$lbs" "$size"
    guest fio "$lbs" "$size"
    guest discard "$lbs" "$size"
    guest write-pattern "$lbs" "$size"
    stop_daemon
    start_daemon "$lbs" "$@"
    guest check-pattern "$lbs" "$size"
    stop_daemon
    # What the guest wrote is in the image itself, not only as strata reads it back.
    "$here/host-check-pattern.sh" "$image" "$format" 7 "$lbs" "$size"
    "$here/host-check-discard.sh" "$image" "$format" 7 "$lbs" "$size"
}

# A frontend that dies mid-I/O: QEMU killed with SIGKILL while the guest runs fio. strata must
# stay up and serve the next QEMU, which runs a short fio with verification without
# EVENT_IDX (the device's event_idx=off): notifications and data end to end without it.
qemu_killed_mid_fio() { # lbs size
    local lbs="$1" size="$2" log="$work/killed-guest.log" started="fio randwrite+verify"
    echo "== QEMU killed with SIGKILL in the middle of fio"
    "$here/run-guest.sh" --socket "$work/vm.sock" --test fio --queues 2 --lbs "$lbs" \
        --size "$size" --seed 7 --timeout 300 --log "$log" --pidfile "$work/qemu.pid" \
        >/dev/null 2>&1 &
    local guest_pid=$!
    for _ in $(seq 1500); do
        grep -aq "$started" "$log" 2>/dev/null && break
        kill -0 "$guest_pid" 2>/dev/null || break
        sleep 0.2
    done
    if ! grep -aq "$started" "$log" 2>/dev/null; then
        echo "fio did not start in the guest; its log:" >&2
        tail -n 40 "$log" >&2
        return 1
    fi
    sleep 2
    kill -KILL "$(cat "$work/qemu.pid")"
    rm -f "$work/qemu.pid"
    if wait "$guest_pid"; then
        echo "the guest passed although its QEMU was killed" >&2
        return 1
    fi
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        echo "strata died when its frontend was killed; its log:" >&2
        tail -n 40 "$work/strata.log" >&2
        return 1
    fi
    guest fio "$lbs" "$size" --device-opts event_idx=off --append "strata.fio_size=8388608"
}

size=$((256 << 20))
truncate -s "$size" "$work/disk.img"
scenario "raw file, 512-byte blocks" 512 "$size" "$work/disk.img" raw \
    --blockdev "driver=file,node-name=f0,filename=$work/disk.img,aio=io_uring,cache.direct=on,discard=unmap" \
    --blockdev driver=raw,node-name=d0,file=f0,discard=unmap

start_daemon 512 "${qmp_args[@]}" \
    --blockdev "driver=file,node-name=f0,filename=$work/disk.img,aio=io_uring,cache.direct=on" \
    --blockdev driver=raw,node-name=d0,file=f0
qemu_killed_mid_fio 512 "$size"
resize_under_fio 512 d0 $((size + (128 << 20)))
stop_daemon
[[ "$(stat -c %s "$work/disk.img")" == $((size + (128 << 20))) ]] ||
    { echo "disk.img was not resized" >&2; exit 1; }

truncate -s "$size" "$work/disk4k.img"
loopdev="$(losetup --sector-size 4096 -f --show "$work/disk4k.img")"
scenario "loop device with 4096-byte sectors" 4096 "$size" "$work/disk4k.img" raw \
    --blockdev "driver=host_device,node-name=f0,filename=$loopdev,cache.direct=on,discard=unmap" \
    --blockdev driver=raw,node-name=d0,file=f0,discard=unmap

losetup -d "$loopdev"
loopdev=""

truncate -s "$size" "$work/base.raw"
"$strata" img create -f qcow2 -b base.raw -F raw "$work/overlay.qcow2" >/dev/null
scenario "qcow2 overlay over a raw base" 512 "$size" "$work/overlay.qcow2" qcow2 \
    --blockdev "driver=file,node-name=f0,filename=$work/overlay.qcow2,aio=io_uring,cache.direct=on,discard=unmap" \
    --blockdev driver=qcow2,node-name=d0,file=f0,discard=unmap
qemu-img check "$work/overlay.qcow2"
start_daemon 512 "${qmp_args[@]}" \
    --blockdev "driver=file,node-name=f0,filename=$work/overlay.qcow2,aio=io_uring,cache.direct=on" \
    --blockdev driver=qcow2,node-name=d0,file=f0
resize_under_fio 512 d0 $((3 * size))
stop_daemon
qemu-img check "$work/overlay.qcow2"
qemu-img info --output=json "$work/overlay.qcow2" | grep -q "\"virtual-size\": $((3 * size))," ||
    { echo "overlay.qcow2 was not resized" >&2; exit 1; }

truncate -s "$size" "$work/base4k.raw"
"$strata" img create -f qcow2 -b base4k.raw -F raw "$work/overlay4k.qcow2" >/dev/null
scenario "qcow2 overlay, 4096-byte logical blocks" 4096 "$size" "$work/overlay4k.qcow2" qcow2 \
    --blockdev "driver=file,node-name=f0,filename=$work/overlay4k.qcow2,aio=io_uring,cache.direct=on,discard=unmap" \
    --blockdev driver=qcow2,node-name=d0,file=f0,discard=unmap
qemu-img check "$work/overlay4k.qcow2"

# An rbd image (issue 16) of the test cluster scripts/test.sh starts (CEPH_CONF): fio with
# verification, then a pattern whose bytes `rbd export` must show, read from the cluster and
# not through strata. Under CI=true the cluster must be there.
rbd_scenario() { # lbs size
    local lbs="$1" size="$2" image="strata-guest-$$"
    echo "=== rbd image of the test cluster"
    rbd create --size "$((size >> 20))M" "rbd/$image"
    start_daemon "$lbs" \
        --blockdev "driver=rbd,node-name=d0,pool=rbd,image=$image,cache.direct=on,discard=unmap"
    guest fio "$lbs" "$size" --append "strata.fio_size=8388608"
    guest write-pattern "$lbs" "$size"
    stop_daemon
    rbd export --no-progress "rbd/$image" "$work/rbd-export.raw"
    rbd rm --no-progress "rbd/$image"
    "$here/host-check-pattern.sh" "$work/rbd-export.raw" raw 7 "$lbs" "$size"
    rm -f "$work/rbd-export.raw"
}
rbd_scenarios=0
if [[ -n "${CEPH_CONF:-}" ]]; then
    rbd_scenario 512 "$((64 << 20))"
    rbd_scenarios=1
elif [[ "${CI:-}" == true ]]; then
    echo "guest tests: no Ceph cluster under CI (scripts/test.sh starts one: CEPH_CONF)" >&2
    exit 1
else
    echo "=== rbd image: skipped (no CEPH_CONF; eval \"\$(scripts/ceph-test-cluster.sh start)\")"
fi

# The daemon restarted under a running guest (issue 14): format, queues, signal.
restart_configs=("raw 1 KILL" "raw 2 KILL" "qcow2 1 KILL" "qcow2 2 KILL" "raw 1 TERM" "qcow2 2 TERM")
restarts=10 restart_size=$((256 << 20))
if [[ "${STRATA_LONG_TESTS:-}" == 1 ]]; then
    restart_configs=("raw 1 KILL" "raw 2 KILL" "qcow2 1 KILL" "qcow2 2 KILL"
        "raw 1 TERM" "raw 2 TERM" "qcow2 1 TERM" "qcow2 2 TERM")
    # room for every round in a region of its own (restart-fio.sh says why)
    restarts=30 restart_size=$((1 << 30))
fi
restart_failed=()
for config in "${restart_configs[@]}"; do
    read -r fmt queues sig <<<"$config"
    echo "=== strata restarted $restarts times with SIG$sig: $fmt, $queues queue(s), write-through"
    "$here/restart.sh" "$strata" --format "$fmt" --queues "$queues" --signal "$sig" \
        --restarts "$restarts" --size "$restart_size" || restart_failed+=("$fmt/${queues}q/$sig")
done
if ((${#restart_failed[@]} > 0)); then
    echo "guest tests: restart configurations failed: ${restart_failed[*]}" >&2
    exit 1
fi

echo "guest tests: $((4 + rbd_scenarios)) scenarios, 2 resizes and ${#restart_configs[@]} restart configurations passed"
