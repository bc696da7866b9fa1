#!/usr/bin/env bash
# Runs every test against a real broker: Tansu, started by the tests on a
# free port (or the broker named by KAFKA_BROKERS), with crash failpoints
# compiled in.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --all-targets --features failpoints -- -D warnings
cargo test --features failpoints --no-fail-fast "$@"
