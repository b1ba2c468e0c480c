#!/usr/bin/env bash
# Cold start and idle memory of the platform's processes (issue 16, goal 3): how long the
# release binary takes from exec to ready, and how much memory it holds once idle.
#
#   sdp server:               exec until `GET /api/health` answers 200
#   sdp agent --role micro:   exec until it logs that it is connected to the control plane
#   sdp agent --role gateway: the same (its router listens by then)
#
# Each is started ROUNDS times (the server's data directory kept between rounds, as after a
# restart); the script prints the median and the worst time, and the resident memory
# (VmRSS, and its peak VmHWM) after IDLE seconds without work. Goals: under 100 ms to start;
# idle under 30 MB (server) and 15 MB (agents). Last, one `figure|...` line per figure for
# bench/report.sh.
#
#   bench/coldstart.sh              # ROUNDS=5 IDLE=3
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
IDLE=${IDLE:-3}

cargo build --release --locked -p sdp >/dev/null
SDP=$PWD/target/release/sdp

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$SDP" "$work" "$ROUNDS" "$IDLE" <<'PY'
import json, os, socket, statistics, subprocess, sys, time, urllib.request

sdp, work, rounds, idle = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
token = "coldstart-agent-token-0123456789"

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port

server_port = free_port()
with open(f"{work}/server.toml", "w") as f:
    f.write(f'''listen = "127.0.0.1:{server_port}"
data_dir = "{work}/data"
[git]
probe_repo = "http://127.0.0.1:9/probe.git"
''')
root = os.geteuid() == 0

def agent_config(role):
    port = free_port()
    text = f'''server = "ws://127.0.0.1:{server_port}/ws/agent"
role = "{role}"
name = "bench-{role}"
work_dir = "{work}/agent-{role}"
runtime = "process"
port_range = "40000-40999"
allow_root_builds = {"true" if root else "false"}
'''
    if role == "gateway":
        text += f'[gateway]\nlisten = "127.0.0.1:{port}"\n'
    path = f"{work}/agent-{role}.toml"
    with open(path, "w") as f:
        f.write(text)
    return path

env = dict(os.environ, SDP_AGENT_TOKEN=token, SDP_TOKEN=token, RUST_LOG="info",
           SDP_LOG_FORMAT="json")

def memory(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields

def health_ok():
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server_port}/api/health", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False

def start(args, ready, log):
    out = open(log, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([sdp, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    while not ready():
        if proc.poll() is not None:
            sys.exit(f"{args[0]} exited early; see {log}:\n" + open(log).read())
        if time.monotonic() - t0 > 30:
            proc.kill()
            sys.exit(f"{args[0]} not ready in 30 s; see {log}:\n" + open(log).read())
        time.sleep(0.0005)
    return proc, (time.monotonic() - t0) * 1000

def connected(log):
    def check():
        with open(log) as f:
            return "connected to the control plane" in f.read()
    return check

def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

results = {}
server = None
for name, args, make_ready in [
    ("server", ["server", "--config", f"{work}/server.toml"], lambda log: health_ok),
    ("micro agent", ["agent", "--config", agent_config("micro")], connected),
    ("gateway agent", ["agent", "--config", agent_config("gateway")], connected),
]:
    times, mem = [], {}
    for i in range(rounds):
        log = f"{work}/{name.replace(' ', '-')}-{i}.log"
        if name == "server":
            proc, ms = start(args, make_ready(log), log)
        else:
            proc, ms = start(args, make_ready(log), log)
        times.append(ms)
        if i == rounds - 1:
            time.sleep(idle)
            mem = memory(proc.pid)
        if name == "server" and i == rounds - 1:
            server = proc
        else:
            stop(proc)
    results[name] = (times, mem)

print(f"cold start of the release binary, {rounds} rounds each; memory after {idle:g} s idle")
print(f"{'process':<15} {'median ms':>10} {'worst ms':>10} {'RSS MiB':>9} {'peak MiB':>9}  goal")
goals = {"server": "< 100 ms, < 30 MB", "micro agent": "< 100 ms, < 15 MB", "gateway agent": "< 100 ms, < 15 MB"}
for name, (times, mem) in results.items():
    print(f"{name:<15} {statistics.median(times):>10.1f} {max(times):>10.1f} "
          f"{mem.get('VmRSS', 0):>9.1f} {mem.get('VmHWM', 0):>9.1f}  {goals[name]}")
# One line per figure, for bench/report.sh's table.
limits = {"server": 30, "micro agent": 15, "gateway agent": 15}
for name, (times, mem) in results.items():
    median = statistics.median(times)
    rss_mb = mem.get("VmRSS", 0) * 1024 * 1024 / 1e6
    print(f"figure|cold start: {name}|{median:.1f} ms|< 100 ms|{'met' if median < 100 else 'NOT met'}")
    print(f"figure|idle memory: {name}|{rss_mb:.1f} MB|< {limits[name]} MB|"
          f"{'met' if rss_mb < limits[name] else 'NOT met'}")
if server:
    stop(server)
PY
