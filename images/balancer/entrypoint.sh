#!/bin/sh
# Starts pgpool-II with the configuration rendered by pgbalancer in /etc/pgbalancer.
# -D discards pgpool's remembered node status: the orchestrator attaches backends itself.
set -eu
exec pgpool -n -D -f /etc/pgbalancer/pgpool.conf -F /etc/pgbalancer/pcp.conf -a /etc/pgbalancer/pool_hba.conf
