#!/usr/bin/env bash
# Operator benchmark on the test Kubernetes (API server only, no node): seconds from
# `kubectl apply` of a PgBalancerCluster to all its child objects created; reconciles and API
# writes per cluster at steady state (after SETTLE_SECONDS, default 90); operator RSS idle and
# with CLUSTERS clusters (default 200).
# Seconds to Ready with a real node come from the end-to-end test (lines starting with BENCH:
# `PGBALANCER_E2E=1 cargo test --test kube_e2e -- --nocapture` under scripts/test.sh's setup).
# Starts its own control plane (tests/k8s/control-plane.sh); do not run beside the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

clusters=${CLUSTERS:-200}
steady=${STEADY_SECONDS:-60}
./tests/k8s/build-kubernetes.sh
cargo build --release --quiet --bin pgbalancer
eval "$(./tests/k8s/control-plane.sh start)"
work=$(mktemp -d)
op_pid=
cleanup() { [ -n "$op_pid" ] && kill "$op_pid" 2>/dev/null; ./tests/k8s/control-plane.sh stop; rm -rf "$work"; }
trap cleanup EXIT
kubectl apply -f manifests/crd.yaml >/dev/null
kubectl wait --for condition=Established crd/pgbalancerclusters.pgbalancer.io --timeout 30s >/dev/null
kubectl create namespace pgbalancer-system >/dev/null
kubectl create namespace bench >/dev/null
RUST_LOG=warn ./target/release/pgbalancer operator --listen 127.0.0.1:18282 --identity bench >"$work/operator.log" 2>&1 &
op_pid=$!
until curl -sf 127.0.0.1:18282/readyz >/dev/null; do sleep 0.2; done
rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$op_pid/status"; }
# Sum of a metric's series (labelled or not).
metric() { curl -s 127.0.0.1:18282/metrics | awk -v k="$1" '$1 == k || index($1, k "{") == 1 {s += $2} END {print s + 0}'; }
# Writes by verb and object, one "series count" line each.
writes() { curl -s 127.0.0.1:18282/metrics | awk '/^pgbalancer_operator_api_writes_total/ {print $1, $2}'; }
sleep 2
idle=$(rss)

cluster() {
  printf 'apiVersion: pgbalancer.io/v1alpha1\nkind: PgBalancerCluster\nmetadata: {name: %s, namespace: bench}\nspec: {replicas: 2}\n---\n' "$1"
}
children() { kubectl -n bench get sts,svc,cm,secret,deploy -l "app.kubernetes.io/instance=$1" --no-headers 2>/dev/null | wc -l; }

# One cluster, timed: apply -> 12 children (3 StatefulSets, 4 Services, 2 ConfigMaps, 3 Secrets).
# The balancer Deployment comes once every instance is ready, which needs a node: not here.
start=$(date +%s.%N)
cluster first | kubectl apply -f - >/dev/null
until [ "$(children first)" -ge 12 ]; do sleep 0.05; done
end=$(date +%s.%N)
first=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')

for i in $(seq 1 $((clusters - 1))); do cluster "c$i"; done >"$work/many.yaml"
start=$(date +%s.%N)
kubectl apply -f "$work/many.yaml" >/dev/null
until [ "$(kubectl -n bench get pgbc -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c .)" -ge "$clusters" ]; do sleep 1; done
end=$(date +%s.%N)
all=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
sleep "${SETTLE_SECONDS:-90}"
r0=$(metric pgbalancer_operator_reconciles_total); w0=$(metric pgbalancer_operator_api_writes_total)
writes >"$work/writes0"
sleep "$steady"
r1=$(metric pgbalancer_operator_reconciles_total); w1=$(metric pgbalancer_operator_api_writes_total)
writes >"$work/writes1"
loaded=$(rss)

printf 'machine: %s cores, %s; Kubernetes 1.20.2 API server, etcd, controller-manager on loopback\n' "$(nproc)" \
  "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
printf 'apply -> the 12 child objects created before instances are ready (one cluster): %s s\n' "$first"
printf '%s more clusters applied at once -> all with status: %s s\n' "$((clusters - 1))" "$all"
awk -v r=$((r1 - r0)) -v w=$((w1 - w0)) -v c="$clusters" -v s="$steady" \
  'BEGIN { printf "steady state over %s s: %.3f reconciles and %.3f API writes per cluster per minute\n", s, r / c * 60 / s, w / c * 60 / s }'
# Which writes the steady state made, by verb and object.
awk 'NR == FNR {before[$1] = $2; next} $2 - before[$1] > 0 {printf "  steady-state writes %s: %d\n", $1, $2 - before[$1]}' \
  "$work/writes0" "$work/writes1"
printf 'operator RSS: idle %s MiB, with %s clusters %s MiB\n' "$idle" "$clusters" "$loaded"
