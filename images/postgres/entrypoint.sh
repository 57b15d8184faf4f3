#!/bin/sh
# Starts one PostgreSQL instance of a pgbalancer cluster, in the role the controller gave it.
#
# The role is runtime state, never part of how the container or pod was made: on Docker the
# file /etc/pgbalancer/role (uploaded by the controller, kept across restarts), on Kubernetes
# the pod's `pgbalancer.io/role` label seen through a downward-API file (PGB_ROLE_FROM_LABELS).
# Until a role is given the entrypoint waits.
#
# - primary, empty data directory, in a cluster that has never had a primary (the controller
#   marks one that has: see `initialised`; such a start fails, so that the data a replica
#   holds takes over instead of an empty database): `initdb` (scram-sha-256, data checksums), then the roles,
#   the database, and `pgbalancer.scram_verifier(role)` in the `postgres` database: the
#   verifier a role logs in with now, for the monitoring role only (the
#   native balancer engine checks clients against it and logs their sessions in to servers
#   with their own proof).
# - every start: TLS with a key and self-signed certificate of the instance's own, made once
#   on its data volume (`tls/`).
# - replica, empty data directory: `pg_basebackup -R` from PGB_PRIMARY_HOST (`<cluster>-rw`,
#   which always reaches the current primary) through the instance's physical slot.
# - replica whose data was a primary (no standby.signal: a fenced old primary): `pg_rewind`
#   from the current primary; when rewind fails, the data directory is kept aside once
#   (data.diverged) and a fresh clone made. It never starts writable.
# - replica whose data another database system made (system identifier differs from the
#   primary's): the start fails, saying so; nothing is moved or removed.
# - otherwise the data directory starts as it is; a replica always streams from
#   PGB_PRIMARY_HOST, following timeline changes (`recovery_target_timeline = latest`).
# - on Kubernetes, a primary with data waits until the API server answers before it starts
#   (its labels file may be stale); with live.sh as its liveness probe it steps down by itself
#   when fenced or cut off (see live.sh).
#
# Inputs: /etc/pgbalancer/{postgresql.conf,pg_hba.conf,role}, /etc/pgbalancer/secrets/*
# (copied there from PGB_CONFIG_FROM when set), and PGB_PRIMARY_HOST, PGB_SLOT_NAME,
# PGB_APPLICATION_NAME, PGB_DATABASE, PGB_APP_USER, PGB_ROLE_FROM_LABELS.
set -eu

CONF=/etc/pgbalancer
SECRETS=$CONF/secrets
: "${PGDATA:=/var/lib/pgbalancer/data}"
umask 077
# Until the server runs (exec below), a stop request ends the bootstrap at once.
trap 'exit 143' TERM INT

log() { echo "pgbalancer-postgres: $*" >&2; }
# Ends the start saying why: in the log, and where Kubernetes keeps it (the container's
# termination message, shown in the pod's status and by the operator).
fail() {
  log "cannot start: $*"
  { printf '%s' "$*" >/dev/termination-log; } 2>/dev/null || true
  exit 1
}
secret() { cat "$SECRETS/$1"; }
# Single quotes doubled, for SQL string literals and conninfo values.
quote() { printf '%s' "$1" | sed "s/'/''/g"; }

# The role given by the controller, or nothing yet.
role() {
  if [ -n "${PGB_ROLE_FROM_LABELS:-}" ]; then
    sed -n 's/^pgbalancer\.io\/role="\(primary\|replica\)"$/\1/p' "$PGB_ROLE_FROM_LABELS" 2>/dev/null || true
  else
    cat "$CONF/role" 2>/dev/null || true
  fi
}

# Whether the controller says the cluster has had a primary (Docker: the file `initialised`
# next to the role file; Kubernetes: the pod's `pgbalancer.io/initialised` label).
initialised() {
  if [ -n "${PGB_ROLE_FROM_LABELS:-}" ]; then
    grep -q '^pgbalancer\.io/initialised="true"$' "$PGB_ROLE_FROM_LABELS" 2>/dev/null
  else
    [ -e "$CONF/initialised" ]
  fi
}

src=${PGB_PRIMARY_HOST:?PGB_PRIMARY_HOST is required}

initialise_primary() {
  log "initialising a new primary in $PGDATA"
  initdb -D "$PGDATA" -U postgres -E UTF8 --locale=C.UTF-8 --data-checksums \
    --auth-local=peer --auth-host=scram-sha-256 --pwfile="$SECRETS/superuser-password" >/dev/null
  db=${PGB_DATABASE:-app}
  app=${PGB_APP_USER:-app}
  # No standby exists yet: with synchronous replication configured, commits here would wait.
  postgres --single -D "$PGDATA" -c config_file="$CONF/postgresql.conf" \
    -c synchronous_commit=local postgres >/dev/null <<SQL
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '$(quote "$(secret replication-password)")';
CREATE ROLE pgbalancer_monitor WITH LOGIN PASSWORD '$(quote "$(secret monitor-password)")' IN ROLE pg_monitor;
CREATE ROLE "$app" WITH LOGIN PASSWORD '$(quote "$(secret app-password)")';
CREATE DATABASE "$db" OWNER "$app";
CREATE SCHEMA pgbalancer;
CREATE FUNCTION pgbalancer.scram_verifier(role_name text) RETURNS text LANGUAGE sql STABLE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = role_name AND rolcanlogin AND (rolvaliduntil IS NULL OR rolvaliduntil > now()) AND rolpassword LIKE ''SCRAM-SHA-256\$%''';
REVOKE ALL ON FUNCTION pgbalancer.scram_verifier(text) FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbalancer TO pgbalancer_monitor;
GRANT EXECUTE ON FUNCTION pgbalancer.scram_verifier(text) TO pgbalancer_monitor;
SQL
}

wait_for_primary() {
  log "waiting for $src to accept connections"
  until pg_isready -q -h "$src" -p 5432 -t 1; do sleep 0.2; done
}

clone_from_primary() {
  slot=${PGB_SLOT_NAME:?PGB_SLOT_NAME is required for a replica}
  app=${PGB_APPLICATION_NAME:?PGB_APPLICATION_NAME is required for a replica}
  export PGPASSFILE="$SECRETS/pgpass"
  wait_for_primary
  # A slot left by an earlier replica of the same name may be lost (WAL past
  # max_slot_wal_keep_size): start from a fresh one. The controller may create it meanwhile.
  pg_receivewal --drop-slot --slot="$slot" -h "$src" -U replicator -w >/dev/null 2>&1 || true
  pg_receivewal --create-slot --if-not-exists --slot="$slot" -h "$src" -U replicator -w >/dev/null
  rm -rf "$PGDATA.partial"
  log "cloning from $src (slot $slot)"
  pg_basebackup -h "$src" -p 5432 -U replicator -w -D "$PGDATA.partial" -X stream -S "$slot" -R \
    -d "application_name=$app" --checkpoint=fast
  mv "$PGDATA.partial" "$PGDATA"
}

# Streams from whichever instance holds PGB_PRIMARY_HOST, through the instance's slot.
follow_primary() {
  slot=${PGB_SLOT_NAME:?PGB_SLOT_NAME is required for a replica}
  app=${PGB_APPLICATION_NAME:?PGB_APPLICATION_NAME is required for a replica}
  auto="$PGDATA/postgresql.auto.conf"
  touch "$auto"
  sed -i -e '/^primary_conninfo/d' -e '/^primary_slot_name/d' -e '/^recovery_target_timeline/d' "$auto"
  cat >>"$auto" <<CONF
primary_conninfo = 'host=$(quote "$src") port=5432 user=replicator passfile=$SECRETS/pgpass application_name=$(quote "$app")'
primary_slot_name = '$slot'
recovery_target_timeline = 'latest'
CONF
  touch "$PGDATA/standby.signal"
}

# The database system identifier of the server at PGB_PRIMARY_HOST (a replication
# connection's IDENTIFY_SYSTEM), asked for up to $1 seconds (the primary may be starting
# too); nothing when it did not answer.
primary_system() {
  asked_until=$(($(date +%s) + $1))
  while :; do
    id=$(PGPASSFILE="$SECRETS/pgpass" PGCONNECT_TIMEOUT=2 timeout 3 psql -XAtqw \
      "host=$src port=5432 user=replicator dbname=replication replication=true" \
      -c IDENTIFY_SYSTEM 2>/dev/null | cut -d'|' -f1)
    if [ -n "$id" ] || [ "$(date +%s)" -ge "$asked_until" ]; then
      printf '%s' "$id"
      return 0
    fi
    sleep 1
  done
}

# Data made by another database system (a volume left by an earlier cluster of the same
# name, or mounted by mistake) can never stream from or rewind to this primary. Nothing is
# moved or removed: the start fails, naming both systems, until the volume is dealt with.
# When the primary does not answer within 30 s, the data starts as it is (it streams once
# it can; the controller restarts it if it turns out foreign and it can log in to it).
refuse_foreign_data() {
  theirs=$(primary_system 30)
  [ -n "$theirs" ] || log "$src did not answer for 30 s: starting without comparing database systems"
  ours=$(LC_ALL=C pg_controldata "$PGDATA" 2>/dev/null | sed -n 's/^Database system identifier: *//p')
  if [ -n "$theirs" ] && [ -n "$ours" ] && [ "$theirs" != "$ours" ]; then
    fail "the data directory $PGDATA belongs to another database system (identifier $ours; the primary's is $theirs), so it cannot replicate from $src: remove this instance's volume (or move its data away) to clone afresh"
  fi
}

# A former primary joins the current one: pg_rewind, else a fresh clone with the old data
# kept aside (once: a second diverged copy is never made, the start fails instead).
rejoin() {
  wait_for_primary
  refuse_foreign_data
  log "rejoining as a replica of $src"
  # The server always runs as PID 1 of its container (exec below). After a crash its
  # postmaster.pid names PID 1, which is this script now: pg_rewind's single-user recovery
  # would take it for a live postmaster. Only a file naming PID 1 is removed.
  if [ -f "$PGDATA/postmaster.pid" ] && [ "$(head -n 1 "$PGDATA/postmaster.pid")" = 1 ]; then
    log "removing the crashed server's postmaster.pid"
    rm -f "$PGDATA/postmaster.pid"
  fi
  # The password goes through the environment, never the command line (`ps` shows that).
  if PGPASSWORD="$(secret superuser-password)" pg_rewind --target-pgdata="$PGDATA" \
    --source-server="host=$(quote "$src") port=5432 user=postgres dbname=postgres" --progress >&2; then
    log "pg_rewind finished"
    return 0
  fi
  if [ -e "$PGDATA.diverged" ]; then
    fail "pg_rewind failed and $PGDATA.diverged already holds an earlier diverged copy; refusing to set another aside: move it away to continue"
  fi
  log "pg_rewind failed: keeping the diverged data in $PGDATA.diverged and cloning afresh"
  mv "$PGDATA" "$PGDATA.diverged"
  clone_from_primary
}

if [ -n "${PGB_CONFIG_FROM:-}" ]; then
  # Kubernetes: ConfigMap and Secret files are mounted read-only and group-readable; copy them
  # where the server and libpq expect them, private to this user.
  # Copies left by an earlier start of this container (a scratch volume outlives it) are
  # read-only: replaced, never written into.
  rm -rf "$CONF/postgresql.conf" "$CONF/pg_hba.conf" "$SECRETS"
  mkdir -p "$SECRETS"
  cp "$PGB_CONFIG_FROM"/postgresql.conf "$PGB_CONFIG_FROM"/pg_hba.conf "$CONF"/
  for f in "$PGB_CONFIG_FROM"/secrets/*; do cp "$f" "$SECRETS/$(basename "$f")"; done
  chmod 0600 "$SECRETS"/*
fi

given=$(role)
if [ -z "$given" ]; then
  log "waiting for the controller to give this instance its role"
  # Bounded: after 10 minutes the container exits and its restart policy tries again.
  i=0
  while [ -z "$given" ] && [ "$i" -lt 3000 ]; do sleep 0.2; i=$((i + 1)); given=$(role); done
  [ -n "$given" ] || fail "no role given"
fi
log "role: $given"

# On Kubernetes the labels file is only as fresh as the kubelet's view of the API server: a
# primary that cannot reach it may have been replaced meanwhile, so it does not start writable
# until it can (bounded: after 10 minutes the container exits and is started again).
if [ -n "${PGB_ROLE_FROM_LABELS:-}" ] && [ "$given" = primary ] && [ -s "$PGDATA/PG_VERSION" ]; then
  i=0
  until pgbalancer-live --api; do
    [ "$i" -eq 0 ] && log "the API server does not answer: not starting as primary until it does"
    i=$((i + 1))
    [ "$i" -lt 600 ] || fail "the API server did not answer for 10 minutes"
    sleep 1
  done
  given=$(role)
  [ -n "$given" ] || fail "no role given"
  log "role: $given"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ "$given" = primary ]; then
    if initialised; then
      fail "this instance is to be the primary, but its data directory is empty and the cluster has had a primary: its data is lost, and a new empty database is not made in its place. A replica that holds the data takes over by automated failover; when none does, remove the cluster with its volumes and create it again to start empty"
    fi
    rm -rf "$PGDATA"
    initialise_primary
  else
    clone_from_primary
  fi
elif [ "$given" = replica ] && [ ! -e "$PGDATA/standby.signal" ]; then
  rejoin
elif [ "$given" = replica ]; then
  refuse_foreign_data
fi
if [ "$given" = replica ]; then
  follow_primary
fi

# TLS: a key and a self-signed certificate of this instance's own, made once on its data
# volume, so what crosses the network to it can be encrypted (the balancer's verifier lookups
# always are). Without openssl, or when making them fails, the server starts without TLS.
tls=$(dirname "$PGDATA")/tls
make_tls() {
  mkdir -p "$tls" &&
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500 \
      -subj "/CN=$(hostname)" -keyout "$tls/server.key.new" -out "$tls/server.crt.new" >/dev/null 2>&1 &&
    chmod 0600 "$tls/server.key.new" &&
    mv "$tls/server.key.new" "$tls/server.key" &&
    mv "$tls/server.crt.new" "$tls/server.crt"
}
if [ ! -s "$tls/server.key" ] || [ ! -s "$tls/server.crt" ]; then
  make_tls || log "could not make a TLS certificate: serving without TLS"
fi
# The server refuses a key others may read (a volume mounted with fsGroup can widen it).
if [ -s "$tls/server.key" ] && [ -s "$tls/server.crt" ] && chmod 0600 "$tls/server.key"; then
  exec postgres -D "$PGDATA" -c config_file="$CONF/postgresql.conf" \
    -c ssl=on -c ssl_cert_file="$tls/server.crt" -c ssl_key_file="$tls/server.key"
fi
exec postgres -D "$PGDATA" -c config_file="$CONF/postgresql.conf"
