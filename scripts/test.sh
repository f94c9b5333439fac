#!/usr/bin/env bash
# Runs every test of strata: the workspace's Rust tests (block layer, vhost-user-blk device with
# libblkio, loop devices), the guest tests (a Linux guest in QEMU running fio against strata),
# the guest harness's self-test against qemu-storage-daemon, and the benchmark's short mode
# (every workload briefly, checking data, never timing).
# Needs root (loop devices) and the packages scripts/install-deps.sh installs.
# `scripts/test.sh --long` runs the long loops too: many more property-test cases and mutated
# qcow2 images, power-loss rounds, killed clients and memory-table cycles (STRATA_LONG_TESTS;
# see README "Tests").
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --long ]; then
    export STRATA_LONG_TESTS=1
    export STRATA_POWER_LOSS_ROUNDS="${STRATA_POWER_LOSS_ROUNDS:-300}"
    export PROPTEST_CASES="${PROPTEST_CASES:-200000}"
    export STRATA_MUTATED_CASES="${STRATA_MUTATED_CASES:-5000}"
fi

scripts/install-deps.sh
cargo build --release --workspace
# The rbd tests (tests/rbd.rs and the guest's rbd scenario) use a single-node Ceph cluster,
# stopped and removed after them (or at exit).
eval "$(scripts/ceph-test-cluster.sh start)"
trap 'scripts/ceph-test-cluster.sh stop' EXIT
cargo test --release --workspace -- --test-threads=2
tests/guest/run-all.sh target/release/strata
scripts/ceph-test-cluster.sh stop
trap - EXIT
# The guest harness itself, against qemu-storage-daemon: its checks pass there and the ones
# that must fail (wrong data, size, cache mode) fail.
tests/guest/qsd-selftest.sh --quick
scripts/bench.sh --short --no-build --require-strata
