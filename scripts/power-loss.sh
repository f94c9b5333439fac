#!/usr/bin/env bash
# Runs the power-loss tests (tests/power_loss.rs: strata through strata-faultfs, power cut at
# random moments, raw and qcow2, write-back and write-through) for many rounds per
# configuration: scripts/power-loss.sh [ROUNDS] (default 300; the test command runs 3).
# A failure prints its STRATA_POWER_LOSS_SEED; set it to replay the run. Needs root (FUSE).
set -euo pipefail
cd "$(dirname "$0")/.."
STRATA_POWER_LOSS_ROUNDS="${1:-300}" cargo test --release --test power_loss -- --nocapture
