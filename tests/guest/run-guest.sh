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
# the kernel (see kernel-path.sh); STRATA_GUEST_BOOT_TIMEOUT (default 120) the
# seconds a boot may take to reach init before it is retried, once.
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

# A boot that stalls after the kernel's EDD probe and before init's first line is booted again,
# once. Until init the disk serves only the firmware's reads (SeaBIOS's, and the kernel's EDD
# probe through it), all done when the kernel prints "Probing EDD ... ok"; the virtio drivers are
# modules that init loads. So a stall in between is the emulator's, not the backend's (seen once
# in about a dozen CI runs: a TCG guest silent for 180 s after "Probing EDD"). A stall before it
# is not retried. The log keeps both attempts and the stalled vCPUs' registers.
boot_timeout_s="${STRATA_GUEST_BOOT_TIMEOUT:-120}"
require_numbers "$boot_timeout_s"
qmp_dir="$(mktemp -d /tmp/run-guest.XXXXXX)"
trap 'rm -rf "$qmp_dir"' EXIT
qemu_args+=(-qmp "unix:$qmp_dir/qmp.sock,server=on,wait=off")

# this_boot: the log from the current attempt on.
this_boot() { tail -c +$((boot_start + 1)) "$log"; }
# reached_init: whether init's first line is there (anywhere in a line: the kernel's last console
# output before it ends without a newline).
reached_init() { this_boot | grep -aqF '[strata] init: '; }
# past_firmware_io: whether the kernel has printed the "ok" of its EDD probe, the last disk
# access before init.
past_firmware_io() { this_boot | grep -aqF 'Probing EDD (edd=off to disable)... o'; }

# stalled_vcpus_to_log: QEMU's run state and every vCPU's registers, into the log.
stalled_vcpus_to_log() {
    {
        echo "run-guest: QEMU's state at the stall:"
        "$here/qmp-command.py" "$qmp_dir/qmp.sock" query-status || true
        "$here/qmp-command.py" "$qmp_dir/qmp.sock" human-monitor-command \
            '{"command-line": "info registers -a"}' |
            python3 -c 'import json, sys; print(json.load(sys.stdin))' || true
    } >>"$log" 2>&1
}

start=$(date +%s.%N)
attempt=1
while :; do
    boot_start=$(stat -c %s "$log")
    timeout -k 10 "$timeout_s" "$qemu" "${qemu_args[@]}" <"$stdin" >>"$log" 2>&1 &
    qemu_job=$!
    [[ $verbose -eq 0 ]] || tail -c +$((boot_start + 1)) -f --pid="$qemu_job" "$log" &
    boot_deadline=$((SECONDS + boot_timeout_s))
    while kill -0 "$qemu_job" 2>/dev/null && ! reached_init && ((SECONDS < boot_deadline)); do
        sleep 0.2
    done
    if kill -0 "$qemu_job" 2>/dev/null && ! reached_init; then
        stalled_vcpus_to_log
        kill "$qemu_job" 2>/dev/null || true
        wait "$qemu_job" 2>/dev/null || true
        stall="the guest did not reach init within ${boot_timeout_s}s (attempt $attempt)"
        echo "run-guest: $stall" | tee -a "$log" >&2
        if ! past_firmware_io; then
            stall+=", nor the end of the firmware's disk reads (not booted again)"
        elif ((attempt == 1)); then
            attempt=2
            echo "run-guest: booting the guest again" | tee -a "$log" >&2
            continue
        fi
        rc=stall
        break
    fi
    set +e
    wait "$qemu_job"
    rc=$?
    set -e
    break
done
end=$(date +%s.%N)
secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

result="$(tr -d '\r' < "$log" | grep -a '^STRATA-RESULT: ' | tail -n1 || true)"
if [[ $rc == stall ]]; then
    why="$stall"
elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
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
