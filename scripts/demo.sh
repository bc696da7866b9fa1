#!/usr/bin/env bash
# The demo: a local Tansu broker, the provider simulator and batchline, end
# to end. Sends examples/requests.jsonl (a few of them deliberately bad),
# waits for every result, prints some, and shows batchline's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --quiet
bin=target/debug/batchline

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
kafka_port=$(port); sim_port=$(port); http_port=$(port)
brokers=127.0.0.1:$kafka_port

echo "== starting Tansu on $brokers"
tansu broker --listener-url "tcp://$brokers" --advertised-listener-url "tcp://$brokers" \
  --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$kafka_port") 2>/dev/null && break; sleep 0.1; done
tansu topic create --broker "tcp://$brokers" --partitions 4 llm.requests >/dev/null

echo "== starting the simulator on 127.0.0.1:$sim_port (2% of requests fail)"
"$bin" sim --listen "127.0.0.1:$sim_port" --error-rate 0.02 --batch-duration 2s >"$work/sim.log" 2>&1 &
pids+=($!)

echo "== starting batchline (windows close after 3 s; metrics on 127.0.0.1:$http_port)"
export BATCHLINE__KAFKA__BROKERS=$brokers
export BATCHLINE__PROVIDERS__OPENAI__BASE_URL=http://127.0.0.1:$sim_port/openai/v1
export BATCHLINE__PROVIDERS__OPENAI__POLL_INTERVAL=500ms
export BATCHLINE__WINDOW__MAX_WAIT=3s
export BATCHLINE__SPOOL__DIR=$work/spool
export BATCHLINE__HTTP__LISTEN=127.0.0.1:$http_port
export OPENAI_API_KEY=sk-simulator
"$bin" run >"$work/batchline.log" 2>&1 &
pids+=($!)

echo "== sending examples/requests.jsonl and waiting for every result"
"$bin" send examples/requests.jsonl --wait --show 3 --timeout 2m

echo "== batchline's log"
# grep stops at 8 itself: `| head` would end the pipe early, and pipefail
# would fail the demo on the SIGPIPE.
grep -m 8 -E "batch (submitted|ended)" "$work/batchline.log" | sed 's/\x1b\[[0-9;]*m//g'
echo "== metrics (curl http://127.0.0.1:$http_port/metrics)"
curl -s "http://127.0.0.1:$http_port/metrics" | grep -E "^batchline_(results_published|requests_rejected|batches_ended)_total" | grep -v " 0$"
echo "== done"
