#!/bin/sh
# shellcheck shell=sh
# Write a pattern derived from strata.seed (default 1) at a few places of the
# disk (start, an odd LBA, the middle, near the end, the last block) with
# O_DIRECT + fsync, then read it back with O_DIRECT and compare.
# check-pattern, on a later boot with the same seed, checks it persisted.
set -eu
# shellcheck source-path=SCRIPTDIR/../initramfs source=lib.sh
. /strata/lib.sh

dev="/dev/$(strata_dev)"
lbs="$(dev_lbs)"
size="$(dev_bytes)"
seed="$(param strata.seed 1)"
is_uint "$seed" || fail "strata.seed must be a number, not '$seed'"
log "write-pattern: seed=$seed lbs=$lbs disk=$size"

pattern_chunks "$lbs" "$size" > /tmp/chunks
while read -r lba count; do
    gen_pattern "$seed" "$lba" $((count * lbs)) > /tmp/want
    dd if=/tmp/want of="$dev" bs="$lbs" seek="$lba" count="$count" \
        conv=notrunc,fsync oflag=direct 2>/tmp/dd.err \
        || fail "write of $count blocks at lba $lba failed: $(cat /tmp/dd.err)"
done < /tmp/chunks
sync

while read -r lba count; do
    gen_pattern "$seed" "$lba" $((count * lbs)) > /tmp/want
    dd if="$dev" of=/tmp/got bs="$lbs" skip="$lba" count="$count" iflag=direct 2>/tmp/dd.err \
        || fail "read of $count blocks at lba $lba failed: $(cat /tmp/dd.err)"
    cmp -s /tmp/want /tmp/got || fail "read-back of lba $lba (+$count) differs from what was written"
    log "ok: lba $lba +$count written and read back"
done < /tmp/chunks
