#!/usr/bin/env bash
# A real node for the end-to-end test, on this machine's Docker engine: kubelet (dockershim),
# kube-proxy (iptables), cluster DNS from dnsmasq kept current from the API, and a default
# host-path StorageClass. Needs control-plane.sh started with
# PGBALANCER_K8S_BIND=0.0.0.0 PGBALANCER_K8S_ADVERTISE=<docker0 address> so pods reach the API.
# `start` or `stop`. Test plumbing only.
set -euo pipefail

cache=${PGBALANCER_K8S_CACHE:-/var/cache/pgbalancer/kubernetes-1.20.2-p1}
dir=${PGBALANCER_K8S_DIR:-/tmp/pgbalancer-k8s}
kc=$dir/kubeconfig
# Pods live on docker0; DNS listens on its address.
dns_ip=$(ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1)
pod_cidr=$(ip -4 -o route show dev docker0 | awk '/proto kernel/ {print $1; exit}')
cmd=${1:-start}
service_cidr=${PGBALANCER_K8S_SERVICE_CIDR:-10.96.0.0/16}

stop() {
  iptables -D DOCKER-USER -d "$service_cidr" -j REJECT 2>/dev/null || true
  for name in dns-sync dnsmasq kube-proxy kubelet; do
    [ -f "$dir/$name.pid" ] && kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
  done
  sleep 1
  for name in dns-sync dnsmasq kube-proxy kubelet; do
    [ -f "$dir/$name.pid" ] && kill -9 "$(cat "$dir/$name.pid")" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
  # Pods the kubelet started, and the volumes it mounted for them.
  docker ps -aq --filter label=io.kubernetes.pod.name | xargs -r docker rm -f >/dev/null 2>&1 || true
  grep -o " $dir/kubelet[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi
stop

need=()
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v conntrack >/dev/null || need+=(conntrack)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Pause image: anything that sleeps forever.
if ! docker image inspect pgbalancer/pause:1 >/dev/null 2>&1; then
  root=$(mktemp -d)
  mkdir -p "$root/bin"
  cp /bin/busybox "$root/bin/busybox"
  ln -s busybox "$root/bin/sleep"
  tar -C "$root" -c . | docker import -c 'CMD ["/bin/sleep","2147483647"]' - pgbalancer/pause:1 >/dev/null
  rm -rf "$root"
fi

modprobe br_netfilter 2>/dev/null || true
sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
sysctl -qw net.ipv4.ip_forward=1

run() {
  local name=$1; shift
  nohup "$@" >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

mkdir -p "$dir/kubelet" "$dir/hostpath"
cat >"$dir/kubelet.yaml" <<KCFG
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
evictionHard: {}
# The node shares this machine's Docker engine: the kubelet must never garbage-collect its
# images (the locally built operator, instance and balancer images have no registry to
# pull them back from). 100 turns image garbage collection off.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDNS: [$dns_ip]
clusterDomain: cluster.local
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
syncFrequency: 10s
KCFG
cgroup_driver=$(docker info --format '{{.CgroupDriver}}')
sed -i "s/^cgroupDriver: .*/cgroupDriver: $cgroup_driver/" "$dir/kubelet.yaml"
run kubelet "$cache/kubelet" --kubeconfig "$kc" --config "$dir/kubelet.yaml" --container-runtime docker \
  --pod-infra-container-image pgbalancer/pause:1 --hostname-override node1 --oom-score-adj=0 \
  --root-dir "$dir/kubelet" --address 0.0.0.0
run kube-proxy "$cache/kube-proxy" --kubeconfig "$kc" --hostname-override node1 --proxy-mode iptables \
  --cluster-cidr "$pod_cidr" --oom-score-adj=0 --conntrack-max-per-core=0
# kube-proxy's FORWARD rules come after Docker's, whose "from docker0, not to docker0: ACCEPT"
# matches first: a pod's connection to a Service without ready endpoints would then skip
# kube-proxy's REJECT and leave through the host's default route (on a machine whose gateway
# answers anything, psql then reads "invalid response to SSL negotiation"). Refuse it here, as
# kube-proxy does on a node of its own. DOCKER-USER is Docker's place for such rules; a Service
# address with endpoints is already translated to a pod's address before FORWARD.
if iptables -nL DOCKER-USER >/dev/null 2>&1; then
  iptables -C DOCKER-USER -d "$service_cidr" -j REJECT 2>/dev/null ||
    iptables -I DOCKER-USER -d "$service_cidr" -j REJECT
else
  echo "node.sh: no DOCKER-USER chain (Docker without iptables?): Services without endpoints are not refused" >&2
fi

# Cluster DNS: dnsmasq on docker0, hosts regenerated from Services and Endpoints.
touch "$dir/hosts"
run dnsmasq dnsmasq --keep-in-foreground --listen-address=$dns_ip --bind-interfaces --no-resolv \
  --addn-hosts="$dir/hosts" --pid-file="$dir/dnsmasq.real.pid" --user=root
cat >"$dir/dns-sync.sh" <<'SYNC'
#!/usr/bin/env bash
# Writes every Service (ClusterIP) and headless endpoint as hosts lines; HUPs dnsmasq on change.
# While the API server does not answer, the last names stay (as a DNS cache would serve them).
kc=$1; hosts=$2; pidfile=$3
names() {
  local svc eps
  svc=$(kubectl --kubeconfig "$kc" get svc -A -o jsonpath='{range .items[*]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.cluster.local{"\n"}{end}' 2>/dev/null) || return 1
  eps=$(kubectl --kubeconfig "$kc" get endpoints -A -o json 2>/dev/null) || return 1
  grep -v '^None ' <<<"$svc"
  python3 -c '
import json,sys
for e in json.load(sys.stdin)["items"]:
    svc=e["metadata"]["name"]; ns=e["metadata"]["namespace"]
    for s in e.get("subsets") or []:
        for a in (s.get("addresses") or [])+(s.get("notReadyAddresses") or []):
            if a.get("hostname"):
                print(a["ip"], "%s.%s.%s.svc.cluster.local" % (a["hostname"], svc, ns))
' <<<"$eps"
}
while true; do
  new=$(mktemp)
  if names >"$new" && ! cmp -s "$new" "$hosts"; then
    mv "$new" "$hosts"
    [ -f "$pidfile" ] && kill -HUP "$(cat "$pidfile")" 2>/dev/null
  else
    rm -f "$new"
  fi
  sleep 1
done
SYNC
chmod +x "$dir/dns-sync.sh"
run dns-sync "$dir/dns-sync.sh" "$kc" "$dir/hosts" "$dir/dnsmasq.real.pid"

kubectl --kubeconfig "$kc" apply -f - >/dev/null <<'SC'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: hostpath
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: kubernetes.io/host-path
reclaimPolicy: Delete
SC
for _ in $(seq 1 60); do
  kubectl --kubeconfig "$kc" get node node1 -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -q True && break
  sleep 1
done
kubectl --kubeconfig "$kc" get node node1 -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' | grep -q True \
  || { tail -30 "$dir/kubelet.log" >&2; exit 1; }
echo "node1 Ready" >&2
