#!/bin/sh
# shellcheck shell=sh
# DISCARD from the guest: write a 2 MiB pattern a quarter into the disk, discard 512 KiB of it
# with blkdiscard and another 512 KiB with fio's trim, then check that the discarded ranges
# read as zeroes (the test images have nothing below them: raw files punch holes, qcow2
# frees or zeroes clusters over a zero backing file) and the rest still holds the pattern.
# Needs an export that offers discard (the node's discard=unmap).
set -eu
# shellcheck source-path=SCRIPTDIR/../initramfs source=lib.sh
. /strata/lib.sh

dev="/dev/$(strata_dev)"
q="/sys/block/$(strata_dev)/queue"
lbs="$(dev_lbs)"
size="$(dev_bytes)"
seed="$(param strata.seed 1)"
is_uint "$seed" || fail "strata.seed must be a number, not '$seed'"
[ "$(cat "$q/discard_max_bytes")" -gt 0 ] || fail "the disk offers no discard"

mib=1048576
start=$(( size / 4 / mib * mib ))
lba=$(( start / lbs ))
count=$(( 2 * mib / lbs ))
log "discard: seed=$seed lbs=$lbs, 2 MiB at byte $start"
gen_pattern "$seed" "$lba" $(( 2 * mib )) > /tmp/want
dd if=/tmp/want of="$dev" bs="$lbs" seek="$lba" count="$count" conv=notrunc,fsync \
    oflag=direct 2>/tmp/dd.err || fail "write failed: $(cat /tmp/dd.err)"

# Bytes [256K, 768K) by blkdiscard, [1M, 1.5M) by fio's trim.
blkdiscard -o $(( start + mib / 4 )) -l $(( mib / 2 )) "$dev" \
    || fail "blkdiscard failed"
fio --name=trim --filename="$dev" --rw=trim --bs=64k --offset=$(( start + mib )) \
    --size=$(( mib / 2 )) --direct=1 --output=/tmp/fio.out \
    || fail "fio trim failed: $(cat /tmp/fio.out)"
dd if=/dev/zero of=/tmp/zero bs=$(( mib / 2 )) count=1 2>/dev/null
dd if=/tmp/want of=/tmp/expect bs=$(( mib / 4 )) count=1 2>/dev/null
cat /tmp/zero >> /tmp/expect
dd if=/tmp/want bs=$(( mib / 4 )) skip=3 count=1 2>/dev/null >> /tmp/expect
cat /tmp/zero >> /tmp/expect
dd if=/tmp/want bs=$(( mib / 2 )) skip=3 count=1 2>/dev/null >> /tmp/expect

dd if="$dev" of=/tmp/got bs="$lbs" skip="$lba" count="$count" iflag=direct 2>/tmp/dd.err \
    || fail "read-back failed: $(cat /tmp/dd.err)"
cmp -s /tmp/expect /tmp/got \
    || fail "after the discards the range differs from pattern/zeroes/pattern/zeroes/pattern: $(cmp /tmp/expect /tmp/got 2>&1 | head -n 1)"
log "ok: discarded ranges read as zeroes, the rest kept its data"
