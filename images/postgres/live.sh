#!/bin/bash
# Liveness of an instance on Kubernetes. Failing it makes the kubelet stop PostgreSQL (the
# preStop hook's fast shutdown) and start the container again, whose entrypoint then waits for
# the API server before a primary starts: this is how a primary steps down by itself.
#
# - A primary whose pod is labelled replica (the operator fenced it; the kubelet keeps the
#   labels file in step with the pod) fails at once.
# - A primary cut off from the API server and from every standby (no standby reply within the
#   last PGB_ISOLATION_WINDOW seconds, default 3; standbys reply every second) fails. A primary
#   with no physical replication slot has no standby planned, so nothing could be promoted in
#   its place, and it stays up.
# - Anything else passes: a starting, recovering or rewinding instance is never restarted here,
#   and neither is one too slow to answer within 4 s (a busy node is no reason to restart a
#   primary: the probe's own timeout is longer, so only this script's verdict counts).
#
# `pgbalancer-live --api` only tells whether the API server answers a TCP connection (exit 0)
# within two seconds; the entrypoint uses it.
set -u

api_reachable() {
  [ -n "${KUBERNETES_SERVICE_HOST:-}" ] || return 0
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' \
    "$KUBERNETES_SERVICE_HOST" "${KUBERNETES_SERVICE_PORT:-443}" 2>/dev/null
}

if [ "${1:-}" = --api ]; then
  api_reachable
  exit
fi

window=${PGB_ISOLATION_WINDOW:-3}
state=$(PGCONNECT_TIMEOUT=2 timeout 4 psql -X -q -h /var/run/postgresql -p 5432 -U postgres -d postgres -F' ' -Atc "
  SELECT pg_is_in_recovery(),
         (SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'physical'),
         (SELECT count(*) FROM pg_stat_replication
           WHERE reply_time > now() - make_interval(secs => $window))" 2>/dev/null) || exit 0
read -r in_recovery slots replying <<<"$state"
[ "$in_recovery" = f ] || exit 0

if [ -n "${PGB_ROLE_FROM_LABELS:-}" ] &&
  grep -qx 'pgbalancer.io/role="replica"' "$PGB_ROLE_FROM_LABELS" 2>/dev/null; then
  echo "stepping down: writable, but the pod is labelled replica (fenced)"
  exit 1
fi
[ "$slots" -gt 0 ] && [ "$replying" -eq 0 ] || exit 0
api_reachable && exit 0
echo "stepping down: isolated (no standby reply within ${window}s and the API server unreachable)"
exit 1
