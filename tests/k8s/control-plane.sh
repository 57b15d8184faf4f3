#!/usr/bin/env bash
# The tests' Kubernetes: etcd, kube-apiserver, kube-controller-manager (garbage collection,
# StatefulSets, Deployments) and kube-scheduler from the binaries built by
# build-kubernetes.sh, on loopback. `start` prints `export KUBECONFIG=...`; `stop` ends it all;
# `pause-apiserver [SECONDS]` stops the API server for SECONDS (default 30) and starts it again
# with the same command, returning once it is ready.
set -euo pipefail

cache=${PGBALANCER_K8S_CACHE:-/var/cache/pgbalancer/kubernetes-1.20.2-p1}
dir=${PGBALANCER_K8S_DIR:-/tmp/pgbalancer-k8s}
cmd=${1:-start}

stop() {
  for p in "$dir"/*.pid; do
    [ -f "$p" ] || continue
    kill "$(cat "$p")" 2>/dev/null || true
  done
  sleep 1
  for p in "$dir"/*.pid; do
    [ -f "$p" ] || continue
    kill -9 "$(cat "$p")" 2>/dev/null || true
    rm -f "$p"
  done
}

run() {
  local name=$1; shift
  nohup "$@" >>"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

ready() {
  for _ in $(seq 1 120); do
    kubectl --kubeconfig "$dir/kubeconfig" get --raw /readyz >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  kubectl --kubeconfig "$dir/kubeconfig" get --raw /readyz >/dev/null || { tail -20 "$dir/kube-apiserver.log" >&2; exit 1; }
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi

if [ "$cmd" = pause-apiserver ]; then
  pid=$(cat "$dir/kube-apiserver.pid")
  mapfile -d '' args <"/proc/$pid/cmdline"
  # The outage lasts SECONDS from the moment the server stops answering: an API server slow to
  # drain its connections (it can take 15 s) is killed after 3.
  from=$(date +%s.%N)
  kill "$pid"
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  sleep "$(awk -v from="$from" -v now="$(date +%s.%N)" -v s="${2:-30}" 'BEGIN { r = s - (now - from); print (r > 0 ? r : 0) }')"
  run kube-apiserver "${args[@]}"
  ready
  exit 0
fi

stop
# Volumes a previous kubelet mounted under the directory outlive it.
grep -o " $dir/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
rm -rf "$dir"
mkdir -p "$dir/etcd" "$dir/certs"
command -v etcd >/dev/null || { echo "etcd missing: run tests/k8s/build-kubernetes.sh" >&2; exit 1; }
command -v kubectl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null

token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$token,admin,admin,system:masters" >"$dir/tokens.csv"
openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null
openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null
advertise=${PGBALANCER_K8S_ADVERTISE:-127.0.0.1}
bind=${PGBALANCER_K8S_BIND:-127.0.0.1}

run etcd etcd --data-dir "$dir/etcd" --listen-client-urls http://127.0.0.1:23790 \
  --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 \
  --initial-advertise-peer-urls http://127.0.0.1:23800 --initial-cluster default=http://127.0.0.1:23800
run kube-apiserver "$cache/kube-apiserver" --etcd-servers http://127.0.0.1:23790 \
  --bind-address "$bind" --advertise-address "$advertise" --secure-port 6443 --cert-dir "$dir/certs" \
  --token-auth-file "$dir/tokens.csv" --authorization-mode RBAC \
  --service-account-key-file "$dir/sa.pub" --service-account-signing-key-file "$dir/sa.key" \
  --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range "${PGBALANCER_K8S_SERVICE_CIDR:-10.96.0.0/16}" \
  --allow-privileged --kubelet-preferred-address-types InternalIP,Hostname

cat >"$dir/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:6443
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: $token
contexts:
- name: test
  context: {cluster: test, user: admin}
current-context: test
KC
ready
# The serving CA (second certificate of the self-signed bundle) for ServiceAccount tokens.
awk 'BEGIN{n=0} /BEGIN CERT/{n++} n==2' "$dir/certs/apiserver.crt" >"$dir/ca.crt"
run kube-controller-manager "$cache/kube-controller-manager" --kubeconfig "$dir/kubeconfig" \
  --service-account-private-key-file "$dir/sa.key" --root-ca-file "$dir/ca.crt" \
  --controllers '*,-nodeipam' --leader-elect=false --enable-hostpath-provisioner=true \
  --use-service-account-credentials=false
run kube-scheduler "$cache/kube-scheduler" --kubeconfig "$dir/kubeconfig" --leader-elect=false
echo "export KUBECONFIG=$dir/kubeconfig"
