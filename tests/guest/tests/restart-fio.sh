#!/bin/sh
# shellcheck shell=sh
# Verified random writes that keep going while the host restarts the backend (restart.sh).
# Rounds of fio (randwrite, crc32c, verified right after the round) run one after another,
# each on the next region of the disk, until the host writes a line to the
# guest's console (its stdin): the host restarts the daemon as often as it wants in between
# and only then says stop. After the last round every region written is verified once more
# with fio's verify_only (one sequential pass), which covers data written before and across
# all the restarts. The final verify knows a block by its offset and checksum only, not by the
# round that wrote it, so it would take a lost write over a block of an earlier round in the
# same region for good data: regions are used once each, and only when the disk is full does
# the test wrap around (and say so; the round's own verify still tells rounds apart).
# Fails on any fio error or verify mismatch and on any block-layer error
# in the kernel log (I/O errors, "is not a head", hung tasks).
# Two jobs (one per CPU, so both queues are used), each on its own half of the region,
# iodepth 16, O_DIRECT, libaio.
# Parameters: strata.fio_size=BYTES per job and round (default 4M, whole MiB),
# strata.fio_bs=BYTES (4096), strata.seed=N (1).
set -eu
# shellcheck source-path=SCRIPTDIR/../initramfs source=lib.sh
. /strata/lib.sh

size="$(dev_bytes)"
seed="$(param strata.seed 1)"
is_uint "$seed" || fail "strata.seed must be a number, not '$seed'"
per_job="$(param strata.fio_size $((4 * 1048576)))"
is_uint "$per_job" || fail "strata.fio_size must be bytes, not '$per_job'"
per_job=$(( per_job / 1048576 * 1048576 ))
[ "$per_job" -gt 0 ] || fail "strata.fio_size must be at least 1M"
bs="$(param strata.fio_bs 4096)"
is_uint "$bs" || fail "strata.fio_bs must be bytes, not '$bs'"
jobs=2
region=$(( per_job * jobs ))
regions=$(( size / region ))
[ "$regions" -ge 2 ] || fail "disk too small for two regions of $region bytes"

# The host's "stop" arrives on the console; reading it must not hold up the writes.
rm -f /tmp/stop
( read -r _line; : > /tmp/stop ) </dev/console &
reader=$!

wc="$(cat "/sys/block/$(strata_dev)/queue/write_cache")"
log "restart-fio: writing: $regions regions of $jobs x $per_job bytes, bs=$bs, seed=$seed, write cache: $wc"
round=0
while [ ! -e /tmp/stop ]; do
    r=$(( round % regions ))
    if [ "$round" -eq "$regions" ]; then
        log "restart-fio: every region written once; rewriting them (a bigger disk avoids it)"
    fi
    fio_checked "round $round (region $r)" "$bs" "$jobs" --name="round$round" --rw=randwrite \
        --offset=$(( r * region )) --size="$per_job" --offset_increment="$per_job" \
        --do_verify=1 --randrepeat=1 --randseed=$(( seed * 100000 + round ))
    round=$(( round + 1 ))
    log "restart-fio: round $round done (uptime $(cut -d' ' -f1 /proc/uptime)s)"
    check_dmesg
done
wait "$reader" 2>/dev/null || true
used=$(( round < regions ? round : regions ))
log "restart-fio: stop after $round rounds; verifying the $used regions written again"
# One pass over the regions written (each block's header names its offset, its data has a
# checksum): the order the blocks were written in does not matter.
half=$(( used * region / jobs ))
fio_checked "final verify" "$bs" "$jobs" --name=final --rw=write --size="$half" \
    --offset_increment="$half" --verify_only
check_dmesg
log "restart-fio: $round rounds written and verified, $used regions verified again"
