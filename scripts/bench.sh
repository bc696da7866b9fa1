#!/usr/bin/env bash
# The benchmarks: starts a local Tansu broker and runs `batchline bench`
# against it (release build). Arguments go to `batchline bench`, e.g.
#   scripts/bench.sh                       # throughput: 200,000 requests vs raw Kafka
#   scripts/bench.sh --mode hold           # memory: 250,000 and 1,000,000 held requests
#   scripts/bench.sh --requests 50000      # a quicker throughput run
# Set KAFKA_BROKERS to use another broker. The collector micro-benchmark
# needs no broker: cargo bench --bench collector
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/batchline

brokers=${KAFKA_BROKERS:-}
if [ -z "$brokers" ]; then
  work=$(mktemp -d)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  brokers=127.0.0.1:$port
  tansu broker --listener-url "tcp://$brokers" --advertised-listener-url "tcp://$brokers" \
    --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
  tansu_pid=$!
  trap 'kill $tansu_pid 2>/dev/null || true; rm -rf "$work"' EXIT
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
fi
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; broker $brokers"
"$bin" bench --brokers "$brokers" "$@"
