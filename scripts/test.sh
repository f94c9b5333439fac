#!/usr/bin/env bash
# Runs every test of strata: the workspace's Rust tests (block layer, vhost-user-blk device with
# libblkio, loop devices), the guest tests (a Linux guest in QEMU running fio against strata),
# the guest harness's self-test against qemu-storage-daemon, and the benchmark's short mode
# (every workload briefly, checking data, never timing).
# Needs root (loop devices) and the packages scripts/install-deps.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --workspace
cargo test --release --workspace -- --test-threads=2
tests/guest/run-all.sh target/release/strata
# The guest harness itself, against qemu-storage-daemon: its checks pass there and the ones
# that must fail (wrong data, size, cache mode) fail.
tests/guest/qsd-selftest.sh --quick
scripts/bench.sh --short --no-build --require-strata
