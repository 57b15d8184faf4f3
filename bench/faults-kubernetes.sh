#!/usr/bin/env bash
# Fault figures on Kubernetes: runs the fault suite (controller/tests/kube_faults.rs: a replica
# pod deleted, one of two balancer pods deleted, the leading operator killed during scale up and
# down five times, the API server stopped for 30 s) RUNS times (default 3) on the test
# Kubernetes with a real node, the operator in the cluster and the traffic from a client pod.
# Prints every measurement, then per scenario p50, p95 and the largest of: failed writes,
# the longest write gap, failed reads, and the seconds until healthy (converged) again.
# About 10 minutes a run. Starts its own Kubernetes; do not run beside the tests.
# ROUNDS (default 1) repeats the two pod deletions within each run; DELETIONS_ONLY=1 leaves out
# the operator and API server scenarios (RUNS=1 ROUNDS=10 DELETIONS_ONLY=1: ten of each
# deletion in about 25 minutes). ENGINE (pgpool, the default, or native) serves the balancer's
# port.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

runs=${RUNS:-3}
./scripts/host-setup.sh >/dev/null
cargo build --quiet --bins
./target/debug/pgbalancer images build >/dev/null
./tests/k8s/build-kubernetes.sh >/dev/null
./tests/k8s/operator-image.sh
work=$(mktemp -d)
trap './tests/k8s/node.sh stop || true; ./tests/k8s/control-plane.sh stop || true; rm -rf "$work"' EXIT
./tests/k8s/with-node.sh
export KUBECONFIG=${PGBALANCER_K8S_DIR:-/tmp/pgbalancer-k8s}/kubeconfig PGBALANCER_E2E=1
export PGBALANCER_FAULT_ROUNDS=${ROUNDS:-1} PGBALANCER_FAULT_ENGINE=${ENGINE:-pgpool}
[ -n "${DELETIONS_ONLY:-}" ] && export PGBALANCER_FAULT_DELETIONS_ONLY=1

for run in $(seq 1 "$runs"); do
  if ! cargo test --quiet --test kube_faults -- --nocapture >"$work/run.log" 2>&1; then
    echo "run $run failed:" >&2
    tail -40 "$work/run.log" >&2
    exit 1
  fi
  if ! grep -q '^MEASURED k8s' "$work/run.log"; then
    echo "run $run printed no measurements:" >&2
    tail -40 "$work/run.log" >&2
    exit 1
  fi
  grep '^MEASURED k8s' "$work/run.log" | sed "s/^MEASURED k8s /run $run: /" | tee -a "$work/measured"
done

# "run N: SCENARIO: F failed writes, longest write gap G s, R of T reads failed, healthy again
# after H s" and "run N: operator killed D s into a scale to K: converged after H s".
echo
printf '%-34s  %18s  %20s  %14s  %20s\n' scenario "failed writes" "write gap s" "failed reads" "healthy after s"
sed -E 's/^run [0-9]+: //; s/killed [0-9.]+ s into/killed during/' "$work/measured" | awk -F': ' '
  # The number right after the text matched by `before` (a regular expression).
  function num(text, before,   m) {
    if (!match(text, before "[0-9.]+")) return ""
    m = substr(text, RSTART, RLENGTH); sub(/.*[^0-9.]/, "", m); return m
  }
  {
    s = $1; rest = $2
    if (!(s in seen)) { seen[s] = 1; name[++n] = s }
    if (rest ~ /failed writes/) {
      F[s] = F[s] " " num(rest, "^"); G[s] = G[s] " " num(rest, "gap "); R[s] = R[s] " " num(rest, "s, ")
    }
    H[s] = H[s] " " num(rest, "after ")
  }
  function stat(list,   a, k, i, j, t) {
    k = split(list, a, " "); if (k == 0) return "-"
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return a[int((k + 1) / 2)] " / " a[int(k * 0.95 + 0.999)] " / " a[k]
  }
  END { for (i = 1; i <= n; i++) { s = name[i]; printf "%-34s  %18s  %20s  %14s  %20s\n", s, stat(F[s]), stat(G[s]), stat(R[s]), stat(H[s]) } }'
echo "(p50 / p95 / largest over every measurement of $runs runs)"
