#!/bin/bash
# Validate the guest harness end to end against qemu-storage-daemon (QSD) as
# the vhost-user-blk server: every guest test must pass, and the checks that
# must fail (wrong seed, a byte changed behind the guest's back, wrong size,
# wrong write-cache mode) must fail.
#
#   qsd-selftest.sh [--quick]      (--quick: skip the fio runs and the restart runs)
#
# Without --quick it also restarts QSD under a guest writing with fio (restart.sh, 10 SIGKILLs
# each): a raw export with writethrough=on must pass (QSD keeps in-flight requests across a
# reconnect, so this shows the restart test can pass); a qcow2 export with QSD's default cache
# (writethrough=off, while the guest is told the cache is write-through) is only reported:
# QSD loses completed writes there, which is QSD's behaviour and no failure of the harness.
#
# Works in a temporary directory under $STRATA_GUEST_DIR (default
# <repo>/target/guest); stops only the QSD processes it started.
# Ends with a line `N passed, N failed`; exit 0 when nothing failed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1

gdir="${STRATA_GUEST_DIR:-$repo/target/guest}"
mkdir -p "$gdir"
work="$(mktemp -d "$gdir/qsd-selftest.XXXXXX")"
export STRATA_GUEST_DIR="$gdir"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    rm -f "$work"/*.img
}
trap cleanup EXIT

# listening PATH: whether a socket listens at PATH (flags 00010000 in /proc/net/unix); the
# file exists from bind(), but a connect before listen() is refused.
listening() { awk -v p="$1" '$NF == p && $4 == "00010000" { found = 1 } END { exit !found }' /proc/net/unix; }

# start_qsd NAME SIZE QUEUES LBS: raw image + QSD export at $work/NAME.sock
start_qsd() {
    local name="$1" size="$2" queues="$3" lbs="$4"
    qemu-img create -f raw "$work/$name.img" "$size" >/dev/null
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f0,filename=$work/$name.img,cache.direct=on,aio=io_uring,discard=unmap" \
        --blockdev driver=raw,node-name=d0,file=f0,discard=unmap \
        --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$work/$name.sock,writable=on,num-queues=$queues,logical-block-size=$lbs" \
        >"$work/$name.qsd.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 50); do
        listening "$work/$name.sock" && return 0
        sleep 0.1
    done
    echo "qsd-selftest: QSD $name did not come up:" >&2
    cat "$work/$name.qsd.log" >&2
    exit 1
}

passed=0 failed=0
# expect WANT LABEL run-guest-args...
# WANT is `pass`, or text the guest's `STRATA-RESULT: FAIL ...` line must
# contain (so a run that fails for another reason does not count).
expect() {
    local want="$1" label="$2" t0 t1 rc secs result ok=0
    shift 2
    t0=$(date +%s.%N)
    set +e
    "$here/run-guest.sh" --log "$work/$label.log" "$@" >"$work/$label.out" 2>&1
    rc=$?
    set -e
    t1=$(date +%s.%N)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    result="$(tr -d '\r' < "$work/$label.log" | grep -a '^STRATA-RESULT: ' | tail -n1 || true)"
    if [[ "$want" == pass ]]; then
        [[ $rc -eq 0 ]] && ok=1
    elif [[ $rc -ne 0 && "$result" == "STRATA-RESULT: FAIL "*"$want"* ]]; then
        ok=1
    fi
    if [[ $ok -eq 1 ]]; then
        passed=$((passed + 1))
        echo "ok   $label (${secs}s) ${result:-no result line}"
    else
        failed=$((failed + 1))
        echo "FAIL $label (wanted: $want; exit $rc; ${secs}s)"
        sed 's/^/     /' "$work/$label.out"
    fi
}

# Build (or refresh) the initramfs once, outside the timings.
"$here/build-initramfs.sh" "$gdir/initramfs-$("$here/kernel-path.sh" --version).cpio.gz" >/dev/null

mib=$((1024 * 1024))
start_qsd d512 $((256 * mib)) 2 512
start_qsd d4k $((128 * mib)) 1 4096
s512="$work/d512.sock"
s4k="$work/d4k.sock"

expect pass sysfs-512 --socket "$s512" --test sysfs --queues 2 --lbs 512 --size $((256 * mib))
expect "size is" sysfs-wrong-size --socket "$s512" --test sysfs --size $((128 * mib))
expect "write_cache is 'write through', expected 'write back'" sysfs-wc-back --socket "$s512" --test sysfs --wc back
expect pass sysfs-wc-through --socket "$s512" --test sysfs --wc through
if [[ $quick -eq 0 ]]; then
    expect pass fio-512 --socket "$s512" --test fio --timeout 300
fi
expect pass discard-512 --socket "$s512" --test discard --seed 7
# What the discard test left (pattern, discarded and BLKZEROOUT-zeroed ranges), in the image.
if "$here/host-check-discard.sh" "$work/d512.img" raw 7 512 $((256 * mib)) >"$work/host-check-discard.out" 2>&1; then
    passed=$((passed + 1))
    echo "ok   host-check-discard-512"
else
    failed=$((failed + 1))
    echo "FAIL host-check-discard-512"
    sed 's/^/     /' "$work/host-check-discard.out"
fi
expect pass write-pattern-512 --socket "$s512" --test write-pattern --seed 7
expect pass check-pattern-512 --socket "$s512" --test check-pattern --seed 7
expect "pattern mismatch at lba 0 9 " check-pattern-512-other-seed --socket "$s512" --test check-pattern --seed 8
# change one byte of the last block behind the guest's back
printf 'X' | dd of="$work/d512.img" bs=1 seek=$((256 * mib - 100)) conv=notrunc status=none
expect "pattern mismatch at lba 524287 (seed 7)" check-pattern-512-corrupted --socket "$s512" --test check-pattern --seed 7

expect pass sysfs-4k --socket "$s4k" --test sysfs --queues 1 --lbs 4096 --size $((128 * mib))
if [[ $quick -eq 0 ]]; then
    expect pass fio-4k --socket "$s4k" --queues 1 --test fio --timeout 300
fi
expect pass write-pattern-4k --socket "$s4k" --queues 1 --test write-pattern --seed 99
expect pass check-pattern-4k --socket "$s4k" --queues 1 --test check-pattern --seed 99
expect "pattern mismatch at lba 0 9 " check-pattern-4k-other-seed --socket "$s4k" --queues 1 --test check-pattern --seed 98

if [[ $quick -eq 0 ]]; then
    # restart.sh starts and kills its own QSD instances.
    if "$here/restart.sh" qsd --format raw --queues 2 --signal KILL --restarts 10 \
            >"$work/restart-raw.out" 2>&1; then
        passed=$((passed + 1))
        echo "ok   restart-raw-2q-KILL ($(grep -a 'rounds written' "$work/restart-raw.out" | sed 's/^restart: guest: //'))"
    else
        failed=$((failed + 1))
        echo "FAIL restart-raw-2q-KILL"
        sed 's/^/     /' "$work/restart-raw.out"
    fi
    if "$here/restart.sh" qsd --format qcow2 --queues 2 --signal KILL --restarts 10 \
            --cache back >"$work/restart-qcow2.out" 2>&1; then
        echo "info restart-qcow2-2q-KILL with QSD's default cache: passed this time"
    else
        echo "info restart-qcow2-2q-KILL with QSD's default cache: $(grep -a 'FAILED' "$work/restart-qcow2.out" | head -n1)"
        grep -a -m3 'write cache:\|verify: bad\|I/O error' "$work/restart-qcow2.out" | sed 's/^/     /'
    fi
fi

echo "qsd-selftest: logs in $work"
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
