#!/usr/bin/env bash
# Runs the property tests of the guest-facing parsers (descriptor chains and requests, the
# split ring's indices and entries) with many more cases than the test command does (512):
# scripts/fuzz.sh [CASES] (default 200000).
# A failure is shrunk to a minimal case and saved under vhost/proptest-regressions/, which is
# committed and replayed by every later run; turn it into a readable corpus file under
# vhost/fuzz-corpus/ (chains/ or rings/, format in the tests' read_*_case) so that it stays a
# test when the generators change.
# Then the frontend fault loops at length (STRATA_LONG_TESTS=1; the test command runs a few
# rounds): 100 libblkio clients killed mid-I/O, 200 memory-table change cycles.
set -euo pipefail
cd "$(dirname "$0")/.."
PROPTEST_CASES="${1:-200000}" cargo test --release -p strata-vhost --lib -- any_ corpus --nocapture
STRATA_LONG_TESTS=1 cargo test --release -p strata-vhost --test frontend_killed \
    --test memory_table_changes -- --nocapture
