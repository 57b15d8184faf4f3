#!/usr/bin/env bash
# Where a proxied transaction's CPU goes: pgbench select-only (-S -c 8) direct to the primary,
# through the native engine and through HAProxy (plain TCP, on the host in front of the
# primary's published port), each run for DURATION seconds (default 10), ROUNDS times (default
# 3). For each run it prints the throughput and the CPU time per transaction of the native
# engine (the agent's processes), of HAProxy and of Docker's port proxies (docker-proxy, which
# every path to a published loopback port crosses), from /proc/<pid>/stat (user and kernel
# time), and the engine's share of kernel time. With STRACE=1 it also counts the engine's
# system calls per transaction over 5 s of one extra run (strace slows that run).
#
# Needs the Docker engine (scripts/host-setup.sh), pgbench, psql and jq; installs haproxy from
# Debian when missing.
set -euo pipefail
# Every path in plain text: the instances serve TLS, and libpq would otherwise take it on the
# direct path (and through HAProxy) while the balancers' clients and servers speak plain text.
export PGSSLMODE=disable
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

rounds=${ROUNDS:-3}
duration=${DURATION:-10}
command -v haproxy >/dev/null || command -v /usr/sbin/haproxy >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
systemctl stop haproxy >/dev/null 2>&1 || true
cargo build --release --quiet --bins
bin=$PWD/target/release/pgbalancer
"$bin" images build >/dev/null 2>&1
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  [ -f "$work/haproxy.pid" ] && kill "$(cat "$work/haproxy.pid")" 2>/dev/null
  "$bin" down bench-cpu >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
export PGBALANCER_STATE_DIR=$work/state
cat >"$work/cluster.yaml" <<YAML
apiVersion: pgbalancer.io/v1alpha1
kind: PgBalancerCluster
metadata: {name: bench-cpu}
spec:
  replicas: 2
  postgres: {parameters: {max_connections: "400"}}
  balancer: {engine: native}
YAML
"$bin" up -f "$work/cluster.yaml" >/dev/null 2>&1
status() { "$bin" status bench-cpu --show-secrets -o json; }
export PGPASSWORD=$(status | jq -r .secrets.password)
primary=$(status | jq -r .primary.port)
balancer=$(status | jq -r .balancer.port)
pgbench -q -i -s 10 -h 127.0.0.1 -p "$primary" -U app app >/dev/null 2>&1
. bench/haproxy.sh
haproxy_port=$(start_haproxy "$work" "$primary")
sleep 3

hz=$(getconf CLK_TCK)
# user and kernel clock ticks of the processes whose command line matches $1
ticks() {
  local u=0 k=0 p
  for p in $(pgrep -f "$1"); do
    read -r pu pk < <(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null || echo "0 0")
    u=$((u + pu)) k=$((k + pk))
  done
  echo "$u $k"
}
us_per_txn() { # ticks transactions
  awk -v t="$1" -v n="$2" -v hz="$hz" 'BEGIN { printf "%.1f", n ? t * 1e6 / hz / n : 0 }'
}
printf 'machine: %s cores; pgbench -S -c 8 -j 2 -T %s, scale 10, 2 replicas\n' "$(nproc)" "$duration"
printf 'CPU time per transaction, in microseconds (us), by process:\n'
printf '%-8s %5s %8s %6s | %9s %10s %15s | %s\n' \
  path round tps ratio "engine us" "haproxy us" "docker-proxy us" "engine kernel share"
for round in $(seq 1 "$rounds"); do
  direct_tps=
  for path in direct native haproxy; do
    case $path in
      direct) port=$primary ;; native) port=$balancer ;; haproxy) port=$haproxy_port ;;
    esac
    read -r eu0 ek0 < <(ticks pgbalancer-agent)
    read -r hu0 hk0 < <(ticks "haproxy -D")
    read -r du0 dk0 < <(ticks docker-proxy)
    out=$(pgbench -n -S -c 8 -j 2 -T "$duration" -h 127.0.0.1 -p "$port" -U app app 2>&1)
    read -r eu1 ek1 < <(ticks pgbalancer-agent)
    read -r hu1 hk1 < <(ticks "haproxy -D")
    read -r du1 dk1 < <(ticks docker-proxy)
    tps=$(echo "$out" | awk '/^tps/ {printf "%d", $3}')
    n=$(echo "$out" | awk -F': ' '/actually processed/ {split($2, a, "/"); print a[1]}')
    [ "$path" = direct ] && direct_tps=$tps
    e=$((eu1 - eu0 + ek1 - ek0))
    share=$(awk -v k=$((ek1 - ek0)) -v e=$e 'BEGIN { printf "%.0f %%", e ? 100 * k / e : 0 }')
    printf '%-8s %5s %8s %6s | %9s %10s %15s | %s\n' "$path" "$round" "$tps" \
      "$(awk -v a="$tps" -v b="$direct_tps" 'BEGIN { printf "%.2f", a / b }')" \
      "$(us_per_txn $e "$n")" "$(us_per_txn $((hu1 - hu0 + hk1 - hk0)) "$n")" \
      "$(us_per_txn $((du1 - du0 + dk1 - dk0)) "$n")" "$([ "$path" = native ] && echo "$share" || echo -)"
  done
done

if [ "${STRACE:-0}" = 1 ]; then
  command -v strace >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null
  engine=$(pgrep -f pgbalancer-agent | tail -1)
  pgbench -n -S -c 8 -j 2 -T 10 -h 127.0.0.1 -p "$balancer" -U app app >/dev/null 2>&1 &
  sleep 2
  timeout 5 strace -c -f -p "$engine" -o "$work/strace.txt" >/dev/null 2>&1 || true
  wait
  # Each transaction is one query sent to a server and one answer sent to the client.
  awk '/ sendto$/ {s=$4} / recvfrom$/ {r=$4} / epoll_wait$/ {e=$4}
       END { n = s / 2; printf "engine system calls per transaction (strace, %d transactions): sendto %.2f, recvfrom %.2f, epoll_wait %.2f\n", n, s / n, r / n, e / n }' "$work/strace.txt"
fi
