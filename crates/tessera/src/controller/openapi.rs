//! The OpenAPI 3.1 document served at `/openapi.json`, built from one table of operations so that
//! the document and the router are checked against each other by a test.

use axum::Json;
use serde_json::{Value, json};

/// (method, path, summary, request body schema, response schema)
pub const OPERATIONS: &[(&str, &str, &str, Option<&str>, &str)] = &[
    (
        "post",
        "/v1/jobs",
        "Submit a job (manifest as JSON or YAML)",
        Some("Manifest"),
        "Job",
    ),
    (
        "get",
        "/v1/jobs",
        "List jobs; filters: project, state (comma-separated), owner, limit, array (an array's tasks)",
        None,
        "JobList",
    ),
    (
        "get",
        "/v1/jobs/{id}",
        "Get one job, with its reason",
        None,
        "Job",
    ),
    (
        "post",
        "/v1/jobs/{id}/cancel",
        "Cancel a job (its whole process trees are killed)",
        None,
        "Job",
    ),
    (
        "post",
        "/v1/jobs/{id}/migrate",
        "Move a running job (checkpointed first when it checkpoints), to a given node or anywhere",
        Some("MigrateBody"),
        "Job",
    ),
    (
        "get",
        "/v1/jobs/{id}/manifest",
        "The manifest that makes the job again (camelCase, what the pool filled in written out), with its status beside it (ignored when submitted)",
        None,
        "Manifest",
    ),
    (
        "get",
        "/v1/jobs/{id}/exec",
        "A WebSocket to a process inside a running replica (tessera exec); query: replica, command (a JSON list), tty, term. Binary frames: a channel byte (0 stdin, 1 stdout, 2 stderr, 3 resize {cols, rows}, 4 exit {code}, 5 end of stdin, 6 failed to start) and its bytes",
        None,
        "Empty",
    ),
    (
        "get",
        "/v1/jobs/{id}/port-forward",
        "A WebSocket carrying one TCP connection to a port the replica listens on (tessera port-forward); query: replica, port",
        None,
        "Empty",
    ),
    (
        "post",
        "/v1/jobs/{id}/hold",
        "Hold a pending job: it does not start until released",
        None,
        "Job",
    ),
    (
        "post",
        "/v1/jobs/{id}/release",
        "Release a held job",
        None,
        "Job",
    ),
    (
        "post",
        "/v1/jobs/{id}/requeue",
        "Queue a job again: a running one is stopped first (through its checkpoint), an ended one starts a new attempt",
        None,
        "Job",
    ),
    (
        "get",
        "/v1/jobs/{id}/events",
        "A job's events, oldest first",
        None,
        "EventList",
    ),
    (
        "get",
        "/v1/jobs/{id}/logs",
        "Output of one replica; query: replica, stream (all|stdout|stderr; all interleaves both), offset, attempt, since (10m or epoch ms), timestamps, lines (each line with its stream and time)",
        None,
        "LogChunk",
    ),
    (
        "post",
        "/v1/services",
        "Create a service (manifest with kind: Service)",
        Some("Manifest"),
        "Service",
    ),
    (
        "get",
        "/v1/services",
        "List services with their replicas",
        None,
        "ServiceList",
    ),
    (
        "get",
        "/v1/services/{name}",
        "Get one service",
        None,
        "Service",
    ),
    (
        "delete",
        "/v1/services/{name}",
        "Stop every replica and remove the service",
        None,
        "Service",
    ),
    (
        "post",
        "/v1/services/{name}/scale",
        "Set the replica count (within its autoscale range)",
        Some("Scale"),
        "Service",
    ),
    (
        "post",
        "/v1/services/{name}/move",
        "Move a replica make-before-break (job: which, to: node)",
        Some("Move"),
        "Service",
    ),
    (
        "get",
        "/v1/usage",
        "Usage over a window; query: since (7d or epoch ms), until, by (project|user|model|job|node), project, job",
        None,
        "Usage",
    ),
    (
        "get",
        "/v1/telemetry",
        "A time series; query: name (pool, gpu/NODE/INDEX, job/ID/REPLICA), since",
        None,
        "Series",
    ),
    (
        "get",
        "/v1/audit",
        "The audit log, newest first; query: since, until, project, job, action, limit",
        None,
        "AuditList",
    ),
    (
        "get",
        "/v1/nodes",
        "List nodes with their devices and allocation",
        None,
        "NodeList",
    ),
    ("get", "/v1/nodes/{name}", "Get one node", None, "Node"),
    (
        "post",
        "/v1/nodes/{name}/cordon",
        "Stop placing new work on a node (admin)",
        None,
        "Node",
    ),
    (
        "post",
        "/v1/nodes/{name}/uncordon",
        "Place work on a node again (admin)",
        None,
        "Node",
    ),
    (
        "post",
        "/v1/nodes/{name}/replace",
        "Revoke a node's agent credential so that a new machine may join under its name (admin)",
        None,
        "Node",
    ),
    (
        "post",
        "/v1/nodes/{name}/drain",
        "Cordon a node and requeue its jobs (admin)",
        None,
        "Node",
    ),
    (
        "get",
        "/v1/projects",
        "List projects with quota and usage",
        None,
        "ProjectList",
    ),
    (
        "post",
        "/v1/projects",
        "Create a project (admin)",
        Some("ProjectBody"),
        "Project",
    ),
    (
        "get",
        "/v1/projects/{name}",
        "Get one project",
        None,
        "Project",
    ),
    (
        "patch",
        "/v1/projects/{name}",
        "Change quotas, parent or members (admin)",
        Some("ProjectBody"),
        "Project",
    ),
    (
        "post",
        "/v1/projects/{name}/members",
        "Set a project's members (admin)",
        Some("Members"),
        "Project",
    ),
    (
        "get",
        "/v1/projects/{name}/registries",
        "A project's registry logins, without their passwords (admin)",
        None,
        "LoginList",
    ),
    (
        "put",
        "/v1/projects/{name}/registries/{registry}",
        "Store a project's login to a registry (host[:port]); its image jobs pull with it (admin)",
        Some("LoginBody"),
        "Login",
    ),
    (
        "delete",
        "/v1/projects/{name}/registries/{registry}",
        "Remove a project's login to a registry (admin)",
        None,
        "Empty",
    ),
    ("get", "/v1/users", "List users (admin)", None, "UserList"),
    (
        "post",
        "/v1/users",
        "Create a user with a role (admin)",
        Some("UserBody"),
        "User",
    ),
    (
        "get",
        "/v1/tokens",
        "List tokens (admins see all, others their own)",
        None,
        "TokenList",
    ),
    (
        "post",
        "/v1/tokens",
        "Create a token; the secret is in the answer only",
        Some("TokenBody"),
        "Token",
    ),
    ("delete", "/v1/tokens/{id}", "Revoke a token", None, "Empty"),
    (
        "get",
        "/v1/whoami",
        "The caller's user, role and projects",
        None,
        "WhoAmI",
    ),
    (
        "get",
        "/v1/pool",
        "How the pool is run: its placement policy and its number of nodes",
        None,
        "Pool",
    ),
    (
        "post",
        "/v1/agent/register",
        "An agent joins (join token) or re-registers (its credential)",
        Some("Register"),
        "Registered",
    ),
    (
        "post",
        "/v1/agent/sync",
        "An agent's heartbeat and report; answers its desired allocations (long poll)",
        Some("Sync"),
        "Desired",
    ),
    (
        "post",
        "/v1/agent/chunks/missing",
        "An agent asks which checkpoint chunks (SHA-256) the controller lacks",
        Some("Hashes"),
        "Hashes",
    ),
    (
        "put",
        "/v1/agent/chunks/{hash}",
        "An agent uploads one checkpoint chunk, named by its SHA-256",
        Some("Bytes"),
        "Empty",
    ),
    (
        "get",
        "/v1/agent/chunks/{hash}",
        "An agent downloads one checkpoint chunk of a replica it runs",
        None,
        "Bytes",
    ),
    (
        "post",
        "/v1/agent/checkpoints",
        "An agent records a replica's complete checkpoint (every chunk uploaded first)",
        Some("CheckpointManifest"),
        "Saved",
    ),
    (
        "get",
        "/v1/agent/checkpoints/{id}",
        "An agent reads a checkpoint of a replica it runs",
        None,
        "CheckpointManifest",
    ),
];

fn schemas() -> Value {
    let obj = |props: Value| json!({"type": "object", "properties": props});
    let list = |item: &str| json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{item}")}});
    let checkpoint = json!({"type": "object", "additionalProperties": false, "properties": {
        "mode": {"enum": ["cooperative", "transparent"]}, "signal": {"type": "string"},
        "grace": {"type": "string"}, "interval": {"type": "string"}}});
    let autoscale = json!({"type": "object", "required": ["min", "max"], "properties": {
        "min": {"type": "integer"}, "max": {"type": "integer"}, "targetInFlight": {"type": "number"},
        "targetRps": {"type": "number"}, "scaleDownDelay": {"type": "string"}}});
    let service = json!({"description": "kind: Service only", "type": "object",
        "additionalProperties": false, "properties": {
            "port": {"oneOf": [{"type": "integer"}, {"const": "auto"}]},
            "readiness": {"type": "object", "properties": {"path": {"type": "string"}, "period": {"type": "string"}}},
            "drain": {"type": "string"}, "autoscale": autoscale}});
    json!({
        "Manifest": {
            "type": "object",
            "required": ["metadata", "spec"],
            "additionalProperties": false,
            "properties": {
                "apiVersion": {"const": "tessera/v1"},
                "kind": {"enum": ["Job", "Service"]},
                "metadata": {"type": "object", "required": ["name"], "additionalProperties": false,
                    "properties": {"name": {"type": "string"}, "project": {"type": "string"}}},
                "status": {"type": "object", "description": "what `tessera get` shows of the job; ignored when submitted"},
                "spec": {"type": "object", "additionalProperties": false,
                    "properties": {
                        "replicas": {"description": "a gang of N, or an elastic range {min, max}", "oneOf": [
                            {"type": "integer", "minimum": 1},
                            {"type": "object", "required": ["min", "max"], "additionalProperties": false, "properties": {
                                "min": {"type": "integer", "minimum": 1}, "max": {"type": "integer", "minimum": 1}}}]},
                        "priority": {"oneOf": [{"type": "integer"}, {"enum": ["low", "normal", "high", "critical"]}]},
                        "resources": {"type": "object", "additionalProperties": false, "properties": {
                            "gpu": {"description": "0 to 1 (a share) or a whole number of devices", "oneOf": [{"type": "number"}, {"type": "string"}]},
                            "gpuMemory": {"description": "e.g. 20GiB", "oneOf": [{"type": "integer"}, {"type": "string"}]},
                            "cpu": {"description": "cores (2, 0.5) or milli (500m)", "oneOf": [{"type": "number"}, {"type": "string"}]},
                            "memory": {"description": "e.g. 8GiB", "oneOf": [{"type": "integer"}, {"type": "string"}]},
                            "deviceModels": {"type": "array", "items": {"type": "string"}},
                            "gpuAttach": {"enum": ["local", "remote", "any"], "description": "where the GPU may be: its own node, another's over the network, or either"},
                            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}}}},
                        "image": {"type": "string", "description": "a container image, registry/repository:tag or @sha256:digest"},
                        "command": {"type": "array", "items": {"type": "string"}, "description": "the program and its arguments (with an image: what replaces its CMD)"},
                        "env": {"type": "object", "additionalProperties": {"type": "string"}},
                        "restart": {"type": "object", "additionalProperties": false, "required": ["policy"], "properties": {
                            "policy": {"enum": ["never", "on-failure"]}, "maxRestarts": {"type": "integer"}}},
                        "preemptible": {"type": "boolean"},
                        "interactive": {"type": "boolean", "description": "its project's idle policy may stop it"},
                        "waitForCapacity": {"type": "boolean", "description": "accept it although no node of the pool could hold it today"},
                        "workdir": {"type": "string", "description": "where it starts, on one of its volumes"},
                        "volumes": {"type": "array", "items": {"type": "string"}, "description": "its project's volumes it mounts, PATH or PATH:ro (default: all)"},
                        "submitDir": {"type": "string", "description": "where it was submitted from (the CLI sets it); its workdir when on a volume"},
                        "checkpoint": checkpoint,
                        "service": service,
                        "array": {"type": "string", "description": "a job array as Slurm writes it: 0-99%8 (indexes, at most 8 running at once)"},
                        "after": {"type": "array", "items": {"type": "integer"}, "description": "jobs it starts after, once they have started"},
                        "afterOk": {"type": "array", "items": {"type": "integer"}, "description": "jobs it starts after, once they have succeeded (cancelled if one fails)"},
                        "afterAny": {"type": "array", "items": {"type": "integer"}, "description": "jobs it starts after, once they have ended"},
                        "timeLimit": {"type": "string", "description": "how long it may run, e.g. 4h; then stopped through its checkpoint signal"},
                        "begin": {"type": "string", "description": "start no earlier than: 2026-12-08T09:00:00Z, or +2h"},
                        "hold": {"type": "boolean", "description": "submitted held: it starts once released"},
                        "outputFile": {"type": "string", "description": "a file in its working directory that also gets its output, as Slurm's --output: slurm-%j.out"}}}}
        },
        "Service": obj(json!({"name": {"type": "string"}, "project": {"type": "string"}, "replicas": {"type": "integer"},
            "ready": {"type": "integer"}, "path": {"type": "string"}, "jobs": {"type": "array"}, "endpoints": {"type": "array"},
            "autoscale": {}})),
        "ServiceList": list("Service"),
        "Scale": {"type": "object", "required": ["replicas"], "additionalProperties": false, "properties": {"replicas": {"type": "integer", "minimum": 0}}},
        "MigrateBody": {"type": "object", "additionalProperties": false, "properties": {"to": {"type": "string", "description": "a node (default: wherever the scheduler places it)"}}},
        "Move": {"type": "object", "additionalProperties": false, "properties": {"job": {"type": "integer", "minimum": 0}, "to": {"type": "string"}}},
        "JobList": list("Job"),
        "Event": obj(json!({"job": {"type": "integer"}, "ts_ms": {"type": "integer"}, "kind": {"type": "string"}, "message": {"type": "string"}})),
        "EventList": list("Event"),
        "LogChunk": obj(json!({"data": {"type": "string"}, "offset": {"type": "integer"}, "cut": {"type": "integer"}, "next_offset": {"type": "integer"}, "done": {"type": "boolean"},
            "lines": {"type": "array", "items": obj(json!({"ts_ms": {"type": "integer"}, "stream": {"enum": ["stdout", "stderr", "tessera"]}, "text": {"type": "string"}, "partial": {"type": "boolean"}}))}})),
        "NodeList": list("Node"),
        "ProjectBody": {"type": "object", "additionalProperties": false, "properties": {
            "name": {"type": "string"}, "parent": {"type": "string"}, "guaranteed_gpu": {"type": "number"},
            "limit_gpu": {"type": ["number", "null"]}, "over_quota_weight": {"type": "integer"},
            "members": {"type": "array", "items": {"type": "string"}},
            "min_runtime": {"type": "string"},
            "residency": {"type": "object", "additionalProperties": {"type": "string"}, "description": "node labels its jobs must run on"},
            "device_models": {"type": "array", "items": {"type": "string"}},
            "max_gpu_per_job": {"type": ["number", "null"]},
            "idle_after": {"type": "string", "description": "e.g. 30m, or off"},
            "idle_threshold": {"type": "number", "description": "percent GPU utilisation"},
            "idle_warning": {"type": "string"},
            "volumes": {"type": "array", "items": {"type": "string"}, "description": "host paths its jobs may mount, PATH or PATH:ro"}}},
        "ProjectList": list("Project"),
        "UsageRow": obj(json!({"key": {"type": "string"}, "name": {"type": "string"}, "gpu_milli_ms": {"type": "integer"}, "idle_gpu_milli_ms": {"type": "integer"},
            "gpu_memory_mib_ms": {"type": "integer"}, "cpu_milli_ms": {"type": "integer"}, "memory_mib_ms": {"type": "integer"},
            "energy_mj": {"type": "integer"}, "gpu_hours": {"type": "number"}, "idle_gpu_hours": {"type": "number"},
            "gpu_memory_gib_hours": {"type": "number"}, "cpu_hours": {"type": "number"},
            "memory_gib_hours": {"type": "number"}, "energy_kwh": {"type": "number"}, "cost": {"type": "number"}, "co2_kg": {"type": "number"},
            "segments": {"type": "integer"}, "jobs": {"type": "integer"}, "simulated": {"type": "boolean"}})),
        "Usage": obj(json!({"by": {"type": "string"}, "window": {"type": "object"},
            "rows": {"type": "array", "items": {"$ref": "#/components/schemas/UsageRow"}},
            "total": {"$ref": "#/components/schemas/UsageRow"}})),
        "Series": obj(json!({"name": {"type": "string"}, "points": {"type": "array", "items": obj(json!({
            "ts_ms": {"type": "integer"}, "util_pct": {"type": "number"}, "memory_used_bytes": {"type": "integer"},
            "memory_total_bytes": {"type": "integer"}, "power_mw": {"type": "integer"}, "cpu_pct": {"type": "number"},
            "host_memory_bytes": {"type": "integer"}, "simulated": {"type": "boolean"}}))}})),
        "AuditEntry": obj(json!({"seq": {"type": "integer"}, "ts_ms": {"type": "integer"}, "actor": {"type": "string"},
            "action": {"type": "string"}, "project": {"type": ["string", "null"]}, "job": {"type": ["integer", "null"]},
            "detail": {"type": "string"}})),
        "AuditList": list("AuditEntry"),
        "LoginBody": {"type": "object", "required": ["username", "password"], "additionalProperties": false, "properties": {
            "username": {"type": "string"}, "password": {"type": "string", "description": "never shown back"}}},
        "Login": obj(json!({"registry": {"type": "string"}, "username": {"type": "string"}, "updated_ms": {"type": "integer"}})),
        "LoginList": list("Login"),
        "Members": {"type": "object", "required": ["members"], "additionalProperties": false, "properties": {"members": {"type": "array", "items": {"type": "string"}}}},
        "UserBody": {"type": "object", "required": ["name", "role"], "additionalProperties": false, "properties": {"name": {"type": "string"}, "role": {"enum": ["admin", "member", "viewer"]},
            "uid": {"type": "integer", "minimum": 1000, "maximum": 4294967293u64, "description": "the user's own uid on the nodes; their replicas run as it"}}},
        "User": obj(json!({"name": {"type": "string"}, "role": {"type": "string"}, "uid": {"type": "integer"}})),
        "UserList": list("User"),
        "TokenBody": {"type": "object", "additionalProperties": false, "properties": {"kind": {"enum": ["user", "join"]}, "user": {"type": "string"}, "description": {"type": "string"},
            "uses": {"type": "integer", "minimum": 1, "description": "join tokens: how many nodes it may join (default 1)"},
            "expires_in": {"type": "string", "description": "join tokens: how long it works, e.g. 1h (default), 7d"}}},
        "Token": obj(json!({"id": {"type": "string"}, "kind": {"type": "string"}, "subject": {"type": "string"}, "token": {"type": "string"}})),
        "TokenList": list("Token"),
        "WhoAmI": obj(json!({"user": {"type": "string"}, "role": {"enum": ["admin", "member", "viewer"]},
            "projects": {"type": ["array", "null"], "items": {"type": "string"}, "description": "null: every project (an admin)"}})),
        "Desired": obj(json!({"revision": {"type": "integer"}, "lease_ms": {"type": "integer"}, "desired": {"type": "array"}, "acked": {"type": "array"}})),
        "Empty": {"type": "null"},
        "Error": obj(json!({"error": obj(json!({"status": {"type": "integer"}, "message": {"type": "string"}, "field": {"type": "string"}}))}))
    })
}

/// What the API answers about jobs, nodes and projects (the views), which the Python client reads
/// as records: a separate literal, as the agents' side is.
fn view_schemas() -> Value {
    let obj = |props: Value| json!({"type": "object", "properties": props});
    json!({
        "Job": obj(json!({
            "id": {"type": "integer"}, "name": {"type": "string"}, "project": {"type": "string"},
            "owner": {"type": "string"},
            "state": {"enum": ["pending", "scheduled", "running", "succeeded", "failed", "cancelled"]},
            "reason": {"type": "string"}, "priority": {"type": "integer"}, "replicas": {"type": "integer"},
            "elastic": {"type": "object", "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}}},
            "gpu": {"type": "number"}, "gpu_memory_bytes": {"type": "integer"}, "cpu_milli": {"type": "integer"},
            "memory_bytes": {"type": "integer"}, "command": {"type": "array", "items": {"type": "string"}},
            "restart": {"enum": ["never", "on-failure"]}, "attempt": {"type": "integer"}, "restarts": {"type": "integer"},
            "created_ms": {"type": "integer"}, "updated_ms": {"type": "integer"}, "finished_ms": {"type": ["integer", "null"]},
            "assignments": {"type": "array", "items": {"$ref": "#/components/schemas/Replica"}},
            "array": {"type": "object", "description": "the array it is a task of", "properties": {
                "id": {"type": "integer"}, "index": {"type": "integer"}, "count": {"type": "integer"},
                "limit": {"type": "integer"}, "text": {"type": "string"}}},
            "after": {"type": "array", "items": {"type": "object", "properties": {
                "job": {"type": "integer"}, "on": {"enum": ["start", "ok", "any"]}}}},
            "time_limit_ms": {"type": "integer"}, "held": {"type": "boolean"}})),
        "Replica": obj(json!({"index": {"type": "integer"}, "node": {"type": "string"},
            "phase": {"enum": ["assigned", "running", "exited", "lost", "not_started"]}, "gpu_milli": {"type": "integer"},
            "devices": {"type": "array", "items": {"type": "integer"}}, "exit_code": {"type": ["integer", "null"]},
            "exit_message": {"type": "string"}, "leaving": {"type": "boolean"},
            "gpu_node": {"type": "string", "description": "a remotely attached replica's device node"}})),
        "Node": obj(json!({"name": {"type": "string"}, "health": {"enum": ["ready", "lost"]}, "cordoned": {"type": "boolean"},
            "simulated": {"type": "boolean"}, "cpu_milli": {"type": "integer"}, "memory_bytes": {"type": "integer"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "checkpoint": {"type": "array", "items": {"type": "string"}}, "confinement": {"type": "string"},
            "address": {"type": "string"}, "devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}},
            "gpu_allocated_milli": {"type": "integer"}, "cpu_allocated_milli": {"type": "integer"},
            "replicas": {"type": "integer"}, "last_seen_ms_ago": {"type": "integer"}})),
        "Device": obj(json!({"index": {"type": "integer"}, "model": {"type": "string"}, "memory_bytes": {"type": "integer"},
            "allocated_milli": {"type": "integer"}, "simulated": {"type": "boolean"}})),
        "Project": obj(json!({"name": {"type": "string"}, "parent": {"type": ["string", "null"]},
            "guaranteed_gpu": {"type": "number"}, "limit_gpu": {"type": ["number", "null"]},
            "over_quota_weight": {"type": "integer"}, "members": {"type": "array", "items": {"type": "string"}},
            "min_runtime_s": {"type": "number"}, "used_gpu": {"type": "number"}, "jobs_running": {"type": "integer"},
            "jobs_pending": {"type": "integer"}, "policy": {"type": "object"}, "recent_gpu": {"type": "number"}}))
    })
}

/// The agents' side of the API (a separate literal: one would pass the macro's recursion limit).
fn agent_schemas() -> Value {
    let obj = |props: Value| json!({"type": "object", "properties": props});
    json!({
        "Register": {"type": "object", "additionalProperties": false,
            "required": ["name", "cpu_milli", "memory_bytes", "simulated", "address"],
            "properties": {"name": {"type": "string"}, "cpu_milli": {"type": "integer", "minimum": 0}, "memory_bytes": {"type": "integer", "minimum": 0},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "devices": {"type": "array", "items": {"type": "object", "required": ["model", "memory_bytes"], "properties": {
                    "model": {"type": "string"}, "memory_bytes": {"type": "integer", "minimum": 0},
                    "class": {"type": "object", "description": "vendor and kind (default nvidia/gpu)",
                        "properties": {"vendor": {"type": "string"}, "kind": {"type": "string"}}}}}},
                "simulated": {"type": "boolean"}, "address": {"type": "string"},
                "callback_secret": {"type": "string", "description": "not used"}, "confinement": {"type": "string"}}},
        "Pool": obj(json!({"policy": {"type": "string"}, "nodes": {"type": "integer"}})),
        "Registered": obj(json!({"token": {}, "lease_ms": {"type": "integer"}, "callback_secret": {"type": "string"}})),
        "Sync": {"type": "object", "additionalProperties": false, "required": ["seq", "revision", "statuses", "wait_ms"],
            "properties": {"seq": {"type": "integer", "minimum": 0}, "revision": {"type": "integer", "minimum": 0}, "statuses": {"type": "array"},
                "wait_ms": {"type": "integer", "minimum": 0}, "sample": {}}},
        "Hashes": {"type": "object", "additionalProperties": false, "required": ["hashes"], "properties": {"hashes": {"type": "array", "items": {"type": "string"}}}},
        "Saved": obj(json!({"id": {"type": "string"}})),
        "CheckpointManifest": {"type": "object", "description": "a replica's checkpoint: its files and their chunks",
            "required": ["job", "attempt", "replica", "files"],
            "properties": {"id": {"type": "string"}, "job": {"type": "integer"}, "attempt": {"type": "integer"},
                "replica": {"type": "integer"}, "files": {"type": "array"}}},
        "Bytes": {"type": "string", "format": "binary"}
    })
}

/// A request field that may be left out may also be `null` (the server reads both as absent):
/// said in the schema, so that the document and the server agree.
fn optional_may_be_null(schema: &mut Value) {
    match schema {
        Value::Object(m) => {
            let required: Vec<String> = m
                .get("required")
                .and_then(Value::as_array)
                .map(|r| {
                    r.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(Value::Object(props)) = m.get_mut("properties") {
                for (name, prop) in props.iter_mut() {
                    optional_may_be_null(prop);
                    if !required.contains(name) {
                        *prop = json!({"anyOf": [prop.take(), {"type": "null"}]});
                    }
                }
            }
            for key in ["items", "additionalProperties", "oneOf", "anyOf"] {
                if let Some(inner) = m.get_mut(key) {
                    optional_may_be_null(inner);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(optional_may_be_null),
        _ => {}
    }
}

pub fn build() -> Value {
    let mut schemas = schemas();
    if let (Some(all), Value::Object(more)) = (schemas.as_object_mut(), view_schemas()) {
        all.extend(more);
    }
    if let (Some(all), Value::Object(more)) = (schemas.as_object_mut(), agent_schemas()) {
        all.extend(more);
    }
    // Once per schema: several operations take the same body (a manifest makes jobs and
    // services), and a second pass would wrap its fields twice.
    let bodies: std::collections::BTreeSet<&str> =
        OPERATIONS.iter().filter_map(|op| op.3).collect();
    for body in bodies {
        if let Some(schema) = schemas.get_mut(body) {
            optional_may_be_null(schema);
        }
    }
    let mut paths = serde_json::Map::new();
    for (method, path, summary, body, response) in OPERATIONS {
        let mut op = json!({
            "summary": summary,
            "security": [{"bearer": []}],
            "responses": {
                "2XX": {"description": "done", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{response}")}}}},
                "4XX": {"description": "refused; the message names the field and the fix", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        if *response == "Empty" {
            op["responses"]["2XX"] = json!({"description": "done (no body)"});
        } else if *response == "Bytes" {
            op["responses"]["2XX"]["content"] = json!({"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}});
        }
        match body {
            Some("Bytes") => {
                op["requestBody"] = json!({"required": true, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}});
            }
            Some(schema) => {
                // Optional bodies: creating a token and moving a job or service take defaults.
                let required = !matches!(*schema, "TokenBody" | "Move" | "MigrateBody");
                op["requestBody"] = json!({"required": required, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
            }
            None => {}
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Tessera API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "One pool of accelerator machines. Every call under /v1/ needs `Authorization: Bearer <token>`."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_names_a_schema_the_document_defines() {
        let doc = build();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.len() > OPERATIONS.len());
        for r in found {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} is not defined"
            );
        }
    }

    /// The Python client's records and calls are checked against this document (by the client's
    /// own checker, as CI runs it), so that neither can change without the other.
    #[test]
    fn the_python_client_agrees_with_the_document() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("openapi.json");
        std::fs::write(&file, serde_json::to_vec(&build()).unwrap()).unwrap();
        let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
        let out = std::process::Command::new("python3")
            .args(["-m", "tessera.openapi"])
            .arg(&file)
            .env("PYTHONPATH", &python)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .expect("python3 runs");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the client and the document differ:\n{said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("the client agrees"), "{said}");
    }
}
