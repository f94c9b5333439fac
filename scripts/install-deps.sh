#!/usr/bin/env bash
# Installs the Debian packages strata's tests use: QEMU (guests, qemu-storage-daemon,
# qemu-img), a kernel and busybox for the test guest, fio, and util-linux for loop devices.
# qemu-utils is named together with qemu-system-x86 so that an upgrade or downgrade of one
# never removes the other.
set -euo pipefail

packages=(qemu-system-x86 qemu-utils linux-image-amd64 busybox-static fio util-linux xz-utils cpio)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: missing packages: ${missing[*]} (run as root: sudo $0)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${packages[@]}"
