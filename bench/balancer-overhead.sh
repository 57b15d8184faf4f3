#!/usr/bin/env bash
# Balancer data-path benchmark, one run, side by side on this machine: pgbench select-only
# (-S) and TPC-B-like, each direct to the primary, through the native engine, through
# pgpool-II, through HAProxy (plain TCP: the ceiling of any proxy) and through PgBouncer
# (session pooling: the pooling reference). Then -c 1 latency, reads per node, and the native
# engine's memory per idle client session.
#
# ROUNDS (default 3) repeats every measurement, the paths taking turns within each round, and
# prints the median and each round's figure: ratios are taken within a round (the machine's
# speed drifts between rounds as much as the paths differ). DURATION seconds per pgbench
# (default 10), CLIENTS (default 8), IDLE idle sessions for the memory figure (default 200). Needs the Docker engine (scripts/host-setup.sh), pgbench and
# psql; installs haproxy and pgbouncer from Debian when missing (they run on the host, in
# front of the primary's published loopback port).
set -euo pipefail
# Every path in plain text: the instances serve TLS, and libpq would otherwise take it on the
# direct path (and through HAProxy) while the balancers' clients and servers speak plain text.
export PGSSLMODE=disable
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

rounds=${ROUNDS:-3}
duration=${DURATION:-10}
clients=${CLIENTS:-8}
idle=${IDLE:-200}
for tool in haproxy pgbouncer; do
  command -v "$tool" >/dev/null || command -v "/usr/sbin/$tool" >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
done
systemctl stop haproxy pgbouncer >/dev/null 2>&1 || true
cargo build --release --quiet --bins
bin=$PWD/target/release/pgbalancer
"$bin" images build >/dev/null 2>&1
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  [ -f "$work/haproxy.pid" ] && kill "$(cat "$work/haproxy.pid")" 2>/dev/null
  [ -f "$work/pgbouncer.pid" ] && kill "$(cat "$work/pgbouncer.pid")" 2>/dev/null
  pkill -f "pgbench-idle-$$" 2>/dev/null || true
  "$bin" down bench-lb >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
export PGBALANCER_STATE_DIR=$work/state
cluster() { # engine
  cat >"$work/cluster.yaml" <<YAML
apiVersion: pgbalancer.io/v1alpha1
kind: PgBalancerCluster
metadata: {name: bench-lb}
spec:
  replicas: 2
  postgres: {parameters: {max_connections: "400"}}
  balancer: {engine: $1, numInitChildren: 32, maxPool: 2}
YAML
  "$bin" up -f "$work/cluster.yaml" >/dev/null 2>&1
}
cluster native
status() { "$bin" status bench-lb --show-secrets -o json; }
export PGPASSWORD=$(status | jq -r .secrets.password)
primary=$(status | jq -r .primary.port)
balancer=$(status | jq -r .balancer.port)
pgbench -q -i -s 10 -h 127.0.0.1 -p "$primary" -U app app >/dev/null 2>&1
sleep 3

# HAProxy and PgBouncer in front of the primary, on free loopback ports.
. bench/haproxy.sh
haproxy_port=$(start_haproxy "$work" "$primary")
bouncer_port=$(free_port)
printf '"app" "%s"\n' "$PGPASSWORD" >"$work/userlist.txt"
cat >"$work/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$primary dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
auth_type = scram-sha-256
auth_file = $work/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 50
pidfile = $work/pgbouncer.pid
logfile = $work/pgbouncer.log
unix_socket_dir =
INI
chown -R postgres "$work"
runuser -u postgres -- pgbouncer -d "$work/pgbouncer.ini"
sleep 1

run() { # port, extra args... -> "tps latency_ms"
  local port=$1; shift
  pgbench -n -j 2 -T "$duration" -h 127.0.0.1 -p "$port" -U app "$@" app 2>/dev/null |
    awk '/^latency average/ {lat=$4} /^tps/ {tps=int($3)} END {print tps, lat}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "-" }'; }
median() { tr ' ' '\n' | awk 'NF' | sort -g |
  awk '{ v[NR] = $1 } END { if (!NR) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf 'machine: %s cores, %s; pgbench -c %s -j 2 -T %s, scale 10, 2 replicas, %s rounds\n' "$(nproc)" \
  "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)" "$clients" "$duration" "$rounds"
# Space-separated figures per path, one per round.
declare -A s rw lat
measure() { # name port
  s[$1]+="$(run "$2" -c "$clients" -S | cut -d' ' -f1) "
  rw[$1]+="$(run "$2" -c "$clients" | cut -d' ' -f1) "
  lat[$1]+="$(run "$2" -c 1 -S | cut -d' ' -f2) "
}
for _ in $(seq "$rounds"); do
  measure direct "$primary"
  measure native "$balancer"
  measure haproxy "$haproxy_port"
  measure pgbouncer "$bouncer_port"
done
native_nodes=$(psql -h 127.0.0.1 -p "$balancer" -U app app -At -F ' ' -c "SHOW POOL_NODES" |
  awk '{print "node " $1 " (" $7 "): " $9}')

# Memory per idle client session of the native engine.
# The agent serving (the container's first process is its init).
agent_rss() { docker exec bench-lb-balancer sh -c 'grep VmRSS "/proc/$(cat /var/run/pgbalancer/agent.pid)/status"' | awk '{print $2}'; }
before=$(agent_rss)
for _ in $(seq "$idle"); do
  (exec -a "pgbench-idle-$$" sleep 60) | psql -q -h 127.0.0.1 -p "$balancer" -U app app >/dev/null 2>&1 &
done
for _ in $(seq 60); do
  n=$(psql -h 127.0.0.1 -p "$primary" -U app app -Atc "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'psql'")
  [ "$n" -ge "$idle" ] && break
  sleep 1
done
after=$(agent_rss)
per_client=$(awk -v a="$before" -v b="$after" -v n="$idle" 'BEGIN { printf "%.1f", (b - a) / n }')
pkill -f "pgbench-idle-$$" || true
wait 2>/dev/null || true

cluster pgpool
sleep 3
for _ in $(seq "$rounds"); do
  measure pgpool "$balancer"
  # pgpool's rounds are paired with direct runs of their own (the cluster is another one).
  measure direct-pgpool "$primary"
done

# Per round: the path's figure over direct's in the same round.
ratios() { # path-figures direct-figures
  local -a a b; read -ra a <<<"$1"; read -ra b <<<"$2"
  local i; for i in "${!a[@]}"; do ratio "${b[$i]:-0}" "${a[$i]}"; printf ' '; done
}
printf '\n%-10s %12s %6s %-16s %8s %6s %-16s %10s %-22s\n' path "select-only" ratio "(each round)" \
  "TPC-B" ratio "(each round)" "-c 1 ms" "(each round)"
for p in direct native pgpool haproxy pgbouncer; do
  d=direct; [ "$p" = pgpool ] && d=direct-pgpool
  sr=$(ratios "${s[$p]}" "${s[$d]}"); rr=$(ratios "${rw[$p]}" "${rw[$d]}")
  printf '%-10s %12s %6s %-16s %8s %6s %-16s %10s %-22s\n' "$p" \
    "$(echo "${s[$p]}" | median)" "$(echo "$sr" | median)" "($(echo $sr))" \
    "$(echo "${rw[$p]}" | median)" "$(echo "$rr" | median)" "($(echo $rr))" \
    "$(echo "${lat[$p]}" | median)" "($(echo ${lat[$p]}))"
done
printf '\nnative reads per node (select-only and TPC-B runs): %s\n' "$(echo "$native_nodes" | paste -sd ';')"
printf 'native engine memory: %s KiB per idle client session (%s sessions: RSS %s -> %s KiB)\n' \
  "$per_client" "$idle" "$before" "$after"
