#!/usr/bin/env bash
# Balancer data-path benchmark, one run: pgbench select-only (-S) and TPC-B-like read/write,
# direct to the primary vs through the balancer (ratio), then select-only through the balancer
# with 0, 1 and 2 replicas. DURATION seconds per pgbench (default 10), CLIENTS (default 8).
# Needs the Docker engine (scripts/host-setup.sh) and pgbench (postgresql-client).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

duration=${DURATION:-10}
clients=${CLIENTS:-8}
cargo build --release --quiet --bins
bin=$PWD/target/release/pgbalancer
"$bin" images build >/dev/null 2>&1
work=$(mktemp -d)
trap '"$bin" down bench-lb >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
export PGBALANCER_STATE_DIR=$work/state
cat >"$work/cluster.yaml" <<YAML
apiVersion: pgbalancer.io/v1alpha1
kind: PgBalancerCluster
metadata: {name: bench-lb}
spec:
  replicas: 2
  balancer: {numInitChildren: 32, maxPool: 2}
YAML
"$bin" up -f "$work/cluster.yaml" >/dev/null 2>&1
status() { "$bin" status bench-lb --show-secrets -o json; }
export PGPASSWORD=$(status | jq -r .secrets.password)
primary=$(status | jq -r .primary.port)
balancer=$(status | jq -r .balancer.port)
pgbench -q -i -s 10 -h 127.0.0.1 -p "$primary" -U app app >/dev/null 2>&1
sleep 2

tps() { # port, extra args...
  local port=$1; shift
  pgbench -n -c "$clients" -j 2 -T "$duration" -h 127.0.0.1 -p "$port" -U app "$@" app 2>/dev/null |
    awk '/^tps/ {print int($3); exit}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }'; }

printf 'machine: %s cores, %s; pgbench -c %s -j 2 -T %s, scale 10\n' "$(nproc)" \
  "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)" "$clients" "$duration"
s_direct=$(tps "$primary" -S)
s_lb=$(tps "$balancer" -S)
rw_direct=$(tps "$primary")
rw_lb=$(tps "$balancer")
printf '%-34s %8s %8s %6s\n' workload direct balancer ratio
printf '%-34s %8s %8s %6s\n' "select-only (-S), 2 replicas" "$s_direct" "$s_lb" "$(ratio "$s_direct" "$s_lb")"
printf '%-34s %8s %8s %6s\n' "read/write (TPC-B like)" "$rw_direct" "$rw_lb" "$(ratio "$rw_direct" "$rw_lb")"
for n in 0 1 2; do
  "$bin" scale bench-lb --replicas "$n" >/dev/null 2>&1
  sleep 1
  printf 'select-only through the balancer, %s replica(s): %s tps\n' "$n" "$(tps "$balancer" -S)"
done
