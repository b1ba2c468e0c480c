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
#   SDP_BIN=/path/to/sdp bench/router.sh       # another build of the router (a variant)
#   PINGORA_BIN=/path/to/proxy bench/router.sh # also a pingora proxy, loaded the same way
#
# PINGORA_BIN is a prototype outside the workspace (docs/benchmarks.md says how it was
# made): a program that proxies LISTEN to UPSTREAM on THREADS threads, given as environment
# variables.
#
# Compare ratios from one run, never absolute figures across runs or machines.
#
# Last, it counts the instructions each proxy runs per request in user space, under
# callgrind (installs valgrind): unlike requests/s, that count does not depend on what else
# the machine is doing, so it shows a change of a few percent that the noisy rounds hide.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-50}

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "router.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -z "${SDP_BIN:-}" ]; then
  cargo build --release --locked -p sdp >/dev/null
fi
SDP=${SDP_BIN:-${CARGO_TARGET_DIR:-target}/release/sdp}

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

nginx_conf() { # name workers body [command to run nginx under]
  local name=$1 workers=$2 body=$3
  shift 3
  mkdir -p "$work/$name"
  cat >"$work/$name/nginx.conf" <<EOF
worker_processes $workers;
error_log $work/$name/error.log warn;
pid $work/$name/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/$name/body;
  proxy_temp_path $work/$name/proxy;
  fastcgi_temp_path $work/$name/fastcgi;
  uwsgi_temp_path $work/$name/uwsgi;
  scgi_temp_path $work/$name/scgi;
  keepalive_requests 1000000;
  $body
}
EOF
  # Under callgrind, one process does it all: no master, no worker to follow.
  local master=on
  [ $# -eq 0 ] || master=off
  "$@" "$NGINX" -p "$work/$name" -c "$work/$name/nginx.conf" -g "daemon off; master_process $master;" \
    >"$work/$name/out.log" 2>&1 &
  pids+=($!)
}

# nginx as the reverse proxy on port $1: the same route, a keep-alive upstream, the
# forwarding headers.
proxy_http() {
  echo "upstream orders { server 127.0.0.1:$UPSTREAM; keepalive 64; }
  server {
    listen 127.0.0.1:$1;
    location /orders {
      proxy_pass http://orders;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
    }
  }"
}

# The router on port $2, in work directory $1: a gateway agent whose control plane is away,
# routing by its saved table. The rest of the arguments: a command to run it under.
start_router() {
  local dir=$work/$1 port=$2
  shift 2
  mkdir -p "$dir/agent"
  cat >"$dir/agent/routes.json" <<EOF
{"base_domain":"sandbox.test",
 "services":[{"service":"orders","routes":["/orders"],"baseline":"http://127.0.0.1:$UPSTREAM"}],
 "sandboxes":[{"sandbox":"bench","upstreams":{"orders":"127.0.0.1:$UPSTREAM"}}]}
EOF
  cat >"$dir/agent.toml" <<EOF
server = "ws://127.0.0.1:9/ws/agent"
role = "gateway"
name = "bench-gateway"
work_dir = "$dir/agent"
# The bench runs as root, and its gateway agent runs no user code.
allow_root_builds = true
[gateway]
listen = "127.0.0.1:$port"
EOF
  SDP_TOKEN=bench RUST_LOG=error "$@" "$SDP" agent --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 &
  pids+=($!)
}

# The pingora prototype on port $1; the rest of the arguments: a command to run it under.
start_pingora() {
  local port=$1
  shift
  LISTEN=127.0.0.1:$port UPSTREAM=127.0.0.1:$UPSTREAM THREADS=2 RUST_LOG=error \
    "$@" "$PINGORA_BIN" >"$work/pingora-$port.log" 2>&1 &
  pids+=($!)
}

# The upstream: one worker, a fixed 13-byte answer.
nginx_conf upstream 1 "server { listen 127.0.0.1:$UPSTREAM; location / { return 200 'orders: ok\n\n'; } }"
nginx_conf proxy auto "$(proxy_http "$PROXY")"
start_router router "$ROUTER"
router_pid=${pids[-1]}
ports=("$UPSTREAM" "$PROXY" "$ROUTER")
if [ -n "${PINGORA_BIN:-}" ]; then
  PINGORA=$(free_port)
  start_pingora "$PINGORA"
  pingora_pid=${pids[-1]}
  ports+=("$PINGORA")
fi

for port in "${ports[@]}"; do
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/orders/1" && break
    sleep 0.1
  done
done
curl -sf -o /dev/null "http://127.0.0.1:$ROUTER/orders/1" || { cat "$work/router/agent.log"; exit 1; }

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
[ -z "${PINGORA:-}" ] || wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$PINGORA/orders/1" >/dev/null
: >"$work/results"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then
    load nginx "http://127.0.0.1:$PROXY/orders/1"
    load router "http://127.0.0.1:$ROUTER/orders/1"
    load router-sandbox "http://127.0.0.1:$ROUTER/orders/1" "X-SDP-Sandbox: bench"
    [ -z "${PINGORA:-}" ] || load pingora "http://127.0.0.1:$PINGORA/orders/1"
  else
    [ -z "${PINGORA:-}" ] || load pingora "http://127.0.0.1:$PINGORA/orders/1"
    load router-sandbox "http://127.0.0.1:$ROUTER/orders/1" "X-SDP-Sandbox: bench"
    load router "http://127.0.0.1:$ROUTER/orders/1"
    load nginx "http://127.0.0.1:$PROXY/orders/1"
  fi
done
rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$router_pid/status")
pingora_rss_kib=0
[ -z "${PINGORA:-}" ] || pingora_rss_kib=$(awk '/VmHWM/ {print $2}' "/proc/$pingora_pid/status")

python3 - "$work/results" "$rss_kib" "$pingora_rss_kib" "$work/goal" <<'EOF'
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

labels = [l for l in ("nginx", "router", "router-sandbox", "pingora") if l in rows]
print(f"{'':16}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}   (median of {len(rows['nginx'])} rounds)")
for label in labels:
    errors = sum(r[3] for r in rows[label])
    print(f"{label:16}{median(label, 0):>10.0f}{median(label, 1):>9.2f}{median(label, 2):>9.2f}{errors:>9}")
# Each round's ratio pairs runs made back to back, so a drift of the machine cancels out.
for label in labels[1:]:
    ratios = [r[0] / n[0] for r, n in zip(rows[label], rows["nginx"])]
    print(f"{label} / nginx req/s per round: " + " ".join(f"{x:.2f}" for x in ratios))
rss_mib = int(sys.argv[2]) / 1024
ok = True
goal = True
# One line per figure for bench/report.sh, printed with the instructions' at the end.
figures = []
for label in labels[1:]:
    ratio = statistics.median(r[0] / n[0] for r, n in zip(rows[label], rows["nginx"]))
    p99 = statistics.median(r[2] / n[2] for r, n in zip(rows[label], rows["nginx"]))
    print(f"{label}: throughput {ratio:.2f}x nginx (accept >= 0.90, goal >= 1.00), p99 {p99:.2f}x nginx (accept <= 1.50, goal <= 1.00), medians of the rounds' ratios")
    if label != "pingora":
        ok &= ratio >= 0.9 and p99 <= 1.5
        goal &= ratio >= 1.0 and p99 <= 1.0
        route = "baseline" if label == "router" else "sandbox"
        figures.append(f"figure|router, {route} route: requests/s|{ratio:.2f}x nginx|>= 1.00x|"
                       f"{'met' if ratio >= 1.0 else 'NOT met'}")
        figures.append(f"figure|router, {route} route: p99 latency|{p99:.2f}x nginx|<= 1.00x|"
                       f"{'met' if p99 <= 1.0 else 'NOT met'}")
print(f"router peak RSS: {rss_mib:.1f} MiB (accept and goal < 20)")
if "pingora" in rows:
    print(f"pingora peak RSS: {int(sys.argv[3]) / 1024:.1f} MiB")
ok &= rss_mib < 20
goal &= rss_mib < 20
print("acceptance:", "met" if ok else "NOT met")
figures.append(f"figure|router: peak RSS|{rss_mib:.1f} MiB|< 20 MiB|{'met' if rss_mib < 20 else 'NOT met'}")
# The goal's last part, instructions, is counted below.
open(sys.argv[4], "w").write("met" if goal else "NOT met")
open(sys.argv[4] + ".figures", "w").write("".join(f + "\n" for f in figures))
EOF

# Instructions per request in user space, under callgrind: the same requests to each proxy,
# one at a time on each of 10 connections, after a warm-up that opens the upstream
# connections. Valgrind runs a process about fifty times slower, so the count stays modest.
COUNT=${COUNT:-2000}
drive() { # port requests [header]
  python3 - "$@" <<'EOF'
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
extra = (sys.argv[3] + "\r\n").encode() if len(sys.argv) > 3 else b""
request = b"GET /orders/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n" + extra + b"\r\n"
connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
for _ in range(count // len(connections)):
    for c in connections:
        c.sendall(request)
    for c in connections:
        answer = b""
        while not answer.endswith(b"\r\n\r\norders: ok\n\n"):
            chunk = c.recv(4096)
            if not chunk:
                sys.exit("connection closed: " + answer.decode(errors="replace"))
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 200"):
            sys.exit("unexpected answer: " + answer.decode(errors="replace"))
EOF
}
instructions() { # pid port out-file [header]
  local pid=$1 port=$2 out=$3
  shift 3
  for _ in $(seq 300); do
    curl -s -o /dev/null "http://127.0.0.1:$port/orders/1" && break
    sleep 0.1
  done
  drive "$port" 200 "$@"
  callgrind_control -i on "$pid" >/dev/null 2>&1
  drive "$port" "$COUNT" "$@"
  callgrind_control -i off "$pid" >/dev/null 2>&1
  callgrind_control -d "$pid" >/dev/null 2>&1
  for _ in $(seq 100); do
    ls "$out".* >/dev/null 2>&1 && break
    sleep 0.1
  done
  local total=0
  for part in "$out".*; do
    total=$((total + $(callgrind_annotate "$part" | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')))
  done
  echo $((total / COUNT))
}
callgrind() { # out-file
  echo valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$1"
}
CG_PROXY=$(free_port)
CG_ROUTER=$(free_port)
# shellcheck disable=SC2046
nginx_conf proxy-cg 1 "$(proxy_http "$CG_PROXY")" $(callgrind "$work/proxy-cg.out")
cg_proxy=${pids[-1]}
# shellcheck disable=SC2046
start_router router-cg "$CG_ROUTER" $(callgrind "$work/router-cg.out")
cg_router=${pids[-1]}
nginx_i=$(instructions "$cg_proxy" "$CG_PROXY" "$work/proxy-cg.out")
router_i=$(instructions "$cg_router" "$CG_ROUTER" "$work/router-cg.out")
rm -f "$work"/router-cg.out.*
sandbox_i=$(instructions "$cg_router" "$CG_ROUTER" "$work/router-cg.out" "X-SDP-Sandbox: bench")
pingora_text=""
if [ -n "${PINGORA_BIN:-}" ]; then
  CG_PINGORA=$(free_port)
  # shellcheck disable=SC2046
  start_pingora "$CG_PINGORA" $(callgrind "$work/pingora-cg.out")
  pingora_i=$(instructions "${pids[-1]}" "$CG_PINGORA" "$work/pingora-cg.out")
  pingora_text=", pingora $pingora_i ($(python3 -c "print(f'{$pingora_i / $nginx_i:.2f}')")x)"
fi
echo "instructions per request in user space (callgrind, $COUNT requests): nginx $nginx_i," \
  "router $router_i ($(python3 -c "print(f'{$router_i / $nginx_i:.2f}')")x)," \
  "router-sandbox $sandbox_i ($(python3 -c "print(f'{$sandbox_i / $nginx_i:.2f}')")x)$pingora_text"
goal=$(cat "$work/goal")
[ "$router_i" -le "$nginx_i" ] && [ "$sandbox_i" -le "$nginx_i" ] || goal="NOT met"
echo "goal (issue 16: >= 1.00x req/s and p99 <= 1.00x nginx on both routes, instructions <= nginx's, RSS < 20 MiB): $goal"
# One line per figure, for bench/report.sh.
cat "$work/goal.figures"
for route in baseline sandbox; do
  count=$router_i
  [ "$route" = sandbox ] && count=$sandbox_i
  status=met
  [ "$count" -le "$nginx_i" ] || status="NOT met"
  echo "figure|router, $route route: instructions per request|$count ($(python3 -c "print(f'{$count / $nginx_i:.2f}')")x nginx's $nginx_i)|<= nginx's|$status"
done
