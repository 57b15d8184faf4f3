#!/usr/bin/env bash
# Builds the operator image `pgbalancer/operator:0.1.0` (a static musl binary on scratch). The
# release build's dependencies are cached outside the checkout (the slowest step of a fresh
# clone); the binary is copied where the Dockerfile expects it.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
rustup target list --installed | grep -q x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
command -v musl-gcc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null
musl_target=${PGBALANCER_MUSL_TARGET:-/var/cache/pgbalancer/target-musl}
CARGO_TARGET_DIR=$musl_target CC_x86_64_unknown_linux_musl=musl-gcc \
  cargo build --quiet --release --target x86_64-unknown-linux-musl --bin pgbalancer
mkdir -p target/x86_64-unknown-linux-musl/release
cp "$musl_target/x86_64-unknown-linux-musl/release/pgbalancer" target/x86_64-unknown-linux-musl/release/
docker build -q -t pgbalancer/operator:0.1.0 . >/dev/null
