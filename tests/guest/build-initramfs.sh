#!/bin/bash
# Build the guest test initramfs from files of this host.
#
#   build-initramfs.sh OUT.cpio.gz
#
# Contents: busybox-static (with applet symlinks), fio plus every library
# `ldd` lists and the dynamic loader, the virtio modules for the chosen kernel
# (decompressed when the host ships them compressed), /init and the guest
# tests from tests/guest/tests/*.sh (as /tests/NAME.sh).
#
# OUT ending in .gz is gzip'ed, .zst zstd'ed, anything else is a plain cpio.
# The kernel the initramfs belongs to is printed on stdout as
# `KERNEL=/boot/vmlinuz-VER` (same as tests/guest/kernel-path.sh).
# No network; takes a few seconds; always rebuilds (run-guest.sh decides
# when a cached image is stale).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { echo "usage: $0 OUT.cpio.gz" >&2; exit 2; }
[[ $# -eq 1 ]] || usage
out="$1"
case "$out" in -*) usage ;; esac

note() { echo "build-initramfs: $*" >&2; }
die() { note "error: $*"; exit 1; }

kernel="$("$here/kernel-path.sh")"
kver="$("$here/kernel-path.sh" --version)"
moddir="/lib/modules/$kver"
[[ -d "$moddir/kernel" ]] || die "$moddir/kernel not found"

busybox="$(command -v busybox || true)"
[[ -n "$busybox" ]] || die "busybox not found (apt-get install busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked (apt-get install busybox-static)"
fi
fio="$(command -v fio || true)"
[[ -n "$fio" ]] || die "fio not found (apt-get install fio)"

stage="$(mktemp -d "${TMPDIR:-/tmp}/strata-initramfs.XXXXXX")"
tmpout=""
cleanup() {
    rm -rf "$stage"
    if [[ -n "$tmpout" ]]; then rm -f "$tmpout"; fi
}
trap cleanup EXIT

# --- directory skeleton, mirroring the host's merged-/usr symlinks ---------
mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,proc,sys,dev,tmp,run,root,tests,strata}
for top in bin sbin lib lib64; do
    if [[ -L "/$top" ]]; then
        ln -s "$(readlink "/$top")" "$stage/$top"
    else
        mkdir -p "$stage/$top"
    fi
done

# copy FILE into the stage at the same path (following symlinks for content)
copy_host_file() {
    local src="$1" dst="$stage$1"
    [[ -e "$dst" ]] && return 0
    mkdir -p "$(dirname "$dst")"
    cp -L "$src" "$dst"
}

# --- busybox and its applets ------------------------------------------------
cp -L "$busybox" "$stage/bin/busybox"
while IFS= read -r applet; do
    [[ -n "$applet" ]] || continue
    dst="$stage/$applet"
    [[ -e "$dst" || -L "$dst" ]] && continue
    [[ -d "${dst%/*}" ]] || mkdir -p "${dst%/*}"
    ln -s /bin/busybox "$dst"
done < <("$busybox" --list-full)

# --- fio and its libraries ------------------------------------------------
copy_host_file "$fio"
nlibs=0
while IFS= read -r lib; do
    copy_host_file "$lib"
    nlibs=$((nlibs + 1))
done < <(ldd "$fio" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
[[ $nlibs -gt 0 ]] || die "ldd listed no libraries for $fio"

# --- kernel modules -------------------------------------------------------
# Wanted modules in load order; their dependencies (from modules.dep) are
# added before them. Built-in modules are skipped, absent ones reported.
wanted=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)
declare -A modpath=()   # name -> path relative to $moddir
declare -A moddeps=()   # name -> space separated dep names
declare -A builtin=()
# modname PATH: sets $mn to the module name (no fork: modules.dep is long)
modname() { mn="${1##*/}"; mn="${mn%%.ko*}"; mn="${mn//-/_}"; }
while IFS= read -r line; do
    m="${line%%:*}"
    modname "$m"
    n="$mn"
    modpath[$n]="$m"
    deps=""
    for d in ${line#*:}; do modname "$d"; deps+=" $mn"; done
    moddeps[$n]="$deps"
done < "$moddir/modules.dep"
if [[ -r "$moddir/modules.builtin" ]]; then
    while IFS= read -r m; do modname "$m"; builtin[$mn]=1; done < "$moddir/modules.builtin"
fi

order=()
declare -A seen=()
resolve() {
    local n="$1" d
    [[ -n "${seen[$n]:-}" ]] && return 0
    seen[$n]=1
    if [[ -n "${builtin[$n]:-}" ]]; then
        note "module $n is built into $kver, skipped"
        return 0
    fi
    if [[ -z "${modpath[$n]:-}" ]]; then
        note "module $n not found for $kver, skipped"
        return 0
    fi
    for d in ${moddeps[$n]}; do resolve "$d"; done
    order+=("$n")
}
for n in "${wanted[@]}"; do resolve "$n"; done

mkdir -p "$stage/lib/modules/strata"
: > "$stage/etc/strata-modules"
for n in "${order[@]}"; do
    src="$moddir/${modpath[$n]}"
    dst="$stage/lib/modules/strata/$n.ko"
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" > "$dst" ;;
        *.ko.zst) zstd -qdc "$src" > "$dst" ;;
        *.ko.gz) gzip -dc "$src" > "$dst" ;;
        *) die "unknown module format: $src" ;;
    esac
    echo "/lib/modules/strata/$n.ko" >> "$stage/etc/strata-modules"
done
if ! grep -q virtio_blk "$stage/etc/strata-modules" && [[ -z "${builtin[virtio_blk]:-}" ]]; then
    die "virtio_blk is neither a module nor built in for $kver"
fi

# --- init, helpers, tests ---------------------------------------------------
install -m 0755 "$here/initramfs/init" "$stage/init"
install -m 0644 "$here/initramfs/lib.sh" "$stage/strata/lib.sh"
# BLKZEROOUT for the discard test (busybox cannot issue it): a static C tool.
command -v gcc >/dev/null || die "gcc not found (apt-get install gcc libc6-dev)"
gcc -static -O2 -Wall -Wextra -Werror -o "$stage/bin/zeroout" "$here/initramfs/zeroout.c" \
    || die "could not build zeroout.c (static: needs libc6-dev's libc.a)"
ntests=0
for t in "$here"/tests/*.sh; do
    [[ -e "$t" ]] || continue
    install -m 0755 "$t" "$stage/tests/$(basename "$t")"
    ntests=$((ntests + 1))
done
echo "$kver" > "$stage/etc/strata-kver"

# /dev/console lets the kernel give /init its stdio before devtmpfs is
# mounted (needs root; /init reopens the console itself anyway).
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true

# --- pack ----------------------------------------------------------------
mkdir -p "$(dirname "$out")"
tmpout="$(mktemp "$(dirname "$out")/.$(basename "$out").XXXXXX")"
if cpio --version 2>/dev/null | grep -q GNU; then
    cpio_cmd=(cpio -o -H newc -R 0:0 --quiet)
else
    cpio_cmd=("$busybox" cpio -o -H newc)
fi
case "$out" in
    *.gz) compress=(gzip -1 -n) ;;
    *.zst) compress=(zstd -q -3 -T0) ;;
    *) compress=(cat) ;;
esac
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "${cpio_cmd[@]}") | "${compress[@]}" > "$tmpout"
chmod 0644 "$tmpout"
mv -f "$tmpout" "$out"
tmpout=""

note "wrote $out ($(du -h "$out" | cut -f1); kernel $kver; modules: ${order[*]:-none}; $nlibs libs; $ntests tests)"
echo "KERNEL=$kernel"
