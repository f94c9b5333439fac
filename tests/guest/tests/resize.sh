#!/bin/sh
# shellcheck shell=sh
# The disk grows under running I/O: rounds of verified fio random writes run in the background
# while the host resizes the node (QMP block_resize, once it sees "resize: fio running" on the
# console). The guest must see the new size in /sys/block/vda/size without a reboot or rescan,
# from the device's config-change notice alone, while fio is still writing; fio must finish
# every round without an error; then the new area, past the old end, is written and verified.
# Fails on any fio error and on block-layer errors in the kernel log.
# Parameters: strata.resize_to=BYTES (the size the host resizes to; required),
# strata.resize_wait=SECS (how long to wait for the new size, default 300),
# strata.seed=N (1).
set -eu
# shellcheck source-path=SCRIPTDIR/../initramfs source=lib.sh
. /strata/lib.sh

sysfs_size="/sys/block/$(strata_dev)/size"
seed="$(param strata.seed 1)"
is_uint "$seed" || fail "strata.seed must be a number, not '$seed'"
new="$(param strata.resize_to '')" || true
is_uint "$new" || fail "strata.resize_to must be bytes, not '$new'"
wait_s="$(param strata.resize_wait 300)"
is_uint "$wait_s" || fail "strata.resize_wait must be seconds, not '$wait_s'"
old="$(dev_bytes)"
[ "$new" -gt "$old" ] || fail "strata.resize_to ($new) must be more than the disk's $old bytes"
per_job=$((4 * 1048576)) jobs=2 bs=4096
region=$((per_job * jobs))
regions=$((old / region))
[ "$regions" -ge 2 ] || fail "disk too small for two regions of $region bytes"

# randwrite_checked WHAT fio-args...: a verified random-write pass of a region.
randwrite_checked() {
    _pass="$1"
    shift
    fio_checked "$_pass" "$bs" "$jobs" --do_verify=1 --randrepeat=1 --size="$per_job" \
        --offset_increment="$per_job" --rw=randwrite "$@"
}

# The writer: one round after another on the regions below the old end, until /tmp/stop.
rm -f /tmp/stop /tmp/rounds
(
    round=0
    while [ ! -e /tmp/stop ]; do
        randwrite_checked "round$round" --name="round$round" \
            --offset=$(( (round % regions) * region )) --randseed=$(( seed * 1000 + round ))
        round=$((round + 1))
        echo "$round" > /tmp/rounds
        if [ "$round" -eq 1 ]; then
            # The host resizes once it reads this: fio is writing its second round by then.
            log "resize: fio running (disk $old bytes, $(cat "$sysfs_size") sectors)"
        fi
    done
) &
writer=$!

# The size must change while the writer still runs: no reboot, no rescan, no pause of fio.
i=0
while [ "$(cat "$sysfs_size")" -eq $((old / 512)) ]; do
    kill -0 "$writer" 2>/dev/null || fail "fio stopped before the disk changed size"
    [ "$i" -lt $((wait_s * 10)) ] || fail "the disk kept its $old bytes"
    sleep 0.1
    i=$((i + 1))
done
seen="$(dev_bytes)"
if ! kill -0 "$writer" 2>/dev/null; then
    fail "fio stopped before the new size was seen"
fi
log "resize: the disk has $seen bytes now (was $old), while fio round $(cat /tmp/rounds 2>/dev/null || echo 0) ran"
[ "$seen" -eq "$new" ] || fail "the disk has $seen bytes, not the $new the host set"
dmesg | grep -i 'new size\|capacity change' || true

: > /tmp/stop
wait "$writer" || fail "fio failed under the resize: $(cat /tmp/strata-fail-reason 2>/dev/null)"
log "resize: fio stopped after $(cat /tmp/rounds) rounds without an error"

# The new area is there: verified writes past the old end, up to the new last block.
randwrite_checked "new-area" --name=new-area --offset=$((new - region)) --randseed="$seed"
log "resize: the last $region bytes of the new disk written and verified"
check_dmesg
