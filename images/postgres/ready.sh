#!/bin/sh
# Readiness of an instance: accepting connections and, on a standby, streaming from the primary.
set -eu
pg_isready -q -h /var/run/postgresql -p 5432 || exit 1
ready=$(psql -X -q -h /var/run/postgresql -U postgres -d postgres -Atc \
  "SELECT CASE WHEN pg_is_in_recovery() THEN (SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming') ELSE 1 END") || exit 1
[ "$ready" = 1 ]
