#!/usr/bin/env bash
# jobd and beanstalkd side by side, in one run, on this machine:
#   bench/compare.sh [jobd-bench --mode compare options, e.g. --rounds 3]
# Installs beanstalkd (Debian package) if it is missing, builds jobd in
# release mode, then `jobd-bench --mode compare` starts jobd (memory, os,
# fsync), beanstalkd (no binlog, -b DIR, -b DIR -f 0; the binary run
# directly on 127.0.0.1 and a free port, never as a system service) and a
# bare NDJSON echo server, runs the same no-op job cycle on each in
# interleaved rounds, measures memory per queued job and idle memory, prints
# the tables, and stops everything it started. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v beanstalkd >/dev/null 2>&1; then
  echo "beanstalkd is missing: installing the Debian package" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  # Install without starting the packaged service: the comparison runs its
  # own beanstalkd processes.
  policy=/usr/sbin/policy-rc.d
  created=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    created=1
  fi
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y beanstalkd
  if [ -n "$created" ]; then $sudo rm -f "$policy"; fi
fi

cargo build --release --quiet --bin jobd --bin jobd-bench
echo "rustc: $(rustc --version)"
exec target/release/jobd-bench --mode compare --beanstalkd "$(command -v beanstalkd)" "$@"
