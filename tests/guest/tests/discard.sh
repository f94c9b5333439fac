#!/bin/sh
# shellcheck shell=sh
# DISCARD and WRITE_ZEROES from the guest: write a 2 MiB pattern a quarter into the disk,
# discard 512 KiB of it with blkdiscard and another 512 KiB with fio's trim, zero 256 KiB
# with BLKZEROOUT (the zeroout tool; virtio-blk sends WRITE_ZEROES), then check that those
# ranges read as zeroes (the test images have nothing below them: raw files punch holes,
# qcow2 frees or zeroes clusters over a zero backing file) and the rest still holds the
# pattern (lib.sh's discard_expect; host-check-discard.sh checks the image the same way).
# Needs an export that offers discard (the node's discard=unmap) and write-zeroes.
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
[ "$(cat "$q/write_zeroes_max_bytes")" -gt 0 ] || fail "the disk offers no write-zeroes"

mib=1048576
lba="$(discard_start_lba "$size" "$lbs")"
start=$(( lba * lbs ))
count=$(( 2 * mib / lbs ))
log "discard: seed=$seed lbs=$lbs, 2 MiB at byte $start"
gen_pattern "$seed" "$lba" $(( 2 * mib )) > /tmp/want
dd if=/tmp/want of="$dev" bs="$lbs" seek="$lba" count="$count" conv=notrunc,fsync \
    oflag=direct 2>/tmp/dd.err || fail "write failed: $(cat /tmp/dd.err)"

# Bytes [256K, 768K) by blkdiscard, [1M, 1.5M) by fio's trim, [1.625M, 1.875M) by BLKZEROOUT.
blkdiscard -o $(( start + mib / 4 )) -l $(( mib / 2 )) "$dev" \
    || fail "blkdiscard failed"
fio --name=trim --filename="$dev" --rw=trim --bs=64k --offset=$(( start + mib )) \
    --size=$(( mib / 2 )) --direct=1 --output=/tmp/fio.out \
    || fail "fio trim failed: $(cat /tmp/fio.out)"
zeroout "$dev" $(( start + mib + mib * 5 / 8 )) $(( mib / 4 )) 2>/tmp/zeroout.err \
    || fail "BLKZEROOUT failed: $(cat /tmp/zeroout.err)"
discard_expect /tmp/want > /tmp/expect
dd if="$dev" of=/tmp/got bs="$lbs" skip="$lba" count="$count" iflag=direct 2>/tmp/dd.err \
    || fail "read-back failed: $(cat /tmp/dd.err)"
cmp -s /tmp/expect /tmp/got \
    || fail "after the discards and zeroout the range differs from pattern/zeroes/pattern/zeroes/pattern/zeroes/pattern: $(cmp /tmp/expect /tmp/got 2>&1 | head -n 1)"
log "ok: discarded and zeroed ranges read as zeroes, the rest kept its data"
