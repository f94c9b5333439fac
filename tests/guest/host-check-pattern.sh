#!/bin/bash
# Check on the host, not through strata, that an image holds the pattern the guest test
# write-pattern wrote: the same chunks and bytes (lib.sh's pattern_chunks and gen_pattern),
# read from the image file itself (a qcow2 image through qemu-img convert).
#
#   host-check-pattern.sh IMAGE FORMAT SEED LBS SIZE      (FORMAT: raw or qcow2)
#
# Exit 0 when every chunk matches.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
image="${1:?usage: host-check-pattern.sh IMAGE FORMAT SEED LBS SIZE}"
format="${2:?}" seed="${3:?}" lbs="${4:?}" size="${5:?}"

# lib.sh's fail() is for the guest; here it stops the check.
fail() { echo "host-check-pattern: $*" >&2; exit 1; }
# shellcheck source=initramfs/lib.sh
. "$here/initramfs/lib.sh"
fail() { echo "host-check-pattern: $*" >&2; exit 1; }

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
[[ $(stat -c %s "$raw") -ge $size ]] || fail "$image is smaller than $size bytes"

n=0
while read -r lba count; do
    gen_pattern "$seed" "$lba" $((count * lbs)) > "$tmp/want"
    dd if="$raw" of="$tmp/got" bs="$lbs" skip="$lba" count="$count" status=none
    cmp -s "$tmp/want" "$tmp/got" \
        || fail "$image: lba $lba (+$count blocks of $lbs) does not hold the guest's pattern"
    n=$((n + 1))
done < <(pattern_chunks "$lbs" "$size")
echo "host-check-pattern: $image holds the guest's pattern ($n chunks, seed $seed)"
