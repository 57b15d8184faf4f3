#!/usr/bin/env bash
# Local-mode benchmark: in the same run, seconds from `pgbalancer up` to all-healthy-and-routing
# for the example cluster (1 primary + 2 replicas + 1 balancer, images already built), seconds
# for `pgbalancer scale` +1 replica, and seconds for `pgbalancer down`. RUNS rounds (default 5);
# prints each round and the median. Needs the Docker engine (scripts/host-setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

runs=${RUNS:-5}
cargo build --release --quiet --bins
bin=$PWD/target/release/pgbalancer
"$bin" images build >/dev/null 2>&1

work=$(mktemp -d)
trap '"$bin" down bench-local >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
export PGBALANCER_STATE_DIR=$work/state
# The example cluster under its own name, on ports Docker picks, so it can run beside anything.
sed -e 's/^  name: demo$/  name: bench-local/' -e '/^  local:/,$d' examples/cluster.yaml >"$work/cluster.yaml"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

printf 'machine: %s, %s cores, %s; docker %s\n' "$(uname -r)" "$(nproc)" \
  "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)" "$(docker version --format '{{.Server.Version}}')"
printf '%-5s %8s %12s %8s\n' round up scale+1 down
: >"$work/up"; : >"$work/scale"; : >"$work/down"
for round in $(seq 1 "$runs"); do
  t0=$(now); "$bin" up -f "$work/cluster.yaml" >/dev/null 2>"$work/log" || { cat "$work/log"; exit 1; }
  t1=$(now); "$bin" scale bench-local --replicas 3 >/dev/null 2>>"$work/log" || { cat "$work/log"; exit 1; }
  t2=$(now); "$bin" down bench-local >/dev/null 2>>"$work/log"
  t3=$(now)
  printf '%-5s %8s %12s %8s\n' "$round" "$(secs "$t0" "$t1")" "$(secs "$t1" "$t2")" "$(secs "$t2" "$t3")"
  secs "$t0" "$t1" >>"$work/up"; echo >>"$work/up"
  secs "$t1" "$t2" >>"$work/scale"; echo >>"$work/scale"
  secs "$t2" "$t3" >>"$work/down"; echo >>"$work/down"
done
printf '%-5s %8s %12s %8s\n' median "$(grep . "$work/up" | median)" "$(grep . "$work/scale" | median)" "$(grep . "$work/down" | median)"
