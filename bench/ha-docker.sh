#!/usr/bin/env bash
# High-availability benchmark, local mode: per scenario and round, a writer through the
# balancer's published port (one connection per write, every acknowledged id checked
# afterwards) while the primary is moved or lost; prints the longest write gap, failed writes,
# acknowledged writes lost, and the seconds until the cluster is Running again with the old
# primary streaming as a replica. RUNS rounds (default 10) of each scenario in SCENARIOS
# (default "switchover stop kill"):
#   switchover  `pgbalancer switchover NAME` (planned)
#   stop        `docker stop` of the primary container; the local controller fails over; the
#               old primary is started again and must rejoin
#   kill        SIGKILL to the primary's PostgreSQL (the container's main process)
# Only 127.0.0.1 ports are used. Needs the Docker engine and psql (scripts/host-setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

runs=${RUNS:-10}
scenarios=${SCENARIOS:-"switchover stop kill"}
name=bench-ha
cargo build --quiet --bins
bin=$PWD/target/debug/pgbalancer
"$bin" images build >/dev/null 2>&1

work=$(mktemp -d)
export PGBALANCER_STATE_DIR=$work/state
trap '"$bin" down "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
cat >"$work/cluster.yaml" <<YAML
apiVersion: pgbalancer.io/v1alpha1
kind: PgBalancerCluster
metadata: {name: $name}
spec:
  replicas: 2
  balancer: {numInitChildren: 16, maxPool: 2}
YAML
"$bin" up -f "$work/cluster.yaml" >/dev/null 2>"$work/log" || { cat "$work/log"; exit 1; }
status() { "$bin" status "$name" -o json --show-secrets; }
export PGPASSWORD; PGPASSWORD=$(status | jq -r .secrets.password)
port=$(status | jq -r .balancer.port)
sql() { psql -X -q -A -t -h 127.0.0.1 -p "$port" -U app -d app -v ON_ERROR_STOP=1 "$@"; }
sql -c "CREATE TABLE IF NOT EXISTS ledger (id bigint PRIMARY KEY)" >/dev/null

now() { date +%s.%N; }
running() { [ "$(status | jq -r '[.phase, (.replicas | map(.ready) | all)] | join(" ")')" = "Running true" ]; }
# Waits (at most 120 s) until Running with every replica streaming; prints the seconds since $1.
wait_running() {
  local from=$1 i
  for i in $(seq 1 240); do
    if running; then awk -v a="$from" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; return; fi
    sleep 0.5
  done
  echo timeout
}

# Writes ids from $1 on, one connection each, until $work/stop exists (at most 3000 writes).
writer() {
  local id=$1 n
  for n in $(seq 1 3000); do
    [ -e "$work/stop" ] && break
    if PGCONNECT_TIMEOUT=1 sql -c "INSERT INTO ledger VALUES ($id)" >/dev/null 2>&1; then
      echo "$(now) ok $id"
    else
      echo "$(now) fail $id"
    fi
    id=$((id + 1))
    sleep 0.02
  done
}

percentile() { sort -n | awk -v p="$1" '{ v[NR] = $1 } END { i = int((NR * p + 99) / 100); if (i < 1) i = 1; print v[i] }'; }

printf 'machine: %s, %s cores; docker %s\n' "$(uname -r)" "$(nproc)" "$(docker version --format '{{.Server.Version}}')"
printf '%-11s %5s %8s %7s %5s %9s\n' scenario round gap_s failed lost healthy_s
next=1
for scenario in $scenarios; do
  : >"$work/$scenario.gap"; : >"$work/$scenario.healthy"; : >"$work/$scenario.lost"
  for round in $(seq 1 "$runs"); do
    running || wait_running "$(now)" >/dev/null
    primary=$(status | jq -r .primary.container)
    rm -f "$work/stop"
    writer "$next" >"$work/writes" &
    wpid=$!
    sleep 2
    t0=$(now)
    case $scenario in
      switchover) "$bin" switchover "$name" >/dev/null 2>>"$work/log" ;;
      stop) docker stop "$primary" >/dev/null ;;
      kill) docker kill -s KILL "$primary" >/dev/null ;;
    esac
    healthy=$(wait_running "$t0")
    if [ "$scenario" = stop ]; then
      # The old primary comes back and must rejoin as a replica.
      t1=$(now); docker start "$primary" >/dev/null; rejoin=$(wait_running "$t1")
      healthy="$healthy+$rejoin"
    fi
    sleep 2
    touch "$work/stop"; wait "$wpid"
    next=$(( $(tail -n 1 "$work/writes" | awk '{ print $3 }') + 1 ))
    gap=$(awk '$2 == "ok" { if (last) { d = $1 - last; if (d > max) max = d } last = $1 } END { printf "%.2f", max }' "$work/writes")
    failed=$(grep -c ' fail ' "$work/writes" || true)
    grep ' ok ' "$work/writes" | awk '{ print $3 }' | sort -n >"$work/acked"
    sql -c "SELECT id FROM ledger WHERE id >= $(head -n 1 "$work/writes" | awk '{ print $3 }') ORDER BY id" | sort -n >"$work/present"
    lost=$(comm -23 "$work/acked" "$work/present" | wc -l)
    printf '%-11s %5s %8s %7s %5s %9s\n' "$scenario" "$round" "$gap" "$failed" "$lost" "$healthy"
    echo "$gap" >>"$work/$scenario.gap"; echo "$lost" >>"$work/$scenario.lost"
    echo "${healthy%%+*}" >>"$work/$scenario.healthy"
  done
  printf '%-11s gap p50 %s p95 %s max %s; lost total %s; healthy again p50 %s max %s\n' "$scenario" \
    "$(percentile 50 <"$work/$scenario.gap")" "$(percentile 95 <"$work/$scenario.gap")" \
    "$(percentile 100 <"$work/$scenario.gap")" "$(paste -sd+ "$work/$scenario.lost" | bc)" \
    "$(percentile 50 <"$work/$scenario.healthy")" "$(percentile 100 <"$work/$scenario.healthy")"
done
