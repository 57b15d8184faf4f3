#!/usr/bin/env bash
# Prepares a Debian machine for pgbalancer: Docker engine, debootstrap, PostgreSQL client, jq.
# Installs only what is missing and starts dockerd when no engine answers. Idempotent.
set -euo pipefail

log() { printf '==> %s\n' "$*" >&2; }

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v psql >/dev/null || need+=(postgresql-client)
command -v jq >/dev/null || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${need[*]}; run as root or install them with apt-get" >&2
    exit 1
  fi
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "no Docker engine answers and starting one needs root" >&2
    exit 1
  fi
  log "starting dockerd (log: /var/log/pgbalancer-dockerd.log)"
  nohup dockerd >/var/log/pgbalancer-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/pgbalancer-dockerd.log" >&2; exit 1; }
fi
log "Docker engine $(docker version --format '{{.Server.Version}}' 2>/dev/null) ready"
