#!/usr/bin/env bash
# The sandbox router against nginx, side by side, under the same wrk load.
#
# nginx serves a small answer as the upstream; in front of it run, on their own ports, nginx
# as a reverse proxy (one `location /orders`, a keep-alive upstream) and the SDP router (the
# real `sdp agent --role gateway`, routing by a table saved in its work directory, with no
# control plane running). wrk loads each in turn, alternating, ROUNDS times; the script prints
# the median requests/s and p50/p99 latency of each, their ratios, and the router's peak RSS.
#
#   bench/router.sh                 # ROUNDS=6 DURATION=5s CONNECTIONS=50
#   ROUNDS=10 DURATION=10s bench/router.sh
#
# Compare ratios from one run, never absolute figures across runs or machines.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-50}

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "router.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --locked -p sdp >/dev/null
SDP=target/release/sdp

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
UPSTREAM=$(free_port)
PROXY=$(free_port)
ROUTER=$(free_port)

nginx_conf() { # name workers body
  mkdir -p "$work/$1"
  cat >"$work/$1/nginx.conf" <<EOF
worker_processes $2;
error_log $work/$1/error.log warn;
pid $work/$1/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/$1/body;
  proxy_temp_path $work/$1/proxy;
  fastcgi_temp_path $work/$1/fastcgi;
  uwsgi_temp_path $work/$1/uwsgi;
  scgi_temp_path $work/$1/scgi;
  keepalive_requests 1000000;
  $3
}
EOF
  "$NGINX" -p "$work/$1" -c "$work/$1/nginx.conf" -g 'daemon off;' &
  pids+=($!)
}

# The upstream: one worker, a fixed 13-byte answer.
nginx_conf upstream 1 "server { listen 127.0.0.1:$UPSTREAM; location / { return 200 'orders: ok\n\n'; } }"
# nginx as the reverse proxy: the same route, a keep-alive upstream, the forwarding headers.
nginx_conf proxy auto "upstream orders { server 127.0.0.1:$UPSTREAM; keepalive 64; }
  server {
    listen 127.0.0.1:$PROXY;
    location /orders {
      proxy_pass http://orders;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }"

# The router: a gateway agent whose control plane is away, routing by its saved table.
mkdir -p "$work/agent"
cat >"$work/agent/routes.json" <<EOF
{"base_domain":"sandbox.test",
 "services":[{"service":"orders","routes":["/orders"],"baseline":"http://127.0.0.1:$UPSTREAM"}],
 "sandboxes":[{"sandbox":"bench","upstreams":{"orders":"127.0.0.1:$UPSTREAM"}}]}
EOF
cat >"$work/agent.toml" <<EOF
server = "ws://127.0.0.1:9/ws/agent"
role = "gateway"
name = "bench-gateway"
work_dir = "$work/agent"
[gateway]
listen = "127.0.0.1:$ROUTER"
EOF
SDP_TOKEN=bench RUST_LOG=error "$SDP" agent --config "$work/agent.toml" >"$work/agent.log" 2>&1 &
router_pid=$!
pids+=($router_pid)

for port in "$UPSTREAM" "$PROXY" "$ROUTER"; do
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/orders/1" && break
    sleep 0.1
  done
done
curl -sf -o /dev/null "http://127.0.0.1:$ROUTER/orders/1" || { cat "$work/agent.log"; exit 1; }

load() { # label url [header]
  local out
  if [ $# -gt 2 ]; then
    out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H "$3" "$2")
  else
    out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$2")
  fi
  echo "$out" >"$work/wrk-$1-$round.txt"
  echo "$1 $(echo "$out" | awk '/Requests\/sec/ {print $2}') $(echo "$out" | awk '$1=="50%" {print $2}') $(echo "$out" | awk '$1=="99%" {print $2}') $(echo "$out" | awk '/Non-2xx/ {print $NF}')" >>"$work/results"
}

echo "router.sh: $ROUNDS rounds of $DURATION, wrk -t1 -c$CONNECTIONS, alternating"
# Warm both up (connections, pools, caches) before measuring.
wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$PROXY/orders/1" >/dev/null
wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$ROUTER/orders/1" >/dev/null
: >"$work/results"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then
    load nginx "http://127.0.0.1:$PROXY/orders/1"
    load router "http://127.0.0.1:$ROUTER/orders/1"
    load router-sandbox "http://127.0.0.1:$ROUTER/orders/1" "X-SDP-Sandbox: bench"
  else
    load router-sandbox "http://127.0.0.1:$ROUTER/orders/1" "X-SDP-Sandbox: bench"
    load router "http://127.0.0.1:$ROUTER/orders/1"
    load nginx "http://127.0.0.1:$PROXY/orders/1"
  fi
done
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$router_pid/status")

python3 - "$work/results" "$rss_kib" <<'EOF'
import statistics, sys

def ms(text):
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    raise ValueError(text)

rows = {}
for line in open(sys.argv[1]):
    parts = line.split()
    label, rps, p50, p99 = parts[:4]
    errors = int(parts[4]) if len(parts) > 4 else 0
    rows.setdefault(label, []).append((float(rps), ms(p50), ms(p99), errors))

def median(label, i):
    return statistics.median(r[i] for r in rows[label])

print(f"{'':16}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}   (median of {len(rows['nginx'])} rounds)")
for label in ("nginx", "router", "router-sandbox"):
    errors = sum(r[3] for r in rows[label])
    print(f"{label:16}{median(label, 0):>10.0f}{median(label, 1):>9.2f}{median(label, 2):>9.2f}{errors:>9}")
# Each round's ratio pairs runs made back to back, so a drift of the machine cancels out.
for label in ("router", "router-sandbox"):
    ratios = [r[0] / n[0] for r, n in zip(rows[label], rows["nginx"])]
    print(f"{label} / nginx req/s per round: " + " ".join(f"{x:.2f}" for x in ratios))
rss_mib = int(sys.argv[2]) / 1024
ok = True
for label in ("router", "router-sandbox"):
    ratio = statistics.median(r[0] / n[0] for r, n in zip(rows[label], rows["nginx"]))
    p99 = statistics.median(r[2] / n[2] for r, n in zip(rows[label], rows["nginx"]))
    print(f"{label}: throughput {ratio:.2f}x nginx (accept >= 0.90, goal >= 1.00), p99 {p99:.2f}x nginx (accept <= 1.50), medians of the rounds' ratios")
    ok &= ratio >= 0.9 and p99 <= 1.5
print(f"router peak RSS: {rss_mib:.1f} MiB (accept < 20)")
ok &= rss_mib < 20
print("acceptance:", "met" if ok else "NOT met")
EOF
