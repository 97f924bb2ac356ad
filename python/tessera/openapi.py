"""Checks the client against the pool's OpenAPI document, so that the two cannot drift apart:

    python3 -m tessera.openapi http://127.0.0.1:7070      # or a saved openapi.json

Every record's fields must be the properties of its schema, no more and no fewer, and every call
the client makes must be an operation the document declares. Exits 1 naming each difference.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import urllib.request
from typing import Any, Dict, List, Type

from .client import Job
from .records import Device, Event, Node, Project, Record, Replica, UsageRow, WhoAmI

#: Every record the client reads.
RECORDS: List[Type[Record]] = [Job, Replica, Node, Device, Project, Event, UsageRow, WhoAmI]

#: Every call the client makes: (method, path as the document writes it).
CALLS = [
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/{id}"),
    ("post", "/v1/jobs/{id}/cancel"),
    ("post", "/v1/jobs/{id}/migrate"),
    ("post", "/v1/jobs/{id}/hold"),
    ("post", "/v1/jobs/{id}/release"),
    ("post", "/v1/jobs/{id}/requeue"),
    ("get", "/v1/jobs/{id}/events"),
    ("get", "/v1/jobs/{id}/logs"),
    ("get", "/v1/nodes"),
    ("get", "/v1/nodes/{name}"),
    ("get", "/v1/projects"),
    ("get", "/v1/usage"),
    ("get", "/v1/whoami"),
]

#: Manifest fields `Client.submit` writes (spec and spec.resources).
SUBMIT_SPEC = [
    "resources", "command", "image", "replicas", "env", "restart", "priority", "checkpoint",
    "preemptible", "interactive", "waitForCapacity", "workdir", "volumes", "submitDir",
    "array", "after", "afterOk", "afterAny", "timeLimit", "begin", "hold", "outputFile",
]
SUBMIT_RESOURCES = ["gpu", "gpuMemory", "cpu", "memory", "gpuAttach", "deviceModels", "nodeSelector"]


def _props(schema: Dict[str, Any]) -> Dict[str, Any]:
    """An object schema's properties, through the `anyOf [it, null]` that optional fields of
    request bodies are wrapped in."""
    for alt in schema.get("anyOf", []):
        found = _props(alt)
        if found:
            return found
    props: Dict[str, Any] = schema.get("properties", {})
    return props


def fields_of(record: Type[Record]) -> List[str]:
    return [
        f.name
        for f in dataclasses.fields(record)  # type: ignore[arg-type]
        if not f.name.startswith("_") and f.name != "raw"
    ]


def check(document: Dict[str, Any]) -> List[str]:
    """The differences between the client and `document`; empty when they agree."""
    problems = []
    schemas = document.get("components", {}).get("schemas", {})
    for record in RECORDS:
        schema = schemas.get(record.SCHEMA)
        if schema is None:
            problems.append(f"{record.__name__}: the document has no schema {record.SCHEMA}")
            continue
        declared = set(schema.get("properties", {}))
        mine = set(fields_of(record))
        for name in sorted(declared - mine):
            problems.append(f"{record.__name__}: no field for {record.SCHEMA}.{name}")
        for name in sorted(mine - declared):
            problems.append(f"{record.__name__}.{name}: not in the document's {record.SCHEMA}")
    paths = document.get("paths", {})
    for method, path in CALLS:
        if method not in paths.get(path, {}):
            problems.append(f"the client calls {method.upper()} {path}, which the document lacks")
    spec = _props(_props(schemas.get("Manifest", {})).get("spec", {}))
    for name in SUBMIT_SPEC:
        if name not in spec:
            problems.append(f"submit writes spec.{name}, which the Manifest schema lacks")
    resources = _props(spec.get("resources", {}))
    for name in SUBMIT_RESOURCES:
        if name not in resources:
            problems.append(f"submit writes spec.resources.{name}, which the Manifest schema lacks")
    return problems


def undeclared(document: Dict[str, Any], record: Record) -> List[str]:
    """Fields of a real answer (`record.raw`) that its schema does not declare."""
    schema = document["components"]["schemas"][record.SCHEMA]
    return sorted(set(record.raw) - set(schema.get("properties", {})))


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 -m tessera.openapi URL|openapi.json", file=sys.stderr)
        return 2
    where = argv[1]
    if where.startswith(("http://", "https://")):
        with urllib.request.urlopen(where.rstrip("/") + "/openapi.json", timeout=30) as r:
            document = json.load(r)
    else:
        with open(where) as f:
            document = json.load(f)
    problems = check(document)
    for p in problems:
        print(p)
    if not problems:
        print(f"the client agrees with {where}: {len(RECORDS)} records, {len(CALLS)} calls")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
