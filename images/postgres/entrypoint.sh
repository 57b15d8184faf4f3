#!/bin/sh
# Starts one PostgreSQL instance of a pgbalancer cluster.
#
# On an empty data directory it bootstraps once: `initdb` (scram-sha-256, data checksums) and the
# cluster's roles and database when PGB_BOOTSTRAP_FROM is empty, otherwise `pg_basebackup -R`
# from that host with a physical replication slot. An existing data directory is started as it
# is: whether it runs as primary or standby is decided by its own `standby.signal`, so a later
# promotion or re-pointing never depends on how the container was created.
#
# Inputs: /etc/pgbalancer/{postgresql.conf,pg_hba.conf}, /etc/pgbalancer/secrets/* (copied
# there from PGB_CONFIG_FROM when set), and PGB_BOOTSTRAP_FROM, PGB_SLOT_NAME,
# PGB_APPLICATION_NAME, PGB_DATABASE, PGB_APP_USER.
set -eu

CONF=/etc/pgbalancer
SECRETS=$CONF/secrets
: "${PGDATA:=/var/lib/pgbalancer/data}"
umask 077
# Until the server runs (exec below), a stop request ends the bootstrap at once.
trap 'exit 143' TERM INT

log() { echo "pgbalancer-postgres: $*" >&2; }
secret() { cat "$SECRETS/$1"; }
# Single quotes doubled, for SQL string literals and conninfo values.
quote() { printf '%s' "$1" | sed "s/'/''/g"; }

initialise_primary() {
  log "initialising a new primary in $PGDATA"
  initdb -D "$PGDATA" -U postgres -E UTF8 --locale=C.UTF-8 --data-checksums \
    --auth-local=peer --auth-host=scram-sha-256 --pwfile="$SECRETS/superuser-password" >/dev/null
  db=${PGB_DATABASE:-app}
  app=${PGB_APP_USER:-app}
  postgres --single -D "$PGDATA" -c config_file="$CONF/postgresql.conf" postgres >/dev/null <<SQL
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '$(quote "$(secret replication-password)")';
CREATE ROLE pgbalancer_monitor WITH LOGIN PASSWORD '$(quote "$(secret monitor-password)")' IN ROLE pg_monitor;
CREATE ROLE "$app" WITH LOGIN PASSWORD '$(quote "$(secret app-password)")';
CREATE DATABASE "$db" OWNER "$app";
SQL
}

clone_from_primary() {
  src=$PGB_BOOTSTRAP_FROM
  slot=${PGB_SLOT_NAME:?PGB_SLOT_NAME is required for a replica}
  app=${PGB_APPLICATION_NAME:?PGB_APPLICATION_NAME is required for a replica}
  export PGPASSFILE="$SECRETS/pgpass"
  log "waiting for $src to accept connections"
  until pg_isready -q -h "$src" -p 5432 -t 1; do sleep 0.2; done
  # A slot left by an earlier replica of the same name would make -C fail.
  pg_receivewal --drop-slot --slot="$slot" -h "$src" -U replicator -w >/dev/null 2>&1 || true
  rm -rf "$PGDATA.partial"
  log "cloning from $src (slot $slot)"
  pg_basebackup -h "$src" -p 5432 -U replicator -w -D "$PGDATA.partial" -X stream -C -S "$slot" -R \
    -d "application_name=$app" --checkpoint=fast
  cat >>"$PGDATA.partial/postgresql.auto.conf" <<CONF
primary_conninfo = 'host=$(quote "$src") port=5432 user=replicator passfile=$SECRETS/pgpass application_name=$(quote "$app")'
primary_slot_name = '$slot'
CONF
  mv "$PGDATA.partial" "$PGDATA"
}

if [ -n "${PGB_CONFIG_FROM:-}" ]; then
  # Kubernetes: ConfigMap and Secret files are mounted read-only and group-readable; copy them
  # where the server and libpq expect them, private to this user.
  mkdir -p "$SECRETS"
  cp "$PGB_CONFIG_FROM"/postgresql.conf "$PGB_CONFIG_FROM"/pg_hba.conf "$CONF"/
  for f in "$PGB_CONFIG_FROM"/secrets/*; do cp "$f" "$SECRETS/$(basename "$f")"; done
  chmod 0600 "$SECRETS"/*
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${PGB_BOOTSTRAP_FROM:-}" ]; then
    rm -rf "$PGDATA"
    initialise_primary
  else
    clone_from_primary
  fi
fi

exec postgres -D "$PGDATA" -c config_file="$CONF/postgresql.conf"
