"""The Python client against a live pool (run by the pool tests, crates/tessera/tests/pool.rs):

    TESSERA_URL=... TESSERA_TOKEN=... [TESSERA_CA_CERT=...] python3 live_pool.py

Exits non-zero at the first thing that does not hold, saying what.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import tessera
from tessera.openapi import check, undeclared


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def raises(kind, fn):
    try:
        fn()
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}")


c = tessera.Client()
me = c.whoami()
expect(me.role == "admin" and me.user, f"whoami: {me}")

# The package the client was installed from is not the one a job gets: the agent puts the
# node's copy on every process-mode job's PYTHONPATH.
installed = Path(tessera.__file__).resolve()

hello = c.submit(
    ["python3", "-c", "import tessera, tessera.checkpoint; print('pkg', tessera.__file__); print('hello')"],
    cpu=0.5,
    memory="256MiB",
    gpu=0.5,
    gpu_memory="1GiB",
)
expect(hello.name == "python3", f"default name: {hello.name}")
expect(hello.state in ("pending", "scheduled", "running"), f"fresh job: {hello.state}")
expect(hello.gpu == 0.5 and hello.gpu_memory_bytes == 1 << 30, f"sizes: {hello}")
hello.wait(timeout=120)
expect(hello.state == "succeeded", f"hello: {hello.state} {hello.reason}")
expect(hello.exit_codes == [0], f"exit codes: {hello.exit_codes}")
out = hello.logs()
expect("hello\n" in out, f"logs: {out!r}")
pkg = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("pkg ")]
expect(pkg and pkg[0].endswith("tessera/__init__.py"), f"import tessera in a job: {out!r}")
expect(Path(pkg[0]).resolve() != installed, "the job saw the node's copy of the package")

# A failing command through `sh -c`: its exit code and its stderr alone.
fails = c.submit("echo oops >&2; exit 3", name="fails", cpu="500m", memory="64MiB")
expect(fails.command == ["sh", "-c", "echo oops >&2; exit 3"], f"command: {fails.command}")
fails.wait(timeout=120)
expect(fails.state == "failed" and fails.exit_codes == [3], f"fails: {fails}")
expect(fails.logs(stream="stderr") == "oops\n", f"stderr: {fails.logs(stream='stderr')!r}")
expect(fails.logs(stream="stdout") == "", "nothing on stdout")

# A running job: waited for, followed, refused a move to nowhere, timed out on, cancelled.
sleeper = c.submit("echo started; sleep 300", name="sleeper", cpu=0.5, memory="64MiB")
sleeper.wait(until="running", timeout=120)
expect(sleeper.state == "running", f"sleeper: {sleeper.state}")
follow = sleeper.logs(follow=True)
first = next(follow)
expect(first.startswith("started"), f"followed: {first!r}")
e = raises(TimeoutError, lambda: sleeper.wait(timeout=0.3))
expect(f"job {sleeper.id} is still running" in str(e), str(e))
e = raises(tessera.TesseraError, lambda: sleeper.migrate(to="nowhere"))
expect(400 <= e.status < 500 and "nowhere" in e.message, f"migrate: {e.status} {e.message}")
sleeper.cancel()
expect(sleeper.state == "cancelled" or "cancel" in sleeper.reason, f"cancelling: {sleeper}")
expect(sleeper.wait(timeout=60).state == "cancelled", f"cancelled: {sleeper.state}")
rest = "".join(follow)  # the follow ends with the replica
expect("started" not in rest, f"no output twice: {rest!r}")

# Bad input is refused with the field named, and leaves nothing behind.
before = len(c.jobs())
e = raises(tessera.TesseraError, lambda: c.submit("true", gpu_memory="lots"))
expect(e.status in (400, 422) and "gpuMemory" in e.message, f"refusal: {e.status} {e.message}")
expect(len(c.jobs()) == before, "a refused job is not stored")
raises(ValueError, lambda: c.submit(None))

# A manifest as YAML text.
y = c.submit_manifest(
    "apiVersion: tessera/v1\nkind: Job\nmetadata:\n  name: from-yaml\nspec:\n"
    "  command: [sh, -c, 'echo yaml']\n  resources:\n    cpu: 100m\n    memory: 64MiB\n"
)
expect(y.name == "from-yaml" and y.wait(timeout=120).state == "succeeded", f"yaml: {y}")
expect(y.logs() == "yaml\n", f"yaml logs: {y.logs()!r}")

# Slurm's habits: an array with a limit (each task a job), a dependency, a hold.
first = c.submit("echo $TESSERA_ARRAY_INDEX", name="sweep", array="0-3%2", cpu="100m", memory="64MiB")
expect(first.array and first.array["count"] == 4 and first.array["limit"] == 2, f"array: {first.array}")
tasks = first.tasks()
expect([t.array["index"] for t in sorted(tasks, key=lambda t: t.id)] == [0, 1, 2, 3], f"tasks: {tasks}")
after = c.submit("true", after_ok=[first.id], hold=True, cpu="100m", memory="64MiB")
expect(after.held and after.after == [{"job": first.id, "on": "ok"}], f"after: {after}")
for t in tasks:
    expect(t.wait(timeout=120).state == "succeeded", f"task: {t}")
    expect(t.logs() == f"{t.array['index']}\n", f"task logs: {t.logs()!r}")
expect(after.refresh().state == "pending" and after.reason.startswith("held"), f"held: {after}")
expect(after.release().wait(timeout=120).state == "succeeded", f"released: {after}")

# Lists as typed records.
done = c.jobs(state=["failed", "cancelled"])
expect({j.id for j in done} >= {fails.id, sleeper.id}, f"jobs by state: {[j.id for j in done]}")
expect(all(j.state in ("failed", "cancelled") for j in done), "state filter")
expect(all(isinstance(j, tessera.Job) for j in done), "records are Jobs")
expect(c.job(hello.id).refresh().state == "succeeded", "refresh through a listed job")
events = hello.events()
expect(any("submitted" in ev.message for ev in events), f"events: {events}")
nodes = c.nodes()
expect(nodes and all(isinstance(n, tessera.Node) for n in nodes), f"nodes: {nodes}")
expect(nodes[0].devices and isinstance(nodes[0].devices[0], tessera.Device), "devices")
expect(c.node(nodes[0].name).name == nodes[0].name, "one node")
projects = c.projects()
expect(any(p.name == "default" for p in projects), f"projects: {projects}")

# Usage by job, with the job's name; the total as a record.
deadline = time.monotonic() + 60
while True:
    usage = c.usage(since="1h", by="job")
    rows = {r.key: r for r in usage}
    if str(hello.id) in rows or time.monotonic() > deadline:
        break
    time.sleep(0.5)
row = rows.get(str(hello.id))
expect(row is not None, f"usage by job: {list(rows)}")
expect(row.name == "python3" and row.gpu_milli_ms > 0 and row.jobs == 1, f"row: {row}")
expect(isinstance(usage.total, tessera.UsageRow), "total")
expect(usage.total.gpu_milli_ms >= row.gpu_milli_ms, "total covers the row")

try:
    import pandas  # noqa: F401
except ImportError:
    e = raises(ImportError, usage.to_frame)
    expect("pip install pandas" in str(e), str(e))
else:
    frame = c.jobs().to_frame()
    expect("state" in frame.columns and len(frame) == len(c.jobs()), "frame")

# The records agree with the document the pool serves: fields both ways, and every field of a
# real answer declared.
document = c.request("GET", "/openapi.json")
problems = check(document)
expect(not problems, f"client vs document: {problems}")
for record in [hello, hello.assignments[0], nodes[0], nodes[0].devices[0], projects[0], events[0], row, usage.total, me]:
    extra = undeclared(document, record)
    expect(not extra, f"{type(record).__name__}: the pool answers {extra} undeclared")

# Where the pool is comes from the config file when nothing else says.
with tempfile.TemporaryDirectory() as d:
    cfg = Path(d) / "config.yaml"
    cfg.write_text(
        f"url: {os.environ['TESSERA_URL']}\ntoken: '{os.environ['TESSERA_TOKEN']}'\n"
        + (f"ca_cert: {os.environ['TESSERA_CA_CERT']}\n" if os.environ.get("TESSERA_CA_CERT") else "ca_cert: null\n")
    )
    saved = {k: os.environ.pop(k) for k in ("TESSERA_URL", "TESSERA_TOKEN", "TESSERA_CA_CERT") if k in os.environ}
    os.environ["TESSERA_CONFIG"] = str(cfg)
    from_file = tessera.Client()
    expect(str(cfg) in from_file.url_from, from_file.url_from)
    expect(from_file.whoami().user == me.user, "the config file's pool")
    os.environ.update(saved)

# A pool that is not there: the URL tried and where it came from.
e = raises(tessera.PoolUnreachable, lambda: tessera.Client(url="http://127.0.0.1:9", token="t").jobs())
expect("http://127.0.0.1:9" in str(e) and "the url argument" in str(e), str(e))

print(json.dumps({"ok": True, "jobs": [hello.id, fails.id, sleeper.id, y.id]}))
