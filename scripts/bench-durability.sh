#!/usr/bin/env bash
# Pipelined throughput of jobd with each durability mode, side by side, in
# one run: start one daemon per mode (memory, os, fsync; each with its own
# state directory), then in every round run jobd-bench against each of them
# in turn, in `submit` mode (admission, acknowledged after commit) and
# `cycle` mode (submit + run + result back). Prints the medians and the
# ratios to memory, each ratio the median over rounds of the ratio measured
# within one round (neighbouring runs share the machine's mood: these VMs
# drift by ±15% from minute to minute).
#   scripts/bench-durability.sh [JOBS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${1:-50000}"
rounds="${2:-5}"
modes=(memory os fsync)
cargo build --release --quiet --bin jobd --bin jobd-bench --bin jobctl
bin=target/release
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Room for every job: `submit` mode outruns the workers on purpose.
printf '[pools.default]\nmax_queued = 10000000\n' > "$tmp/jobd.toml"
for mode in "${modes[@]}"; do
  mkdir -p "$tmp/$mode"
  JOBD_LOG=error $bin/jobd --config "$tmp/jobd.toml" --socket "$tmp/$mode.sock" \
    --state-dir "$tmp/$mode" --durability "$mode" &
  pids+=($!)
done
for mode in "${modes[@]}"; do
  for _ in $(seq 100); do [ -S "$tmp/$mode.sock" ] && break; sleep 0.05; done
done
# Wait until a daemon has no job left (a `submit` run returns once every
# job is admitted; they run afterwards, and must not overlap the next run).
idle() {
  for _ in $(seq 600); do
    $bin/jobctl --socket "$1" stats --json | python3 -c \
      'import json,sys; sys.exit(0 if json.load(sys.stdin)["active_jobs"] == 0 else 1)' && return
    sleep 0.05
  done
}
declare -A runs
for round in $(seq "$rounds"); do
  for kind in submit cycle; do
    # A different mode goes first each round.
    for k in 0 1 2; do
      mode=${modes[$(((round + k) % 3))]}
      r=$($bin/jobd-bench --socket "$tmp/$mode.sock" --mode "$kind" --count "$jobs" \
            --connections 4 --depth 64 --json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs_per_sec"]))')
      runs[$mode,$kind,$round]=$r
      idle "$tmp/$mode.sock"
    done
  done
  echo "round $round: $(for m in "${modes[@]}"; do printf '%s %s/%s  ' "$m" "${runs[$m,submit,$round]}" "${runs[$m,cycle,$round]}"; done)"
done
echo
printf '%-8s %14s %14s %12s %12s\n' mode submit/s cycle/s submit÷mem cycle÷mem
for mode in "${modes[@]}"; do
  line="$mode"
  for kind in submit cycle; do
    line+=" $(for r in $(seq "$rounds"); do echo "${runs[$mode,$kind,$r]}"; done | median)"
  done
  for kind in submit cycle; do
    line+=" $(for r in $(seq "$rounds"); do
      python3 -c "print(${runs[$mode,$kind,$r]} / ${runs[memory,$kind,$r]})"; done | median)"
  done
  # shellcheck disable=SC2086
  printf '%-8s %14s %14s %12.2f %12.2f\n' $line
done
