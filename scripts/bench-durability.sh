#!/usr/bin/env bash
# Pipelined throughput of jobd with each durability mode, side by side, in
# one run: for memory, os and fsync, start a fresh daemon, run jobd-bench in
# `submit` mode (admission, acknowledged after commit) and `cycle` mode
# (submit + run + result back), ROUNDS times each, and print the medians and
# the ratios to memory.
#   scripts/bench-durability.sh [JOBS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${1:-50000}"
rounds="${2:-3}"
cargo build --release --quiet --bin jobd --bin jobd-bench
bin=target/release
tmp=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Room for every job: `submit` mode outruns the workers on purpose.
printf '[pools.default]\nmax_queued = 10000000\n' > "$tmp/jobd.toml"
declare -A result
for mode in memory os fsync; do
  rm -rf "$tmp/state"; mkdir -p "$tmp/state"
  JOBD_LOG=error $bin/jobd --config "$tmp/jobd.toml" --socket "$tmp/s.sock" \
    --state-dir "$tmp/state" --durability "$mode" &
  pid=$!
  for _ in $(seq 100); do [ -S "$tmp/s.sock" ] && break; sleep 0.05; done
  for kind in submit cycle; do
    runs=()
    for _ in $(seq "$rounds"); do
      r=$($bin/jobd-bench --socket "$tmp/s.sock" --mode "$kind" --count "$jobs" \
            --connections 4 --depth 64 --json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs_per_sec"]))')
      runs+=("$r")
    done
    result[$mode,$kind]=$(printf '%s\n' "${runs[@]}" | median)
    echo "$mode $kind: ${runs[*]} jobs/s (median ${result[$mode,$kind]})"
  done
  kill -TERM $pid; wait $pid || true
done
echo
printf '%-8s %14s %14s %10s %10s\n' mode submit/s cycle/s submit÷mem cycle÷mem
for mode in memory os fsync; do
  printf '%-8s %14s %14s %10.2f %10.2f\n' "$mode" "${result[$mode,submit]}" "${result[$mode,cycle]}" \
    "$(python3 -c "print(${result[$mode,submit]} / ${result[memory,submit]})")" \
    "$(python3 -c "print(${result[$mode,cycle]} / ${result[memory,cycle]})")"
done
