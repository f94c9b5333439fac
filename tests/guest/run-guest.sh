#!/bin/bash
# Boot a Linux guest (TCG) whose disk is a vhost-user-blk device on SOCKET,
# run one guest test, and report its result.
#
#   run-guest.sh --socket PATH --test NAME [--queues N] [--lbs N] [--size BYTES]
#                [--seed N] [--wc back|through] [--timeout SECS]
#                [--append "extra kernel params"] [--log PATH]
#                [--smp N] [--mem MiB] [--queue-size N] [--device-opts OPTS]
#                [--pidfile PATH] [--chardev-opts OPTS] [--stdin PATH] [--verbose]
#
# Exit 0 only when the guest console shows `STRATA-RESULT: PASS`.
#
# --queues N   num-queues of the vhost-user-blk-pci device (default: --smp,
#              which is QEMU's own default) and strata.expect_queues=N.
# --lbs N      strata.expect_lbs=N. The block size is NOT a property of
#              QEMU's vhost-user-blk-pci: the guest reads it from the
#              backend's config space (VIRTIO_BLK_F_BLK_SIZE), so the
#              backend must be started with it (QSD: logical-block-size=N on
#              the export); this only tells the guest what to expect.
# --size BYTES strata.expect_size=BYTES.  --seed N: strata.seed=N.
# --wc MODE    strata.expect_wc=MODE (write cache the guest should see).
# --device-opts OPTS  more properties of the vhost-user-blk-pci device, e.g.
#              event_idx=off.
# --pidfile PATH  QEMU writes its pid there (to kill it from outside).
# --chardev-opts OPTS  more options of the socket chardev, e.g. reconnect=1
#              (QEMU reconnects when the backend goes away).
# --stdin PATH QEMU's stdin (default /dev/null): what is written there reaches
#              the guest's console, so a FIFO lets the host talk to the test.
#
# Environment: STRATA_GUEST_DIR (default <repo>/target/guest) caches the
# initramfs (rebuilt when missing or older than the guest scripts) and holds
# logs/; QEMU (default qemu-system-x86_64); STRATA_GUEST_KERNEL to override
# the kernel (see kernel-path.sh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prog=run-guest
# shellcheck source-path=SCRIPTDIR source=host-lib.sh
. "$here/host-lib.sh"

socket="" test="" queues="" lbs="" size="" seed="" wc="" timeout_s=300
append="" log="" smp=2 mem=1024 queue_size="" device_opts="" pidfile="" verbose=0
chardev_opts="" stdin=/dev/null
while [[ $# -gt 0 ]]; do
    case "$1" in
        --socket) socket="${2:?}"; shift 2 ;;
        --test) test="${2:?}"; shift 2 ;;
        --queues) queues="${2:?}"; shift 2 ;;
        --lbs) lbs="${2:?}"; shift 2 ;;
        --size) size="${2:?}"; shift 2 ;;
        --seed) seed="${2:?}"; shift 2 ;;
        --wc) wc="${2:?}"; shift 2 ;;
        --timeout) timeout_s="${2:?}"; shift 2 ;;
        --append) append="${2?}"; shift 2 ;;
        --log) log="${2:?}"; shift 2 ;;
        --smp) smp="${2:?}"; shift 2 ;;
        --mem) mem="${2:?}"; shift 2 ;;
        --queue-size) queue_size="${2:?}"; shift 2 ;;
        --device-opts) device_opts="${2:?}"; shift 2 ;;
        --pidfile) pidfile="${2:?}"; shift 2 ;;
        --chardev-opts) chardev_opts="${2:?}"; shift 2 ;;
        --stdin) stdin="${2:?}"; shift 2 ;;
        --verbose|-v) verbose=1; shift ;;
        -h|--help) usage ;;
        *) unknown_argument "$1" ;;
    esac
done
[[ -n "$socket" && -n "$test" ]] || usage
if [[ ! -f "$here/tests/$test.sh" ]]; then
    have=("$here"/tests/*.sh)
    have=("${have[@]##*/}")
    die "no guest test '$test' (have: ${have[*]%.sh})"
fi
[[ -S "$socket" ]] || die "$socket is not a unix socket (is the backend running?)"
require_numbers "$timeout_s" "$smp" "$mem" ${queues:+"$queues"} ${lbs:+"$lbs"} ${size:+"$size"} \
    ${seed:+"$seed"}
queues="${queues:-$smp}"
qemu="${QEMU:-qemu-system-x86_64}"
command -v "$qemu" >/dev/null || die "$qemu not found (apt-get install qemu-system-x86 qemu-utils)"

mkdir -p "$gdir/logs"
kernel="$("$here/kernel-path.sh")"
kver="$("$here/kernel-path.sh" --version)"
initrd="$gdir/initramfs-$kver.cpio.gz"

# (Re)build the initramfs when missing or older than anything it is made of.
stale=0
if [[ ! -s "$initrd" ]]; then
    stale=1
elif [[ -n "$(find "$here/build-initramfs.sh" "$here/initramfs" "$here/tests" \
                  "$(command -v fio)" "$(command -v busybox)" -newer "$initrd" -print -quit)" ]]; then
    stale=1
fi
if [[ $stale -eq 1 ]]; then
    "$here/build-initramfs.sh" "$initrd" >/dev/null
fi

if [[ -z "$log" ]]; then
    log="$gdir/logs/$test-$(date +%Y%m%d-%H%M%S)-$$.log"
fi
mkdir -p "$(dirname "$log")"
echo "run-guest: test=$test socket=$socket queues=$queues log=$log"

# no_timer_check: under TCG on a busy host the kernel's check that the timer interrupt arrives
# through the IO-APIC can miss it and panic ("IO-APIC + timer doesn't work!").
cmdline="console=ttyS0 panic=-1 loglevel=4 no_timer_check strata.test=$test strata.expect_queues=$queues"
[[ -z "$lbs" ]] || cmdline+=" strata.expect_lbs=$lbs"
[[ -z "$size" ]] || cmdline+=" strata.expect_size=$size"
[[ -z "$seed" ]] || cmdline+=" strata.seed=$seed"
[[ -z "$wc" ]] || cmdline+=" strata.expect_wc=$wc"
[[ -z "$append" ]] || cmdline+=" $append"

dev="vhost-user-blk-pci,chardev=c0,num-queues=$queues"
[[ -z "$queue_size" ]] || dev+=",queue-size=$queue_size"
[[ -z "$device_opts" ]] || dev+=",$device_opts"

qemu_args=(
    -accel tcg -m "$mem" -smp "$smp" -nographic -no-reboot
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on"
    -numa "node,memdev=mem"
    -chardev "socket,id=c0,path=$socket${chardev_opts:+,$chardev_opts}"
    -device "$dev"
    -nic none
)
[[ -z "$pidfile" ]] || qemu_args+=(-pidfile "$pidfile")
{
    printf 'run-guest: %s' "$qemu"
    printf ' %q' "${qemu_args[@]}"
    printf '\n'
} > "$log"

start=$(date +%s.%N)
set +e
if [[ $verbose -eq 1 ]]; then
    timeout -k 10 "$timeout_s" "$qemu" "${qemu_args[@]}" <"$stdin" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
else
    timeout -k 10 "$timeout_s" "$qemu" "${qemu_args[@]}" <"$stdin" >>"$log" 2>&1
    rc=$?
fi
set -e
end=$(date +%s.%N)
secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

result="$(tr -d '\r' < "$log" | grep -a '^STRATA-RESULT: ' | tail -n1 || true)"
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    why="timed out after ${timeout_s}s"
elif [[ -z "$result" ]]; then
    why="no STRATA-RESULT line (qemu exit $rc)"
elif [[ "$result" == "STRATA-RESULT: PASS" && $rc -ne 0 ]]; then
    why="the guest passed, but qemu exited with status $rc"
elif [[ "$result" == "STRATA-RESULT: PASS" ]]; then
    echo "run-guest: $test PASS in ${secs}s (log $log)"
    exit 0
else
    why="${result#STRATA-RESULT: }"
fi
echo "run-guest: $test FAILED in ${secs}s: $why" >&2
echo "run-guest: last 40 lines of $log:" >&2
tail -n 40 "$log" | tr -d '\r' >&2
exit 1
