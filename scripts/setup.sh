#!/usr/bin/env bash
# Installs what batchline needs to build and test, skipping what is there:
# (prometheus provides promtool, which checks the metrics exposition)
# Debian packages for librdkafka's build, and the Tansu broker.
set -euo pipefail

need_apt=()
for pkg in cmake libcurl4-openssl-dev zlib1g-dev libssl-dev pkg-config g++ prometheus; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is required (https://rustup.rs)" >&2
  exit 1
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v tansu >/dev/null 2>&1; then
  echo "setup: installing the Tansu broker (about 15 minutes on 2 cores)"
  cargo install tansu --locked --features dynostore,libsql
fi
