#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests and the integration tests against the real
# Docker engine, PostgreSQL and pgpool. Sets up what they need first.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo from rustup when the shell has not loaded it
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

./scripts/host-setup.sh
echo "==> building images (cached after the first run)" >&2
cargo build --quiet --bins
./target/debug/pgbalancer images build
echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --quiet --all-targets -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace -- --test-threads 2
