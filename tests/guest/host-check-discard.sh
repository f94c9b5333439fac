#!/bin/bash
# Check on the host, not through strata, that an image holds what the guest test discard left
# in its range: the pattern where it wrote it, zeroes where it discarded (blkdiscard, fio trim)
# and zeroed (BLKZEROOUT), per lib.sh's discard_start_lba and discard_expect, read from the
# image file itself (a qcow2 image through qemu-img convert).
#
#   host-check-discard.sh IMAGE FORMAT SEED LBS SIZE      (FORMAT: raw or qcow2)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="${1:?usage: host-check-discard.sh IMAGE FORMAT SEED LBS SIZE}"
format="${2:?}" seed="${3:?}" lbs="${4:?}" size="${5:?}"

# shellcheck source=initramfs/lib.sh
. "$here/initramfs/lib.sh"
fail() { echo "host-check-discard: $*" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
raw="$image"
case "$format" in
    raw) ;;
    qcow2)
        raw="$tmp/image.raw"
        qemu-img convert -U -f qcow2 -O raw "$image" "$raw"
        ;;
    *) fail "unknown format '$format'" ;;
esac
lba="$(discard_start_lba "$size" "$lbs")"
gen_pattern "$seed" "$lba" 2097152 > "$tmp/pattern"
discard_expect "$tmp/pattern" > "$tmp/want"
dd if="$raw" of="$tmp/got" bs="$lbs" skip="$lba" count=$(( 2097152 / lbs )) status=none
cmp -s "$tmp/want" "$tmp/got" \
    || fail "$image: the discard test's range (lba $lba, 2 MiB) differs: $(cmp "$tmp/want" "$tmp/got" 2>&1 | head -n 1)"
echo "host-check-discard: $image holds the discard test's pattern and zeroes"
