#!/usr/bin/env bash
# Starts the test Kubernetes with a node on this Docker engine: the control plane listening on
# the docker0 bridge (so pods reach the API server), then the kubelet node. Stop both with
# `node.sh stop` and `control-plane.sh stop`; the kubeconfig is $PGBALANCER_K8S_DIR/kubeconfig
# (default /tmp/pgbalancer-k8s).
set -euo pipefail
here=$(dirname "$0")
"$here/node.sh" stop
bridge=$(ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1)
PGBALANCER_K8S_BIND=0.0.0.0 PGBALANCER_K8S_ADVERTISE="$bridge" "$here/control-plane.sh" start >/dev/null
"$here/node.sh" start
