#!/usr/bin/env bash
# A CPU profile of batchline during the throughput benchmark: runs
# scripts/bench.sh, samples the `batchline run` process with perf while it
# works, and writes a flamegraph (SVG) and the folded stacks. Arguments go
# to the benchmark, e.g. scripts/profile.sh --requests 100000.
#   OUT=dir (default target/profile) chooses where the files go.
# Needs perf (Debian's linux-perf) and inferno (cargo install inferno),
# both installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v perf >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq linux-perf >/dev/null
fi
command -v inferno-flamegraph >/dev/null 2>&1 || cargo install inferno --locked
out=${OUT:-target/profile}
mkdir -p "$out"

scripts/bench.sh "$@" >"$out/bench.txt" 2>&1 &
bench=$!
# The benchmark starts `batchline run` after its passthrough run.
pid=""
while kill -0 "$bench" 2>/dev/null && [ -z "$pid" ]; do
  pid=$(pgrep -f "batchline run" | head -1 || true)
  sleep 0.1
done
if [ -z "$pid" ]; then
  cat "$out/bench.txt" >&2
  echo "profile: the benchmark ended before batchline started" >&2
  exit 1
fi
perf record -e cpu-clock -F 499 --call-graph dwarf,32768 -o "$out/perf.data" -p "$pid" 2>"$out/perf.log" &
perf_pid=$!
wait "$bench"
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" || true
perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf >"$out/folded.txt"
inferno-flamegraph <"$out/folded.txt" >"$out/flamegraph.svg"
grep -E "passthrough ceiling|e2e|ratio|RSS|CPU" "$out/bench.txt"
echo "profile: $out/flamegraph.svg ($(wc -l <"$out/folded.txt") distinct stacks)"
