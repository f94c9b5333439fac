#!/usr/bin/env bash
# Instructions per request in strata's own code (userspace), counted by callgrind: the daemon
# runs under valgrind on a null-co node (no I/O cost), a libblkio client (strata-bench) sends 4k
# random reads at QD1 and at QD32, and callgrind counts instructions only while each workload
# runs. Instruction counts do not depend on how busy the machine is, so this works where timed
# benchmarks cannot (issue 18: where the per-request cost goes).
#
#   scripts/callgrind.sh [--strata BIN] [--bench BIN] [--duration S] [--out DIR]
# Prints, per workload, requests, instructions per request and the top functions (self cost);
# the callgrind files stay in DIR (default target/callgrind) for callgrind_annotate/kcachegrind.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
strata="$root/target/release/strata" bench="$root/target/release/strata-bench"
duration=5 out="$root/target/callgrind"
while (($#)); do
    case "$1" in
    --strata) strata="$2"; shift 2 ;;
    --bench) bench="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
mkdir -p "$out"
rm -f "$out"/callgrind.out.* "$out/strata.sock"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/callgrind.out.%p" \
    "$strata" --sandbox off \
    --blockdev driver=null-co,node-name=n0,size=1073741824 \
    --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$out/strata.sock,writable=on,num-queues=1,poll-max-ns=0" \
    >"$out/daemon.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do [[ -S "$out/strata.sock" ]] && break; sleep 0.1; done
[[ -S "$out/strata.sock" ]] || { echo "strata did not start under valgrind:" >&2; cat "$out/daemon.log" >&2; exit 1; }

part=0
for workload in randread-4k-qd1 randread-4k-qd32; do
    callgrind_control -z "$pid" >/dev/null
    callgrind_control -i on "$pid" >/dev/null
    "$bench" run --target strata --path "$out/strata.sock" --backend null --workload "$workload" \
        --duration "$duration" --ramp 1 --out "$out/bench.json" >/dev/null
    callgrind_control -d "$workload" "$pid" >/dev/null
    callgrind_control -i off "$pid" >/dev/null
    part=$((part + 1))
    file="$(ls -t "$out"/callgrind.out."$pid".* | head -1)"
    python3 - "$file" "$workload" <<'PY'
import re, sys
path, workload = sys.argv[1], sys.argv[2]
names, calls, total = {}, 0, 0
cfn = None
for line in open(path):
    m = re.match(r'(c?fn)=\((\d+)\)(?: (.*))?', line)
    if m:
        if m.group(3):
            names[m.group(2)] = m.group(3).strip()
        cfn = m.group(2) if m.group(1) == 'cfn' else cfn
        continue
    m = re.match(r'calls=(\d+)', line)
    if m and names.get(cfn) == 'strata_vhost::request::parse::parse':
        calls += int(m.group(1))
    m = re.match(r'summary: (\d+)', line) or re.match(r'totals: (\d+)', line)
    if m:
        total = int(m.group(1))
print(f"{workload}: {calls} requests, {total} instructions, "
      f"{total / max(calls, 1):.0f} per request")
PY
    callgrind_annotate "$file" 2>/dev/null | grep -E '^ *[0-9,]+ \(' | sed -n 2,9p
done
