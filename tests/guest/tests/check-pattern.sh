#!/bin/sh
# shellcheck shell=sh
# Check the pattern that write-pattern wrote (same strata.seed, same disk
# geometry) reads back unchanged, with O_DIRECT.
set -eu
# shellcheck source-path=SCRIPTDIR/../initramfs source=lib.sh
. /strata/lib.sh

dev="/dev/$(strata_dev)"
lbs="$(dev_lbs)"
size="$(dev_bytes)"
seed="$(param strata.seed 1)"
is_uint "$seed" || fail "strata.seed must be a number, not '$seed'"
log "check-pattern: seed=$seed lbs=$lbs disk=$size"

pattern_chunks "$lbs" "$size" > /tmp/chunks
bad=""
while read -r lba count; do
    gen_pattern "$seed" "$lba" $((count * lbs)) > /tmp/want
    dd if="$dev" of=/tmp/got bs="$lbs" skip="$lba" count="$count" iflag=direct 2>/tmp/dd.err \
        || fail "read of $count blocks at lba $lba failed: $(cat /tmp/dd.err)"
    if cmp -s /tmp/want /tmp/got; then
        log "ok: lba $lba +$count matches"
    else
        where="$(cmp /tmp/want /tmp/got 2>&1 | head -n1 || true)"
        log "MISMATCH at lba $lba +$count ($where): first bytes expected '$(head -c 32 /tmp/want)' got '$(head -c 32 /tmp/got | tr '\000-\037\177-\377' '.')'"
        bad="$bad $lba"
    fi
done < /tmp/chunks
[ -z "$bad" ] || fail "pattern mismatch at lba$bad (seed $seed)"
