#!/bin/bash
# Print the host kernel used for guest tests, and its version.
#
#   kernel-path.sh            -> /boot/vmlinuz-6.1.0-56-amd64
#   kernel-path.sh --version  -> 6.1.0-56-amd64
#
# Picks the newest /boot/vmlinuz-* (version sort) that has a matching
# /lib/modules/VER/kernel directory, because the initramfs needs that
# kernel's virtio modules. Override with STRATA_GUEST_KERNEL=/path/to/vmlinuz
# (then STRATA_GUEST_KVER must name its /lib/modules directory, or it is taken
# from the file name).
set -euo pipefail

pick() {
    if [[ -n "${STRATA_GUEST_KERNEL:-}" ]]; then
        local k="$STRATA_GUEST_KERNEL"
        local v="${STRATA_GUEST_KVER:-$(basename "$k")}"
        v="${v#vmlinuz-}"
        [[ -r "$k" ]] || { echo "kernel-path: $k is not readable" >&2; return 1; }
        printf '%s %s\n' "$k" "$v"
        return 0
    fi
    local k v
    # newest first
    while IFS= read -r k; do
        v="${k#/boot/vmlinuz-}"
        if [[ -r "$k" && -d "/lib/modules/$v/kernel" ]]; then
            printf '%s %s\n' "$k" "$v"
            return 0
        fi
    done < <(compgen -G '/boot/vmlinuz-*' | sort -rV)
    echo "kernel-path: no /boot/vmlinuz-* with a matching /lib/modules/VER/kernel" \
         "(apt-get install linux-image-amd64)" >&2
    return 1
}

read -r kernel kver < <(pick) || exit 1
[[ -n "${kernel:-}" ]] || exit 1
case "${1:-}" in
    --version) echo "$kver" ;;
    "") echo "$kernel" ;;
    *) echo "usage: $0 [--version]" >&2; exit 2 ;;
esac
