#!/bin/sh
# shellcheck shell=sh
# fio random writes with crc32c verification on the whole-disk device.
# Block sizes: 512 and 4k when the logical block size is 512, else LBS and
# 2*LBS. Two jobs (one per CPU, so both queues are used), each on its own
# region, iodepth 16, O_DIRECT, libaio when it works here, else psync.
# Passes only if every request virtqueue raised interrupts during the run
# (when there are 2+ queues and 2+ CPUs).
# Parameters: strata.fio_size=BYTES per job and block size (default 64M for
# the large block size, a quarter of it for the small one; rounded down to
# whole MiB and clamped to half the disk), strata.fio_iodepth=N (16), strata.seed=N (1).
set -eu
# shellcheck source-path=SCRIPTDIR/../initramfs source=lib.sh
. /strata/lib.sh

dev="/dev/$(strata_dev)"
lbs="$(dev_lbs)"
size="$(dev_bytes)"
cpus="$(ncpus)"
seed="$(param strata.seed 1)"
is_uint "$seed" || fail "strata.seed must be a number, not '$seed'"
iodepth="$(param strata.fio_iodepth 16)"
is_uint "$iodepth" || fail "strata.fio_iodepth must be a number, not '$iodepth'"
jobs=2
per_job="$(param strata.fio_size $((64 * 1024 * 1024)))"
is_uint "$per_job" || fail "strata.fio_size must be bytes, not '$per_job'"
max=$(( size / jobs / 1048576 * 1048576 ))
[ "$max" -gt 0 ] || fail "disk too small for fio ($size bytes)"
[ "$per_job" -le "$max" ] || per_job="$max"
per_job=$(( per_job / 1048576 * 1048576 ))
[ "$per_job" -gt 0 ] || fail "strata.fio_size must be at least 1M"

if [ "$lbs" -eq 512 ]; then
    sizes="512 4096"
else
    sizes="$lbs $((lbs * 2))"
fi

# vq_irqs: "NAME COUNT" per request virtqueue of the disk (from /proc/interrupts)
vdev="$(basename "$(readlink -f "/sys/block/$(strata_dev)/device")")"
vq_irqs() {
    awk -v pfx="$vdev-req." 'index($NF, pfx) == 1 {
        n = 0
        for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) n += $i
        print $NF, n
    }' /proc/interrupts
}
vq_irqs > /tmp/irqs.before

engine=libaio
if ! out="$(fio --name=probe --filename="$dev" --ioengine=libaio --direct=1 \
        --rw=read --bs="$lbs" --size="$lbs" --output-format=terse 2>&1)"; then
    log "libaio does not work here, using psync: $out"
    engine=psync
fi
log "fio $(fio --version): engine=$engine lbs=$lbs disk=$size cpus=$cpus jobs=$jobs per_job=$per_job seed=$seed"

for bs in $sizes; do
    job_size=$per_job
    if [ "$bs" -lt 4096 ]; then
        # small blocks are slow under TCG: a quarter of the bytes
        job_size=$(( per_job / 4 / bs * bs ))
    fi
    [ "$job_size" -ge $((bs * 16)) ] || fail "fio size per job too small for bs=$bs"
    log "fio randwrite+verify bs=$bs size=$job_size x $jobs jobs"
    t0="$(cut -d' ' -f1 /proc/uptime)"
    rm -f /tmp/fio.out
    set +e
    fio --name="randwrite-bs$bs" --filename="$dev" --direct=1 \
        --ioengine="$engine" --iodepth="$iodepth" \
        --rw=randwrite --bs="$bs" --size="$job_size" \
        --numjobs="$jobs" --offset_increment="$job_size" \
        --cpus_allowed="0-$((cpus - 1))" --cpus_allowed_policy=split \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_dump=0 \
        --randrepeat=1 --randseed="$((seed + bs))" \
        --group_reporting --eta=never --output=/tmp/fio.out
    rc=$?
    set -e
    cat /tmp/fio.out 2>/dev/null || true
    t1="$(cut -d' ' -f1 /proc/uptime)"
    [ "$rc" -eq 0 ] || fail "fio bs=$bs exited $rc"
    if grep -Eq 'err= *[1-9]|verify: bad|bad magic|crc32c: verify failed' /tmp/fio.out; then
        fail "fio bs=$bs reported an error"
    fi
    log "ok: fio bs=$bs (${t0}s -> ${t1}s uptime)"
done

vq_irqs > /tmp/irqs.after
nvq="$(wc -l < /tmp/irqs.after)"
idle=""
while read -r name after; do
    before="$(awk -v n="$name" '$1 == n { print $2 }' /tmp/irqs.before)"
    log "virtqueue $name: $(( after - ${before:-0} )) interrupts during fio"
    [ "$after" -gt "${before:-0}" ] || idle="$idle $name"
done < /tmp/irqs.after
if [ "$nvq" -ge 2 ] && [ "$cpus" -ge 2 ] && [ -n "$idle" ]; then
    fail "request virtqueue(s)$idle completed nothing during fio"
fi
