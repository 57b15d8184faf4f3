#!/usr/bin/env bash
# Builds the Kubernetes 1.20.2 server binaries from Debian bookworm's source package, for the
# test cluster: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy.
# Cached in $PGBALANCER_K8S_CACHE (default /var/cache/pgbalancer/kubernetes-1.20.2-p1); rebuilt only
# when absent. Patches: vendored reflect2 1.0.2 (Go >= 1.18) and no negative OOM scores
# (this sandbox refuses them). About 6-8 minutes on 2 cores.
set -euo pipefail

cache=${PGBALANCER_K8S_CACHE:-/var/cache/pgbalancer/kubernetes-1.20.2-p1}
bins="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"
have=1
for b in $bins; do [ -x "$cache/$b" ] || have=0; done
if [ $have = 1 ]; then
  echo "==> Kubernetes binaries cached in $cache" >&2
  command -v etcd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
  exit 0
fi

log() { printf '==> %s\n' "$*" >&2; }
if ! grep -rqs '^Types: deb deb-src\|^Types: deb-src\|^deb-src' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding deb-src for bookworm"
  cat >/etc/apt/sources.list.d/pgbalancer-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
log "installing the Go toolchain, etcd and build tools"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go rsync etcd-server \
  golang-github-modern-go-reflect2-dev dpkg-dev >/dev/null

work=$(mktemp -d /var/tmp/k8s-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
log "fetching the kubernetes source package"
apt-get source --download-only kubernetes >/dev/null 2>&1
tar xzf kubernetes_*.orig.tar.gz
src=$(find . -maxdepth 1 -type d -name 'kubernetes*' | head -n1)
cd "$src"

log "patching vendored reflect2 and OOM score constants"
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod
sed -i 's/defaultSandboxOOMAdj int = -998/defaultSandboxOOMAdj int = 0/' pkg/kubelet/dockershim/docker_sandbox.go
sed -i -e 's/PodInfraOOMAdj *int = -998/PodInfraOOMAdj int = 0/' \
       -e 's/KubeProxyOOMScoreAdj *int = -999/KubeProxyOOMScoreAdj int = 0/' \
       -e 's/guaranteedOOMScoreAdj *int = -997/guaranteedOOMScoreAdj int = 0/' pkg/kubelet/qos/policy.go
grep -q 'defaultSandboxOOMAdj int = 0' pkg/kubelet/dockershim/docker_sandbox.go
grep -q 'guaranteedOOMScoreAdj int = 0' pkg/kubelet/qos/policy.go

log "building $bins (several minutes)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy" \
  KUBE_BUILD_PLATFORMS=linux/amd64 GOLDFLAGS="-s -w" >"$work/make.log" 2>&1 || { tail -40 "$work/make.log"; exit 1; }
mkdir -p "$cache.partial"
for b in $bins; do cp "_output/local/bin/linux/amd64/$b" "$cache.partial/"; done
rm -rf "$cache"
mv "$cache.partial" "$cache"
log "Kubernetes binaries in $cache"
