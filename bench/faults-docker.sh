#!/usr/bin/env bash
# Fault harness, local mode. Brings up a cluster (2 replicas, 1 balancer), then per scenario and
# round runs a writer and a reader through the balancer's published port (one connection per
# statement; the writer records every acknowledged id), injects one fault, and prints: failed
# writes, the longest gap between acknowledged writes, failed reads, acknowledged writes lost
# (each must be present exactly once afterwards), the seconds until the cluster reports healthy
# again (Running, every replica streaming and up in the balancer, the controller running), and
# whether two instances were ever writable at once (sampled every 0.5 s).
#
# ENGINE (pgpool, the default, or native) serves the balancer's port.
# RUNS rounds (default 10) of each scenario in SCENARIOS (default: all but engine-restart, and
# without pgpool-kill for the native engine):
#   replica-kill     SIGKILL to a replica's PostgreSQL (its container's main process)
#   replica-restart  a replica container stopped, then started 3 s later
#   pgpool-kill      SIGKILL to pgpool inside the balancer container (the agent restarts it)
#   agent-kill       SIGKILL to the balancer agent (the container's first process starts it again)
#   balancer-kill    SIGKILL to the balancer container's main process (the container restarts)
#   balancer-stop    the balancer container stopped; nobody starts it but the controller
#   engine-restart   the Docker engine stopped and started again (every container comes back)
#   switchover       `pgbalancer switchover NAME` (planned)
#   stop             the primary container stopped; the controller fails over; the old
#                    primary is started again and must rejoin
#   kill             SIGKILL to the primary's PostgreSQL
# Only 127.0.0.1 ports are used; SQL to containers runs inside them (`docker exec`).
# Needs the Docker engine, psql and jq (scripts/host-setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

runs=${RUNS:-10}
engine=${ENGINE:-pgpool}
default_scenarios="replica-kill replica-restart pgpool-kill agent-kill balancer-kill balancer-stop switchover stop kill"
[ "$engine" = native ] && default_scenarios=${default_scenarios/pgpool-kill /}
scenarios=${SCENARIOS:-$default_scenarios}
name=${CLUSTER:-bench-faults}
cargo build --quiet --bins
bin=$PWD/target/debug/pgbalancer
"$bin" images build >/dev/null 2>&1

work=$(mktemp -d)
export PGBALANCER_STATE_DIR=$work/state
trap 'touch "$work/stop"; wait; "$bin" down "$name" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
cat >"$work/cluster.yaml" <<YAML
apiVersion: pgbalancer.io/v1alpha1
kind: PgBalancerCluster
metadata: {name: $name}
spec:
  replicas: 2
  balancer: {engine: $engine, numInitChildren: 16, maxPool: 2}
YAML
"$bin" up -f "$work/cluster.yaml" >/dev/null 2>"$work/log" || { cat "$work/log"; exit 1; }
status() { "$bin" status "$name" -o json --show-secrets 2>/dev/null; }
export PGPASSWORD; PGPASSWORD=$(status | jq -r .secrets.password)
port=$(status | jq -r .balancer.port)
# Every statement is bounded: one that hangs (a pgpool session once waited 7 min after a
# replica restart) counts as failed after 10 s.
sql() { PGCONNECT_TIMEOUT=1 timeout 10 psql -X -q -A -t -h 127.0.0.1 -p "$port" -U app -d app -v ON_ERROR_STOP=1 "$@"; }
sql -c "CREATE TABLE IF NOT EXISTS ledger (id bigint PRIMARY KEY)" >/dev/null

now() { date +%s.%N; }
healthy() {
  [ "$(status | jq -r '[.phase, .controller.state,
      (.replicas | map(.ready and (.balancerNode.status // "") == "up") | all),
      .balancer.ready] | join(" ")')" = "Running running true true" ]
}
# Waits (at most 180 s) until healthy; prints the seconds since $1.
wait_healthy() {
  local from=$1 i
  for i in $(seq 1 360); do
    if healthy; then awk -v a="$from" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; return; fi
    sleep 0.5
  done
  echo timeout
}

# Writes ids from $1 on, one connection each, until $work/stop exists (at most 5000 writes).
writer() {
  local id=$1 n
  for n in $(seq 1 5000); do
    [ -e "$work/stop" ] && break
    if sql -c "INSERT INTO ledger VALUES ($id)" >/dev/null 2>&1; then
      echo "$(now) ok $id"
    else
      echo "$(now) fail $id"
    fi
    id=$((id + 1))
    sleep 0.02
  done
}
# Reads through the balancer, one connection each, until $work/stop exists.
reader() {
  local n
  for n in $(seq 1 5000); do
    [ -e "$work/stop" ] && break
    if sql -c "SELECT count(*) FROM ledger" >/dev/null 2>&1; then echo ok; else echo fail; fi
    sleep 0.02
  done
}
# Counts samples (every 0.5 s) at which two instances accepted writes, asking each container.
split_brain_watch() {
  local n c writable split=0
  for n in $(seq 1 2000); do
    [ -e "$work/stop" ] && break
    writable=0
    for c in $(docker ps -q --filter "label=app.kubernetes.io/instance=$name" --filter "label=app.kubernetes.io/component=postgres"); do
      [ "$(docker exec "$c" psql -X -A -t -h /var/run/postgresql -U postgres -d postgres \
        -c 'SELECT NOT pg_is_in_recovery()' 2>/dev/null)" = t ] && writable=$((writable + 1))
    done
    [ "$writable" -gt 1 ] && split=$((split + 1))
    sleep 0.5
  done
  echo "$split"
}
engine_restart() {
  local pid
  pid=$(pidof dockerd)
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  ./scripts/host-setup.sh >/dev/null
}

percentile() { sort -n | awk -v p="$1" '{ v[NR] = $1 } END { i = int((NR * p + 99) / 100); if (i < 1) i = 1; print v[i] }'; }

printf 'machine: %s, %s cores; docker %s; balancer engine %s\n' "$(uname -r)" "$(nproc)" \
  "$(docker version --format '{{.Server.Version}}')" "$engine"
printf '%-16s %5s %7s %7s %7s %5s %6s %9s\n' scenario round failed gap_s r_fail lost split healthy_s
next=1
for scenario in $scenarios; do
  for f in gap healthy lost failed rfail; do : >"$work/$scenario.$f"; done
  for round in $(seq 1 "$runs"); do
    healthy || wait_healthy "$(now)" >/dev/null
    doc=$(status)
    primary=$(jq -r .primary.container <<<"$doc")
    replica=$(jq -r '.replicas[0].container' <<<"$doc")
    balancer=$(jq -r '.balancer.instances[0].name' <<<"$doc")
    rm -f "$work/stop"
    writer "$next" >"$work/writes" &
    reader >"$work/reads" &
    split_brain_watch >"$work/split" &
    sleep 2
    t0=$(now)
    case $scenario in
      replica-kill) docker kill -s KILL "$replica" >/dev/null ;;
      replica-restart) docker stop "$replica" >/dev/null; sleep 3; docker start "$replica" >/dev/null ;;
      pgpool-kill) docker exec "$balancer" sh -c 'kill -KILL "$(head -n 1 /var/run/pgbalancer/pgpool.pid)"' ;;
      agent-kill) docker exec "$balancer" sh -c 'kill -KILL "$(cat /var/run/pgbalancer/agent.pid)"' ;;
      balancer-kill) docker kill -s KILL "$balancer" >/dev/null ;;
      balancer-stop) docker stop "$balancer" >/dev/null ;;
      engine-restart) engine_restart ;;
      switchover) "$bin" switchover "$name" >/dev/null 2>>"$work/log" ;;
      stop) docker stop "$primary" >/dev/null ;;
      kill) docker kill -s KILL "$primary" >/dev/null ;;
      *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
    healthy_s=$(wait_healthy "$t0")
    if [ "$scenario" = stop ]; then
      # The old primary comes back and must rejoin as a replica.
      t1=$(now); docker start "$primary" >/dev/null; healthy_s="$healthy_s+$(wait_healthy "$t1")"
    fi
    sleep 2
    touch "$work/stop"; wait
    next=$(( $(tail -n 1 "$work/writes" | awk '{ print $3 }') + 1 ))
    gap=$(awk '$2 == "ok" { if (last) { d = $1 - last; if (d > max) max = d } last = $1 } END { printf "%.2f", max }' "$work/writes")
    failed=$(grep -c ' fail ' "$work/writes" || true)
    rfail=$(grep -c fail "$work/reads" || true)
    grep ' ok ' "$work/writes" | awk '{ print $3 }' | sort -n >"$work/acked"
    # Read back through the balancer; a connection may time out right after a fault (at most
    # 30 tries, 1 s apart).
    for _ in $(seq 1 30); do
      if sql -c "SELECT id FROM ledger WHERE id >= $(head -n 1 "$work/writes" | awk '{ print $3 }') ORDER BY id" 2>/dev/null \
        | sort -n >"$work/present"; then
        break
      fi
      sleep 1
    done
    lost=$(comm -23 "$work/acked" "$work/present" | wc -l)
    printf '%-16s %5s %7s %7s %7s %5s %6s %9s\n' "$scenario" "$round" "$failed" "$gap" "$rfail" "$lost" "$(cat "$work/split")" "$healthy_s"
    echo "$gap" >>"$work/$scenario.gap"; echo "$lost" >>"$work/$scenario.lost"
    echo "$failed" >>"$work/$scenario.failed"; echo "$rfail" >>"$work/$scenario.rfail"
    echo "${healthy_s%%+*}" >>"$work/$scenario.healthy"
  done
  printf '%-16s failed writes p50 %s max %s; gap p50 %s p95 %s max %s; failed reads max %s; lost total %s; healthy p50 %s max %s\n' "$scenario" \
    "$(percentile 50 <"$work/$scenario.failed")" "$(percentile 100 <"$work/$scenario.failed")" \
    "$(percentile 50 <"$work/$scenario.gap")" "$(percentile 95 <"$work/$scenario.gap")" \
    "$(percentile 100 <"$work/$scenario.gap")" "$(percentile 100 <"$work/$scenario.rfail")" \
    "$(paste -sd+ "$work/$scenario.lost" | bc)" \
    "$(percentile 50 <"$work/$scenario.healthy")" "$(percentile 100 <"$work/$scenario.healthy")"
done
