"""Talk to a Tessera pool from Python: submit jobs, wait for them, read their output, and read
the pool's nodes and usage. Standard library only.

    import tessera
    job = tessera.Client().submit("python3 train.py", gpu=0.5, gpu_memory="20GiB")
    print(job.wait().state, job.logs())

The client finds its pool as the `tessera` command does: the arguments, else TESSERA_URL and
TESSERA_TOKEN (and TESSERA_CA_CERT), else the file `tessera up` and `tessera config use` write
(TESSERA_CONFIG, default ~/.config/tessera/config.yaml).
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .records import (
    Event,
    Node,
    Project,
    Record,
    Records,
    Replica,
    UsageRow,
    WhoAmI,
    _raw,
)

#: The states after which a job changes no more.
FINAL_STATES = ("succeeded", "failed", "cancelled")


class TesseraError(Exception):
    """The pool refused a request. `status` is the HTTP status; `field` names the field of the
    request at fault, when the pool said which."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


class PoolUnreachable(TesseraError):
    """No controller answered at the URL the client was given."""

    def __init__(self, message: str):
        super().__init__(0, message)


def config_path() -> Path:
    """The file `tessera up` and `tessera config use` write."""
    p = os.environ.get("TESSERA_CONFIG")
    if p:
        return Path(p)
    return Path(os.environ.get("HOME", ".")) / ".config" / "tessera" / "config.yaml"


def read_config(path: Path) -> Dict[str, str]:
    """The CLI's config file: flat `key: value` YAML (url, token, ca_cert). Missing: empty."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line.startswith(" "):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if value in ("", "null", "~"):
            continue
        out[key.strip()] = value
    return out


def _words(value: Union[str, Sequence[str]]) -> List[str]:
    """A command as the pool takes it: a list as it is, a string through `sh -c` (so that pipes,
    `&&` and variables work as typed)."""
    if isinstance(value, str):
        return ["sh", "-c", value]
    return [str(v) for v in value]


def _name_of(command: List[str]) -> str:
    """A job's default name: its program's file name, as `tessera submit` makes it."""
    words = command[2].split() if command[:2] == ["sh", "-c"] and command[2:] else command
    base = words[0].rsplit("/", 1)[-1] if words else "job"
    clean = "".join(c for c in base if c.isascii() and (c.isalnum() or c == "-"))[:40]
    return clean or "job"


@dataclass
class Job(Record):
    """A job of the pool, as it was when last read (`refresh()` reads it again)."""

    SCHEMA: ClassVar[str] = "Job"
    NESTED: ClassVar[Dict[str, Any]] = {"assignments": Replica}

    id: int = 0
    name: str = ""
    project: str = ""
    owner: str = ""
    state: str = ""
    reason: str = ""
    priority: int = 0
    replicas: int = 0
    elastic: Optional[Dict[str, int]] = None
    gpu: float = 0.0
    gpu_memory_bytes: int = 0
    cpu_milli: int = 0
    memory_bytes: int = 0
    command: List[str] = field(default_factory=list)
    restart: str = "never"
    attempt: int = 0
    restarts: int = 0
    created_ms: int = 0
    updated_ms: int = 0
    finished_ms: Optional[int] = None
    assignments: List[Replica] = field(default_factory=list)
    #: The array it is a task of: {"id", "index", "count", "limit", "text"}.
    array: Optional[Dict[str, Any]] = None
    #: The jobs it waits for: [{"job": 5, "on": "start" | "ok" | "any"}].
    after: List[Dict[str, Any]] = field(default_factory=list)
    time_limit_ms: Optional[int] = None
    held: bool = False
    raw: Dict[str, Any] = _raw()
    _client: Optional["Client"] = field(default=None, repr=False, compare=False)

    def _pool(self) -> "Client":
        if self._client is None:
            raise RuntimeError("this Job was not read through a Client; use Client().job(id)")
        return self._client

    def _take(self, other: "Job") -> "Job":
        for name in self.__dataclass_fields__:
            if name != "_client":
                setattr(self, name, getattr(other, name))
        return self

    @property
    def done(self) -> bool:
        """It has ended (succeeded, failed or was cancelled)."""
        return self.state in FINAL_STATES

    def refresh(self) -> "Job":
        """Reads the job again; returns itself."""
        return self._take(self._pool().job(self.id))

    def wait(
        self, timeout: Optional[float] = None, until: str = "done", poll: float = 0.5
    ) -> "Job":
        """Blocks until the job has ended (`until="done"`) or is running (`until="running"`, or
        ended meanwhile), then returns it. Raises TimeoutError after `timeout` seconds."""
        if until not in ("done", "running"):
            raise ValueError(f'until={until!r}: use "done" or "running"')
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(poll, 0.2)
        while True:
            self.refresh()
            if self.done or (until == "running" and self.state == "running"):
                return self
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {self.id} is still {self.state} after {timeout} s ({self.reason})"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, poll)

    def logs(
        self,
        replica: int = 0,
        follow: bool = False,
        stream: str = "all",
        attempt: Optional[int] = None,
        since: Optional[str] = None,
    ) -> Any:
        """A replica's output as text (stdout and stderr interleaved as written, by default).
        With `follow=True`, an iterator of pieces of text as they come, until the replica ends."""
        pieces = self._pool()._log_pieces(self.id, replica, stream, attempt, since, follow)
        if follow:
            return pieces
        return "".join(pieces)

    def events(self) -> "Records[Event]":
        """What happened to the job, oldest first."""
        return self._pool().events(self.id)

    def cancel(self) -> "Job":
        """Cancels the job: every replica's processes are killed. Returns it as now (still
        running while its replicas stop; `wait()` returns once it is cancelled)."""
        return self._take(self._pool()._job_call(self.id, "cancel"))

    def migrate(self, to: Optional[str] = None) -> "Job":
        """Moves the running job, checkpointed first when it checkpoints: to node `to`, or
        wherever the scheduler places it."""
        return self._take(self._pool()._job_call(self.id, "migrate", {"to": to} if to else {}))

    def hold(self) -> "Job":
        """Holds the pending job: it does not start until released."""
        return self._take(self._pool()._job_call(self.id, "hold"))

    def release(self) -> "Job":
        """Releases the held job."""
        return self._take(self._pool()._job_call(self.id, "release"))

    def requeue(self) -> "Job":
        """Queues the job again: a running one is stopped first (through its checkpoint), an
        ended one starts a new attempt."""
        return self._take(self._pool()._job_call(self.id, "requeue"))

    def tasks(self) -> "Records[Job]":
        """The tasks of the array this job is the first task of (its id is the array's)."""
        return Records(
            self._pool()._job(j)
            for j in self._pool().request("GET", "/v1/jobs", query={"array": self.id})
        )

    @property
    def exit_codes(self) -> List[Optional[int]]:
        """Each replica's exit code (None while it runs, or when it was stopped)."""
        return [r.exit_code for r in self.assignments]


class Client:
    """A connection to a pool. Arguments win over TESSERA_URL / TESSERA_TOKEN / TESSERA_CA_CERT,
    which win over the CLI's config file."""

    def __init__(
        self,
        url: Optional[str] = None,
        token: Optional[str] = None,
        ca_cert: Optional[str] = None,
        timeout: float = 60.0,
    ):
        config = read_config(config_path())
        found = [
            (url, "the url argument"),
            (os.environ.get("TESSERA_URL"), "TESSERA_URL"),
            (config.get("url"), f"the config file {config_path()}"),
        ]
        self.url, self.url_from = next(((u, w) for u, w in found if u), ("", ""))
        if not self.url:
            raise PoolUnreachable(
                "no controller URL: pass Client(url=...), set TESSERA_URL, or run `tessera up` "
                "(it writes the config file)"
            )
        self.token = token or os.environ.get("TESSERA_TOKEN") or config.get("token") or ""
        if not self.token:
            raise PoolUnreachable(
                "no API token: pass Client(token=...), set TESSERA_TOKEN, or use the config file "
                "(`tessera config use URL --token T`)"
            )
        self.timeout = timeout
        self._controllers = [u.strip().rstrip("/") for u in self.url.split(",") if u.strip()]
        ca = ca_cert or os.environ.get("TESSERA_CA_CERT") or config.get("ca_cert")
        self._tls = ssl.create_default_context(cafile=ca) if ca else None

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})"

    # -- HTTP -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Optional[Mapping[str, Any]] = None,
        content_type: str = "application/json",
    ) -> Any:
        """One call of the API; the answer's JSON. Raises TesseraError when refused."""
        if query:
            pairs = {k: v for k, v in query.items() if v is not None}
            if pairs:
                path += "?" + urllib.parse.urlencode(
                    {k: str(v).lower() if isinstance(v, bool) else v for k, v in pairs.items()}
                )
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        tried = []
        # Each controller in turn (a standby answers reads, and says so for writes).
        for base in self._controllers:
            req = urllib.request.Request(base + path, data=data, method=method)
            req.add_header("Authorization", f"Bearer {self.token}")
            req.add_header("Accept", "application/json")
            if data is not None:
                req.add_header("Content-Type", content_type)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout, context=self._tls) as r:
                    text = r.read().decode()
                    return json.loads(text) if text.strip() else None
            except urllib.error.HTTPError as e:
                raise _refusal(e) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                tried.append(f"{base} ({reason})")
        raise PoolUnreachable(
            f"cannot reach the controller at {', '.join(tried)}: the URL came from "
            f"{self.url_from}; start the pool (`tessera up`) or point the client elsewhere "
            "(Client(url=...), TESSERA_URL, or `tessera config use URL`)"
        )

    # -- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        command: Union[str, Sequence[str], None] = None,
        *,
        name: Optional[str] = None,
        project: Optional[str] = None,
        gpu: Union[int, float, str, None] = None,
        gpu_memory: Union[int, str, None] = None,
        cpu: Union[int, float, str, None] = None,
        memory: Union[int, str, None] = None,
        replicas: Union[int, Tuple[int, int], None] = None,
        image: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        priority: Union[int, str, None] = None,
        models: Optional[Sequence[str]] = None,
        node_selector: Optional[Mapping[str, str]] = None,
        gpu_attach: Optional[str] = None,
        checkpoint: Optional[Mapping[str, str]] = None,
        restart: Optional[str] = None,
        max_restarts: Optional[int] = None,
        preemptible: Optional[bool] = None,
        interactive: Optional[bool] = None,
        wait_for_capacity: Optional[bool] = None,
        workdir: Optional[str] = None,
        volumes: Optional[Sequence[str]] = None,
        array: Optional[str] = None,
        after: Optional[Sequence[int]] = None,
        after_ok: Optional[Sequence[int]] = None,
        after_any: Optional[Sequence[int]] = None,
        time_limit: Optional[str] = None,
        begin: Optional[str] = None,
        hold: Optional[bool] = None,
        output_file: Optional[str] = None,
    ) -> Job:
        """Submits a job and returns it (pending). A string command runs through `sh -c`; a list
        runs as it is. Sizes take the pool's words ("20GiB", "500m"); `replicas=(1, 8)` is an
        elastic range; `checkpoint={"signal": "USR1", "interval": "10m"}` as in a manifest;
        Slurm's habits: `array="0-99%8"` (returns the first task; each task is a job),
        `after_ok=[job.id]`, `time_limit="4h"`, `begin="+1h"`, `hold=True`.
        The pool checks everything and names the field at fault (TesseraError.field)."""
        resources: Dict[str, Any] = {}
        for key, value in (
            ("gpu", gpu),
            ("gpuMemory", gpu_memory),
            ("cpu", cpu),
            ("memory", memory),
            ("gpuAttach", gpu_attach),
        ):
            if value is not None:
                resources[key] = value
        if models:
            resources["deviceModels"] = list(models)
        if node_selector:
            resources["nodeSelector"] = dict(node_selector)
        spec: Dict[str, Any] = {"resources": resources}
        words = _words(command) if command is not None else None
        if words is not None:
            spec["command"] = words
        if image is not None:
            spec["image"] = image
        if words is None and image is None:
            raise ValueError("command: give the program to run (or an image to run its own)")
        if isinstance(replicas, tuple):
            spec["replicas"] = {"min": replicas[0], "max": replicas[1]}
        elif replicas is not None:
            spec["replicas"] = replicas
        if env:
            spec["env"] = {str(k): str(v) for k, v in env.items()}
        if restart is not None or max_restarts is not None:
            spec["restart"] = {"policy": restart or "on-failure"}
            if max_restarts is not None:
                spec["restart"]["maxRestarts"] = max_restarts
        extra: Tuple[Tuple[str, Any], ...] = (
            ("priority", priority),
            ("checkpoint", dict(checkpoint) if checkpoint else None),
            ("preemptible", preemptible),
            ("interactive", interactive),
            ("waitForCapacity", wait_for_capacity),
            ("workdir", os.path.abspath(workdir) if workdir else None),
            ("volumes", list(volumes) if volumes else None),
            ("array", array),
            ("after", [int(j) for j in after] if after else None),
            ("afterOk", [int(j) for j in after_ok] if after_ok else None),
            ("afterAny", [int(j) for j in after_any] if after_any else None),
            ("timeLimit", time_limit),
            ("begin", begin),
            ("hold", hold),
            ("outputFile", output_file),
        )
        for key, value in extra:
            if value is not None:
                spec[key] = value
        spec["submitDir"] = os.getcwd()
        metadata: Dict[str, Any] = {"name": name or _name_of(words or [image or "job"])}
        if project is not None:
            metadata["project"] = project
        return self.submit_manifest(
            {"apiVersion": "tessera/v1", "kind": "Job", "metadata": metadata, "spec": spec}
        )

    def submit_manifest(self, manifest: Union[Mapping[str, Any], str]) -> Job:
        """Submits a manifest: a dict, or the text of a YAML or JSON file."""
        if isinstance(manifest, str):
            return self._job(self.request("POST", "/v1/jobs", manifest, content_type="application/yaml"))
        return self._job(self.request("POST", "/v1/jobs", dict(manifest)))

    def job(self, id: int) -> Job:
        return self._job(self.request("GET", f"/v1/jobs/{int(id)}"))

    def jobs(
        self,
        project: Optional[str] = None,
        state: Union[str, Sequence[str], None] = None,
        owner: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> "Records[Job]":
        """Jobs you may see, newest first; `state` may be one state or several."""
        if state is not None and not isinstance(state, str):
            state = ",".join(state)
        query = {"project": project, "state": state, "owner": owner, "limit": limit}
        return Records(self._job(j) for j in self.request("GET", "/v1/jobs", query=query))

    def events(self, id: int) -> "Records[Event]":
        return Records(Event.from_json(e) for e in self.request("GET", f"/v1/jobs/{int(id)}/events"))

    def _job(self, data: Dict[str, Any]) -> Job:
        job = Job.from_json(data)
        job._client = self
        return job

    def _job_call(self, id: int, verb: str, body: Any = None) -> Job:
        return self._job(self.request("POST", f"/v1/jobs/{int(id)}/{verb}", body))

    def _log_pieces(
        self,
        id: int,
        replica: int,
        stream: str,
        attempt: Optional[int],
        since: Optional[str],
        follow: bool,
    ) -> Iterator[str]:
        offset = 0
        quiet = 0.1
        while True:
            query = {
                "replica": replica,
                "stream": stream,
                "offset": offset,
                "attempt": attempt,
                "since": since,
            }
            try:
                chunk = self.request("GET", f"/v1/jobs/{int(id)}/logs", query=query)
            except TesseraError as e:
                if follow and e.status == 409:  # not started yet: wait for it
                    time.sleep(quiet)
                    quiet = min(quiet * 2, 1.0)
                    continue
                raise
            if chunk["data"]:
                yield chunk["data"]
            moved = chunk["next_offset"] > offset
            offset = chunk["next_offset"]
            if not follow or (chunk["done"] and not moved):
                return
            if not moved:
                time.sleep(quiet)
                quiet = min(quiet * 2, 1.0)
            else:
                quiet = 0.1

    # -- the pool -------------------------------------------------------------------------

    def nodes(self) -> "Records[Node]":
        return Records(Node.from_json(n) for n in self.request("GET", "/v1/nodes"))

    def node(self, name: str) -> Node:
        return Node.from_json(self.request("GET", f"/v1/nodes/{urllib.parse.quote(name)}"))

    def projects(self) -> "Records[Project]":
        return Records(Project.from_json(p) for p in self.request("GET", "/v1/projects"))

    def usage(
        self,
        since: str = "7d",
        until: Optional[str] = None,
        by: str = "project",
        project: Optional[str] = None,
        job: Optional[int] = None,
    ) -> "Records[UsageRow]":
        """Use over a window (`since` 7d, 24h or Unix ms) by project, user, model, job or node,
        of one project or one job; the rows, with the report's total in `.total`."""
        query = {"since": since, "until": until, "by": by, "project": project, "job": job}
        report = self.request("GET", "/v1/usage", query=query)
        rows: Records[UsageRow] = Records(UsageRow.from_json(r) for r in report["rows"])
        rows.total = UsageRow.from_json(report["total"])
        return rows

    def whoami(self) -> WhoAmI:
        return WhoAmI.from_json(self.request("GET", "/v1/whoami"))


def _refusal(e: urllib.error.HTTPError) -> TesseraError:
    text = e.read().decode(errors="replace")
    try:
        err = json.loads(text)["error"]
        return TesseraError(e.code, err.get("message", text), err.get("field"))
    except (ValueError, KeyError, TypeError):
        return TesseraError(e.code, text.strip() or e.reason)


