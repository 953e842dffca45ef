#!/usr/bin/env bash
# Crash soak: SIGKILL a loaded jobd N times (default 20) at random moments,
# restarting it each time, then check that every acknowledged job exists and
# reached a final state, and that no job ever ran twice at the same time.
#   scripts/crash-soak.sh 50
set -euo pipefail
cd "$(dirname "$0")/.."
cycles="${1:-20}"
JOBD_SOAK_CYCLES="$cycles" cargo test --release --test durability crash_soak -- --ignored --nocapture
