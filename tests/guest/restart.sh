#!/usr/bin/env bash
# Restart the backend under a running guest: a Linux guest whose vhost-user-blk chardev has
# reconnect=1 runs verified random writes (the restart-fio guest test) while the backend is
# killed and started again on the same socket, RESTARTS times at 1-2 s intervals. Passes when
# the guest passes (every fio round and the final verify of every region clean, no block-layer
# error in its kernel log), its console shows no such error either, every backend instance was
# connected to by QEMU before it was killed, each SIGTERM'd daemon exited with status 0, and,
# for qcow2, `qemu-img check` finds no corruption (leaks are allowed: a killed daemon may leave
# allocated clusters nothing points to).
#
#   restart.sh BACKEND [--format raw|qcow2] [--queues N] [--signal KILL|TERM]
#              [--restarts N] [--cache through|back] [--size BYTES] [--keep]
#
# BACKEND      the strata binary, or `qsd` for qemu-storage-daemon (same options; to compare).
# --format     the image format (default raw); the image is a file opened with O_DIRECT.
# --queues     num-queues of the export and the device (default 2; the guest has 2 vCPUs).
# --signal     KILL (a crash) or TERM (an upgrade: drain, flush, exit, start the new binary).
# --restarts   how many times the backend is restarted (default 10).
# --cache      the export's write cache: through (writethrough=on, the default: every
#              completed write is durable, so a killed daemon may not lose it) or back
#              (writethrough=off; the guest does not flush, so with a write-back cache a
#              killed daemon may lose completed writes and fail the verify legitimately:
#              for SIGTERM, or to see what QSD's default does).
# --size       the image size in bytes (default 256 MiB).
# --keep       keep the work directory (image, logs) and print where it is.
#
# Logs go to $STRATA_GUEST_DIR/logs (the guest's console, default <repo>/target/guest/logs)
# and the work directory (each backend instance's log). Exit 0 on pass, 1 on fail, 2 on usage.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prog=restart
# shellcheck source-path=SCRIPTDIR source=host-lib.sh
. "$here/host-lib.sh"

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage ;; esac
backend="$1"; shift
format=raw queues=2 signal=KILL restarts=10 cache=through size=$((256 << 20)) keep=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --format) format="${2:?}"; shift 2 ;;
        --queues) queues="${2:?}"; shift 2 ;;
        --signal) signal="${2:?}"; shift 2 ;;
        --restarts) restarts="${2:?}"; shift 2 ;;
        --cache) cache="${2:?}"; shift 2 ;;
        --size) size="${2:?}"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) usage ;;
        *) unknown_argument "$1" ;;
    esac
done
[[ "$format" == raw || "$format" == qcow2 ]] || die "--format must be raw or qcow2"
[[ "$signal" == KILL || "$signal" == TERM ]] || die "--signal must be KILL or TERM"
[[ "$cache" == through || "$cache" == back ]] || die "--cache must be through or back"
require_numbers "$queues" "$restarts" "$size"
if [[ "$backend" == qsd ]]; then
    daemon=(qemu-storage-daemon)
    command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon not found"
else
    [[ -x "$backend" ]] || die "$backend is not an executable (the strata binary, or qsd)"
    daemon=("$(realpath "$backend")")
fi

mkdir -p "$gdir/logs"
export STRATA_GUEST_DIR="$gdir"
work="$(mktemp -d /tmp/strata-restart.XXXXXX)"
label="$( [[ "$backend" == qsd ]] && echo qsd || echo strata )-$format-${queues}q-$signal"
guest_log="$gdir/logs/restart-$label-$(date +%Y%m%d-%H%M%S)-$$.log"
sock="$work/vm.sock" pidfile="$work/daemon.pid" image="$work/disk.$format"
daemon_pid="" guest_pid="" instance=0

note() { echo "restart: $*"; }

cleanup() {
    exec 3>&- 2>/dev/null || true
    if [[ -s "$work/qemu.pid" ]]; then
        kill -KILL "$(cat "$work/qemu.pid")" 2>/dev/null || true
    fi
    if [[ -n "$guest_pid" ]]; then
        wait "$guest_pid" 2>/dev/null || true
    fi
    if [[ -n "$daemon_pid" ]]; then
        kill -KILL "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [[ $keep -eq 1 ]]; then
        note "work directory kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# start_daemon: starts backend instance number $instance (its own log); sets daemon_pid once it
# listens (its pidfile is written after the export listens; the socket file alone may be the
# stale one of a killed instance).
start_daemon() {
    instance=$((instance + 1))
    local log="$work/daemon-$instance.log"
    rm -f "$pidfile"
    "${daemon[@]}" \
        --blockdev "driver=file,node-name=f0,filename=$image,aio=io_uring,cache.direct=on" \
        --blockdev "driver=$format,node-name=d0,file=f0" \
        --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues,writethrough=$([[ $cache == through ]] && echo on || echo off)" \
        --pidfile "$pidfile" >"$log" 2>&1 &
    daemon_pid=$!
    for _ in $(seq 200); do
        [[ -s "$pidfile" ]] && return 0
        kill -0 "$daemon_pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "restart: backend instance $instance did not start; its log:" >&2
    cat "$log" >&2
    return 1
}

# frontend_connected: whether a connection to the socket is established (the backend's side of
# an accepted connection carries the socket's path in /proc/net/unix, state 03).
frontend_connected() {
    awk -v p="$sock" '$NF == p && $6 == "03" { found = 1 } END { exit !found }' /proc/net/unix
}

guest_running() { kill -0 "$guest_pid" 2>/dev/null; }

# Lines of a guest console log that are block-layer errors (the guest test looks for the same).
guest_errors() {
    tr -d '\r' < "$guest_log" \
        | grep -aEi 'I/O error|is not a head|blk_update_request|print_req_error|virtio_blk.*(error|fail)|blocked for more than|hung_task|verify: bad|bad magic|crc32c: verify failed' \
        || true
}

if [[ "$format" == qcow2 ]]; then
    qemu-img create -q -f qcow2 "$image" "$size"
else
    truncate -s "$size" "$image"
fi
start_daemon

note "$label: $restarts restarts with SIG$signal, cache $cache; guest log $guest_log"
mkfifo "$work/console"
# Held open read-write so that neither QEMU's open nor ours blocks, and QEMU never sees EOF.
exec 3<>"$work/console"
"$here/run-guest.sh" --socket "$sock" --test restart-fio --queues "$queues" --size "$size" \
    --seed 5 --timeout 900 --log "$guest_log" --pidfile "$work/qemu.pid" \
    --chardev-opts reconnect=1 --stdin "$work/console" >"$work/run-guest.out" 2>&1 &
guest_pid=$!

fail() {
    echo "restart: $label FAILED: $*" >&2
    if guest_running; then
        echo "restart: the guest is still running" >&2
    else
        echo "restart: the guest has exited; run-guest.sh said:" >&2
        sed 's/^/    /' "$work/run-guest.out" >&2
    fi
    local errors
    errors="$(guest_errors)"
    if [[ -n "$errors" ]]; then
        echo "restart: the guest's error lines:" >&2
        head -n 20 <<<"$errors" | sed 's/^/    /' >&2
    fi
    echo "restart: last 30 lines of the guest log ($guest_log):" >&2
    tail -n 30 "$guest_log" | tr -d '\r' | sed 's/^/    /' >&2
    echo "restart: warnings and errors of the backend instances (of $instance):" >&2
    grep -aE 'WARN|ERROR|rror' "$work"/daemon-*.log | head -n 20 | sed "s|^$work/|    |" >&2 || true
    exit 1
}

rounds_at() {
    local n
    n="$(grep -ac 'restart-fio: round .* done' "$guest_log" 2>/dev/null)" || true
    echo "${n:-0}"
}
# A first round written and verified before any restart: the final verify covers data from
# before the restarts too. Time for two boots (run-guest.sh boots a stalled guest again) and
# the round.
first_round_s=$((2 * ${STRATA_GUEST_BOOT_TIMEOUT:-120} + 60))
for _ in $(seq $((first_round_s * 10))); do
    (($(rounds_at) > 0)) && break
    guest_running || break
    sleep 0.1
done
(($(rounds_at) > 0)) || fail "the guest did not finish a first fio round within $first_round_s s"
grep -a 'restart-fio: writing' "$guest_log" | tr -d '\r' | sed 's/^\[strata\] /restart: guest: /'

rounds_before="$(rounds_at)"
downtimes=()
for i in $(seq "$restarts"); do
    # 1-2 s of I/O against this instance.
    sleep "1.$(printf '%03d' $((RANDOM % 1000)))"
    guest_running || fail "the guest stopped during restart $i"
    [[ -z "$(guest_errors)" ]] || fail "the guest shows errors after $((i - 1)) restart(s)"
    frontend_connected || fail "QEMU was not connected to backend instance $instance when restart $i was due"
    t0=$(date +%s%N)
    kill "-$signal" "$daemon_pid"
    rc=0
    # (braces: the shell's "Killed" job report goes to /dev/null, not the test's output)
    { wait "$daemon_pid"; } 2>/dev/null || rc=$?
    daemon_pid=""
    if [[ "$signal" == TERM && $rc -ne 0 ]]; then
        fail "backend instance $instance exited with status $rc after SIGTERM"
    fi
    start_daemon || fail "backend instance $instance did not start"
    for _ in $(seq 600); do
        frontend_connected && break
        guest_running || break
        sleep 0.05
    done
    frontend_connected || fail "QEMU did not reconnect to backend instance $instance within 30 s"
    downtimes+=("$(( ($(date +%s%N) - t0) / 1000000 ))")
done
# The last instance serves I/O for a while before the guest is told to stop.
sleep 1.5
rounds_during=$(( $(rounds_at) - rounds_before ))
note "restarts done (kill to reconnect, ms: ${downtimes[*]}); $rounds_during fio rounds finished meanwhile; telling the guest to stop"
echo stop >&3

# The guest finishes its round, then verifies every region again, logging each step: a guest
# that logs nothing for two minutes has I/O that hangs.
progress_at() { grep -ac 'restart-fio: ' "$guest_log" 2>/dev/null || true; }
last_progress="$(progress_at)" idle=0
while guest_running; do
    [[ -z "$(guest_errors)" ]] || fail "the guest shows errors after the last restart"
    sleep 1
    now="$(progress_at)"
    if [[ "$now" != "$last_progress" ]]; then
        last_progress="$now" idle=0
    elif ((++idle >= 120)); then
        fail "the guest made no progress for 120 s after being told to stop (its I/O hangs)"
    fi
done
rc=0
wait "$guest_pid" || rc=$?
guest_pid=""
rm -f "$work/qemu.pid"
((rc == 0)) || fail "the guest test failed: $(grep -a 'FAILED' "$work/run-guest.out" | head -n1)"
errors="$(guest_errors)"
[[ -z "$errors" ]] || fail "the guest passed but its console shows errors"
grep -a 'restart-fio: .* rounds written' "$guest_log" | tr -d '\r' | sed 's/^\[strata\] /restart: guest: /'

kill -TERM "$daemon_pid"
rc=0
wait "$daemon_pid" || rc=$?
daemon_pid=""
((rc == 0)) || fail "the last backend instance exited with status $rc after SIGTERM"
if [[ "$format" == qcow2 ]]; then
    rc=0
    qemu-img check "$image" >"$work/check.out" 2>&1 || rc=$?
    # 0: clean, 3: leaked clusters only.
    if ((rc != 0 && rc != 3)); then
        cat "$work/check.out" >&2
        fail "qemu-img check: exit $rc"
    fi
    note "qemu-img check: $(grep -aE 'No errors|leaked' "$work/check.out" | head -n1)"
fi
note "$label PASS"
