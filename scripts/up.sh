#!/usr/bin/env bash
# The main job: from a bare Debian machine, bring up examples/cluster.yaml on the local Docker
# engine (1 primary + 2 replicas + 1 balancer) and show how to connect.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo from rustup when the shell has not loaded it
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

./scripts/host-setup.sh
echo "==> building pgbalancer" >&2
cargo build --release --quiet --bins
export PATH="$PWD/target/release:$PATH"
echo "==> building images (cached after the first run)" >&2
pgbalancer images build
pgbalancer up -f "${1:-examples/cluster.yaml}"
pgbalancer status
