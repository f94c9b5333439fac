#!/usr/bin/env bash
# Installs what strata's tests need on Debian 12 (as root): QEMU (test guests,
# qemu-storage-daemon, qemu-img), a kernel, busybox-static and fio for the test guest,
# cpio to pack it, gcc and libc6-dev for its static BLKZEROOUT tool, and QEMU's Python QMP
# client (qemu.qmp, from PyPI) for the QMP tests, and Ceph 16 (monitor, manager, OSD, the
# ceph and rbd tools, librbd-dev to link the rbd driver) for scripts/ceph-test-cluster.sh and
# the rbd tests. Does nothing when everything is already there.
#
# qemu-system-x86 and qemu-utils must come in ONE apt-get command and at the SAME version:
# these machines may ship a newer (backported) qemu-utils whose Breaks: on qemu-system-common
# makes a plain `apt-get install qemu-system-x86 qemu-utils` fail ("held broken packages").
# So the qemu packages are pinned to the version apt would install for qemu-system-x86,
# downgrading qemu-utils (qemu-img, qemu-storage-daemon) when needed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

have_all() {
    python3 -c 'import qemu.qmp' 2>/dev/null && command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null \
        && command -v qemu-storage-daemon >/dev/null && command -v fio >/dev/null \
        && command -v cpio >/dev/null && command -v losetup >/dev/null \
        && command -v gcc >/dev/null && [[ -e /usr/lib/x86_64-linux-gnu/libc.a ]] \
        && busybox --list 2>/dev/null | grep -x insmod >/dev/null \
        && ! ldd "$(command -v busybox)" >/dev/null 2>&1 \
        && "$here/../tests/guest/kernel-path.sh" >/dev/null 2>&1 \
        && command -v ceph-mon >/dev/null && command -v ceph-mgr >/dev/null \
        && command -v ceph-osd >/dev/null && command -v rbd >/dev/null \
        && [[ -e /usr/include/rbd/librbd.h ]]
}
if have_all; then
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: packages are missing; run as root: sudo $0" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
v="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')"
[[ -n "$v" && "$v" != "(none)" ]] || { echo "install-deps: no qemu-system-x86 candidate" >&2; exit 1; }
apt-get install -y -q --allow-downgrades \
    "qemu-system-x86=$v" "qemu-system-common=$v" "qemu-utils=$v" "qemu-block-extra=$v" \
    linux-image-amd64 busybox-static fio cpio util-linux gcc libc6-dev \
    ceph ceph-mon ceph-osd ceph-mgr librbd-dev
# QEMU's QMP client library, for the QMP conformance tests (tests/qmp.rs).
python3 -c 'import qemu.qmp' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore qemu.qmp
have_all || { echo "install-deps: still missing something after apt-get" >&2; exit 1; }
echo "install-deps: done (qemu $v)"
