#!/usr/bin/env python3
"""Migration downtime of a service: latency through Tessera's gateway under steady load, before
and while one replica is moved to another node (make-before-break), and failed requests.

Usage (from the repository root, after `cargo build --release`):
    python3 bench/service-move.py [--callers 8] [--steady 10] [--moves 3]
TESSERA_BIN_DIR=DIR takes the binary from DIR instead of target/release (the test suite's smoke
run of every bench script does).

Starts a real pool on loopback (controller + two agents, real processes), a one-replica Python
HTTP service answering in ~1 ms, and `callers` threads sending GET requests through the gateway
as fast as they can. Prints one JSON line per phase: steady (before any move) and moving (from
each `tessera services move` until the old replica has stopped).
"""
import argparse, atexit, http.client, json, os, shutil, signal, socket, subprocess, sys, tempfile, threading, time

p = argparse.ArgumentParser()
p.add_argument("--callers", type=int, default=8)
p.add_argument("--steady", type=float, default=10.0)
p.add_argument("--moves", type=int, default=3)
args = p.parse_args()

BIN = os.path.join(os.environ.get("TESSERA_BIN_DIR") or os.path.abspath("target/release"), "tessera")
tmp = tempfile.mkdtemp()
# The program must be readable by the workload's own (unprivileged) uid, and a workload has a
# /tmp of its own: it lives under target/, like a shared file system's scratch dir.
os.makedirs("target", exist_ok=True)
public = tempfile.mkdtemp(dir=os.path.abspath("target"))
os.chmod(public, 0o755)
procs = []

@atexit.register
def cleanup():
    for pr in procs:
        pr.send_signal(signal.SIGTERM)
    for pr in procs:
        try: pr.wait(5)
        except Exception: pr.kill()
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(public, ignore_errors=True)

def free_port(host="127.0.0.1"):
    s = socket.socket(); s.bind((host, 0)); port = s.getsockname()[1]; s.close(); return port

api, gw = free_port(), free_port()
env = dict(os.environ, TESSERA_LOG="warn", TESSERA_CONFIG=f"{tmp}/cli.yaml")
ctl = subprocess.Popen([BIN, "controller", "--data-dir", f"{tmp}/ctl", "--listen", f"127.0.0.1:{api}",
                        "--gateway-listen", f"127.0.0.1:{gw}", "--lease", "5s"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
procs.append(ctl)
ctl.stdout.readline()
token = ctl.stdout.readline().strip().split(": ")[-1]
URL = f"http://127.0.0.1:{api}"

def cli(*a):
    out = subprocess.run([BIN, a[0], "--url", URL, "--token", token, *a[1:]], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"tessera {' '.join(a)}: {out.stderr}")
    return out.stdout

def api_get(path):
    c = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
    c.request("GET", path, headers={"authorization": f"Bearer {token}"})
    return json.loads(c.getresponse().read())

join = json.loads(cli("token", "create", "--join", "--uses", "2", "-o", "json"))["token"]
for name, ip in [("n1", "127.0.0.2"), ("n2", "127.0.0.3")]:
    procs.append(subprocess.Popen([BIN, "agent", "--join", URL, "--token", join, "--node-name", name,
                                   "--listen", f"{ip}:0", "--data-dir", f"{tmp}/{name}", "--cpus", "4",
                                   "--memory", "8GiB", "--criu", "/nonexistent"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
server = f"{public}/server.py"
open(server, "w").write('''import os
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # one answer, one segment: no 40 ms delayed-ACK stalls
    wbufsize = -1
    def do_GET(self):
        body = b"ok"
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((os.environ["TESSERA_HOST"], int(os.environ["PORT"])), H).serve_forever()
''')
open(f"{tmp}/web.yaml", "w").write(f"""kind: Service
metadata: {{name: web}}
spec:
  resources: {{cpu: 1, memory: 256MiB}}
  command: [python3, {server}]
  service: {{readiness: {{path: /healthz, period: 200ms}}}}
""")
def wait(what, cond, seconds=60):
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}: {api_get('/v1/jobs')}")
        time.sleep(0.1)

wait("two nodes", lambda: len(api_get("/v1/nodes")) >= 2)
cli("submit", "-f", f"{tmp}/web.yaml")

def ready():
    return [e for e in api_get("/v1/services/web")["endpoints"] if e["ready"] and not e["draining"]]

wait("a ready replica", ready)

samples = []  # (start time, latency seconds, ok)
lock = threading.Lock()
stop = threading.Event()

def caller():
    conn = http.client.HTTPConnection("127.0.0.1", gw, timeout=10)
    mine = []
    while not stop.is_set():
        t = time.monotonic()
        try:
            conn.request("GET", "/web/")
            r = conn.getresponse(); r.read()
            ok = r.status == 200
        except Exception:
            ok = False
            conn = http.client.HTTPConnection("127.0.0.1", gw, timeout=10)
        mine.append((t, time.monotonic() - t, ok))
    with lock:
        samples.extend(mine)

threads = [threading.Thread(target=caller) for _ in range(args.callers)]
for t in threads: t.start()
time.sleep(1)  # warm-up, not counted
t_steady = time.monotonic()
time.sleep(args.steady)
windows = []
for i in range(args.moves):
    old = ready()[0]
    target = "n2" if old["node"] == "n1" else "n1"
    t0 = time.monotonic()
    cli("services", "move", "web", "--to", target)
    wait(f"replica {old['job']} to stop",
         lambda: api_get(f"/v1/jobs/{old['job']}")["state"] in ("cancelled", "succeeded", "failed"))
    windows.append((t0, time.monotonic()))
    time.sleep(2)
stop.set()
for t in threads: t.join()

def summary(name, rows, seconds):
    lat = sorted(r[1] for r in rows)
    pct = lambda q: round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None
    return {"phase": name, "requests": len(rows), "failed": sum(1 for r in rows if not r[2]),
            "rps": round(len(rows) / seconds), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": round(1000 * lat[-1], 2) if lat else None}

steady = [r for r in samples if t_steady <= r[0] < t_steady + args.steady]
moving = [r for r in samples if any(a <= r[0] < b for a, b in windows)]
print(json.dumps(summary("steady", steady, args.steady)))
print(json.dumps(summary("moving", moving, sum(b - a for a, b in windows)) | {
    "moves": len(windows), "move_seconds": [round(b - a, 2) for a, b in windows]}))
print(json.dumps({"all_failed": sum(1 for r in samples if not r[2]), "all_requests": len(samples)}))
