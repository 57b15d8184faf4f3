# Sourced by the benchmarks: HAProxy in plain TCP mode on the host, the ceiling of any proxy.
#
# free_port: a free loopback port.
# start_haproxy DIR TARGET_PORT: serves 127.0.0.1:TARGET_PORT on a free loopback port (printed),
# daemonised with its pid in DIR/haproxy.pid.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_haproxy() {
  local dir=$1 target=$2 port
  port=$(free_port)
  cat >"$dir/haproxy.cfg" <<CFG
global
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen postgres
  bind 127.0.0.1:$port
  server primary 127.0.0.1:$target
CFG
  haproxy -D -f "$dir/haproxy.cfg" -p "$dir/haproxy.pid" >/dev/null 2>&1 </dev/null
  echo "$port"
}
