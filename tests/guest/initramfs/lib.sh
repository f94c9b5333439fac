# shellcheck shell=sh
# Helpers for guest tests (sourced as /strata/lib.sh inside the guest).

# param NAME [DEFAULT]: value of NAME=VALUE on the kernel command line (the
# last one wins); DEFAULT when absent; returns 1 when absent and no default.
param() {
    _p_val=""
    _p_found=0
    # shellcheck disable=SC2013 # words, not lines
    for _p_w in $(cat /proc/cmdline); do
        case "$_p_w" in
            "$1="*) _p_val="${_p_w#*=}"; _p_found=1 ;;
        esac
    done
    if [ "$_p_found" = 1 ]; then
        echo "$_p_val"
        return 0
    fi
    if [ $# -ge 2 ]; then
        echo "$2"
        return 0
    fi
    return 1
}

log() { echo "[strata] $*"; }

# fail REASON: record the reason for /init and end the test.
fail() {
    echo "[strata] FAIL: $*"
    echo "$*" > /tmp/strata-fail-reason
    exit 1
}

# is_uint VALUE
is_uint() {
    case "$1" in
        ''|*[!0-9]*) return 1 ;;
        *) return 0 ;;
    esac
}

# The block device under test (default vda) and its geometry.
strata_dev() { param strata.dev vda; }
dev_lbs() { cat "/sys/block/$(strata_dev)/queue/logical_block_size"; }
dev_bytes() { echo $(( $(cat "/sys/block/$(strata_dev)/size") * 512 )); }
ncpus() { grep -c '^processor' /proc/cpuinfo; }

# pattern_chunks LBS BYTES: "LBA COUNT" lines (in LBS units) where the
# pattern tests write: start of the disk, an odd LBA (not 4k-aligned when
# LBS is 512), the middle, the end, and the very last block.
pattern_chunks() {
    _n=$(( $2 / $1 ))
    if [ "$_n" -lt 64 ]; then
        fail "device too small for the pattern test ($_n blocks of $1)"
    fi
    echo "0 4"
    echo "9 3"
    echo "$(( _n / 2 + 1 )) 5"
    echo "$(( _n - 9 )) 7"
    echo "$(( _n - 1 )) 1"
}

# gen_pattern SEED LBA BYTES: deterministic text derived from SEED and LBA,
# exactly BYTES long (BYTES a multiple of 64). Park-Miller generator; every
# product stays below 2^53 so awk's doubles are exact.
gen_pattern() {
    awk -v seed="$1" -v lba="$2" -v n="$3" 'BEGIN {
        m = 2147483647
        x = (seed % m) * 7919 % m
        x = (x + (lba % m) * 104729 % m + 12345) % m
        if (x == 0) x = 1
        lines = n / 64
        for (i = 0; i < lines; i++) {
            line = ""
            for (j = 0; j < 7; j++) {
                x = (x * 16807) % m
                line = line sprintf("%08x", x)
            }
            printf "%s%07x\n", line, i % 268435456
        }
    }'
}

# The discard test's layout, in its 2 MiB range starting at discard_start_lba:
# [256K, 768K) discarded by blkdiscard, [1M, 1.5M) by fio's trim, [1.625M, 1.875M) zeroed by
# BLKZEROOUT (WRITE_ZEROES); the rest holds the 2 MiB pattern written first.
# discard_start_lba SIZE LBS: the range's first LBA (a quarter into the disk, MiB-aligned).
discard_start_lba() { echo $(( $1 / 4 / 1048576 * 1048576 / $2 )); }
# discard_expect PATTERN_FILE: the bytes the range must hold after the test, on stdout.
discard_expect() {
    _k=262144
    dd if="$1" bs=$_k count=1 2>/dev/null
    dd if=/dev/zero bs=$_k count=2 2>/dev/null
    dd if="$1" bs=$_k skip=3 count=1 2>/dev/null
    dd if=/dev/zero bs=$_k count=2 2>/dev/null
    dd if="$1" bs=$(( _k / 2 )) skip=12 count=1 2>/dev/null
    dd if=/dev/zero bs=$_k count=1 2>/dev/null
    dd if="$1" bs=$(( _k / 2 )) skip=15 count=1 2>/dev/null
}

# A block-layer error message of the kernel (virtio_blk, blk-mq, buffer heads, hung tasks).
kernel_errors='I/O error|is not a head|blk_update_request|print_req_error|virtio_blk.*(error|fail)|blocked for more than|hung_task'

# check_dmesg: fails the test when the kernel log holds a block-layer error.
check_dmesg() {
    if dmesg | grep -Ei "$kernel_errors" > /tmp/dmesg.err; then
        cat /tmp/dmesg.err
        fail "kernel: $(head -n1 /tmp/dmesg.err)"
    fi
}

# fio_checked WHAT BS JOBS fio-args...: fio on the disk under test (O_DIRECT, libaio, iodepth
# 16, JOBS jobs of BS-byte blocks split over the CPUs) with crc32c verification; fails the
# test on any error or mismatch, after the kernel's block-layer errors if there are any.
fio_checked() {
    _what="$1" _bs="$2" _jobs="$3"
    shift 3
    rm -f /tmp/fio.out
    if ! fio --filename="/dev/$(strata_dev)" --direct=1 --ioengine=libaio --iodepth=16 \
            --bs="$_bs" --numjobs="$_jobs" --cpus_allowed="0-$(( $(ncpus) - 1 ))" \
            --cpus_allowed_policy=split --verify=crc32c --verify_fatal=1 --verify_dump=0 \
            --group_reporting --eta=never --output=/tmp/fio.out "$@" </dev/null; then
        cat /tmp/fio.out 2>/dev/null || true
        check_dmesg
        fail "fio $_what failed"
    fi
    if grep -Eq 'err= *[1-9]|verify: bad|bad magic|crc32c: verify failed' /tmp/fio.out; then
        cat /tmp/fio.out
        fail "fio $_what reported an error"
    fi
}
