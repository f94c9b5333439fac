#!/usr/bin/env bash
# Runs the property tests of the guest-facing parsers (descriptor chains and requests, the
# split ring's indices and entries) with many more cases than the test command does (512):
# scripts/fuzz.sh [CASES] (default 200000).
# A failure is shrunk to a minimal case and saved under vhost/proptest-regressions/, which is
# committed and replayed by every later run; turn it into a readable corpus file under
# vhost/fuzz-corpus/ (chains/ or rings/, format in the tests' read_*_case) so that it stays a
# test when the generators change.
# Then randomly mutated qcow2 images (backend/tests/crafted/mutated.rs; the test command runs
# 40), each checked, read, written and repaired in a child process under a memory and time
# limit: scripts/fuzz.sh CASES IMAGES (default 5000 images, from case 1000 on; a failure names
# its case, which STRATA_MUTATED_FIRST and STRATA_MUTATED_CASES=1 replay).
# Then the frontend fault loops at length (STRATA_LONG_TESTS=1; the test command runs a few
# rounds): 100 libblkio clients killed mid-I/O, 200 memory-table change cycles.
set -euo pipefail
cd "$(dirname "$0")/.."
PROPTEST_CASES="${1:-200000}" cargo test --release -p strata-vhost --lib -- any_ corpus --nocapture
STRATA_MUTATED_FIRST=1000 STRATA_MUTATED_CASES="${2:-5000}" cargo test --release -p strata-backend \
    --test qcow2_hostile -- mutated_images_fail_cleanly --nocapture
STRATA_LONG_TESTS=1 cargo test --release -p strata-vhost --test frontend_killed \
    --test memory_table_changes -- --nocapture
