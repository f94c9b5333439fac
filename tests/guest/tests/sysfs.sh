#!/bin/sh
# shellcheck shell=sh
# Check what the guest sees of the disk against the strata.expect_* kernel
# parameters; each check runs only when its parameter is given:
#   strata.expect_size=BYTES  strata.expect_lbs=N  strata.expect_pbs=N
#   strata.expect_queues=N    strata.expect_wc=back|through
#   strata.expect_ro=0|1
set -eu
# shellcheck source-path=SCRIPTDIR/../initramfs source=lib.sh
. /strata/lib.sh

dev="$(strata_dev)"
q="/sys/block/$dev/queue"
size="$(dev_bytes)"
lbs="$(cat "$q/logical_block_size")"
pbs="$(cat "$q/physical_block_size")"
nq="$(find "/sys/block/$dev/mq" -mindepth 1 -maxdepth 1 -type d | wc -l)"
wc="$(cat "$q/write_cache")"
ro="$(cat "/sys/block/$dev/ro")"
log "sysfs $dev: size=$size lbs=$lbs pbs=$pbs queues=$nq write_cache='$wc' ro=$ro"
log "sysfs $dev: max_sectors_kb=$(cat "$q/max_sectors_kb") max_segments=$(cat "$q/max_segments") discard_max_bytes=$(cat "$q/discard_max_bytes") write_zeroes_max_bytes=$(cat "$q/write_zeroes_max_bytes")"

checked=0
check() { # NAME GOT WANT
    checked=$((checked + 1))
    if [ "$2" != "$3" ]; then
        fail "$1 is '$2', expected '$3'"
    fi
    log "ok: $1 = $2"
}

if want="$(param strata.expect_size)"; then check size "$size" "$want"; fi
if want="$(param strata.expect_lbs)"; then check logical_block_size "$lbs" "$want"; fi
if want="$(param strata.expect_pbs)"; then check physical_block_size "$pbs" "$want"; fi
if want="$(param strata.expect_queues)"; then check queues "$nq" "$want"; fi
if want="$(param strata.expect_ro)"; then check ro "$ro" "$want"; fi
if want="$(param strata.expect_wc)"; then
    case "$want" in
        back) check write_cache "$wc" "write back" ;;
        through) check write_cache "$wc" "write through" ;;
        *) fail "strata.expect_wc must be back or through, not '$want'" ;;
    esac
fi
[ "$checked" -gt 0 ] || fail "no strata.expect_* parameter given, nothing checked"

# The device must also answer a read of its first and last block.
last=$((size / lbs - 1))
dd if="/dev/$dev" of=/dev/null bs="$lbs" count=1 iflag=direct 2>/dev/null \
    || fail "direct read of block 0 failed"
dd if="/dev/$dev" of=/dev/null bs="$lbs" skip="$last" count=1 iflag=direct 2>/dev/null \
    || fail "direct read of the last block ($last) failed"
log "ok: first and last block readable"
