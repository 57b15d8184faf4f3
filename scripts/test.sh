#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, the integration tests against the real
# Docker engine, PostgreSQL and pgpool, and the operator against a real Kubernetes 1.20
# (API server, controller-manager, scheduler, and a kubelet node on this Docker engine).
# Installs, builds (cached) and starts what they need first; stops the test Kubernetes at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo from rustup when the shell has not loaded it
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
step() { printf '==> %s (%s)\n' "$*" "$(date +%T)" >&2; }

./scripts/host-setup.sh
step "building pgbalancer"
cargo build --quiet --bins
step "building images (cached after the first run)"
./target/debug/pgbalancer images build

step "psycopg2's own test suite, for the native balancer (cached after the first run)"
./tests/driver/setup.sh

step "Kubernetes 1.20.2 from Debian's source (cached after the first run)"
./tests/k8s/build-kubernetes.sh
step "operator image (static binary on scratch)"
./tests/k8s/operator-image.sh

step "starting the test Kubernetes"
trap './tests/k8s/node.sh stop || true; ./tests/k8s/control-plane.sh stop || true' EXIT
./tests/k8s/with-node.sh
export KUBECONFIG=${PGBALANCER_K8S_DIR:-/tmp/pgbalancer-k8s}/kubeconfig PGBALANCER_E2E=1

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --quiet --all-targets -- -D warnings
step "cargo test"
cargo test --workspace -- --test-threads 2
