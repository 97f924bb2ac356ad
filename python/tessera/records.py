"""What the API answers, as typed records: one dataclass per schema of the pool's OpenAPI
document (`/openapi.json`), its fields named as the document names them.

`tessera.openapi.check` compares these classes with the document field by field, and the tests
run it against a live pool, so the two cannot drift apart unnoticed. A field the pool adds later
is not lost: every record keeps the whole answer in `raw`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Type, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """A record of the API. `SCHEMA` names its schema in the OpenAPI document; `NESTED` names the
    fields that hold other records; `raw` is the whole answer it was read from."""

    SCHEMA: ClassVar[str] = ""
    NESTED: ClassVar[Dict[str, Type["Record"]]] = {}
    raw: Dict[str, Any]

    @classmethod
    def from_json(cls: Type[R], data: Dict[str, Any]) -> R:
        kwargs: Dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name.startswith("_") or f.name == "raw" or f.name not in data:
                continue
            value = data[f.name]
            nested = cls.NESTED.get(f.name)
            if nested is not None and isinstance(value, list):
                value = [nested.from_json(v) for v in value]
            kwargs[f.name] = value
        record = cls(**kwargs)
        record.raw = data
        return record

    def to_dict(self) -> Dict[str, Any]:
        """The record's fields (nested records as dicts), without `raw` or private fields."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name.startswith("_") or f.name == "raw":
                continue
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = [v.to_dict() if isinstance(v, Record) else v for v in value]
            out[f.name] = value
        return out


def _raw() -> Any:
    return field(default_factory=dict, repr=False, compare=False)


@dataclass
class Replica(Record):
    """One replica of a job: where it runs and how it ended."""

    SCHEMA: ClassVar[str] = "Replica"

    index: int = 0
    node: str = ""
    phase: str = ""
    gpu_milli: int = 0
    devices: List[int] = field(default_factory=list)
    exit_code: Optional[int] = None
    exit_message: Optional[str] = None
    leaving: bool = False
    gpu_node: Optional[str] = None
    raw: Dict[str, Any] = _raw()


@dataclass
class Device(Record):
    SCHEMA: ClassVar[str] = "Device"

    index: int = 0
    model: str = ""
    memory_bytes: int = 0
    allocated_milli: int = 0
    simulated: bool = False
    raw: Dict[str, Any] = _raw()


@dataclass
class Node(Record):
    SCHEMA: ClassVar[str] = "Node"
    NESTED: ClassVar[Dict[str, Type[Record]]] = {"devices": Device}

    name: str = ""
    health: str = ""
    cordoned: bool = False
    simulated: bool = False
    cpu_milli: int = 0
    memory_bytes: int = 0
    labels: Dict[str, str] = field(default_factory=dict)
    checkpoint: List[str] = field(default_factory=list)
    confinement: str = ""
    address: str = ""
    devices: List[Device] = field(default_factory=list)
    gpu_allocated_milli: int = 0
    cpu_allocated_milli: int = 0
    replicas: int = 0
    last_seen_ms_ago: int = 0
    raw: Dict[str, Any] = _raw()


@dataclass
class Project(Record):
    SCHEMA: ClassVar[str] = "Project"

    name: str = ""
    parent: Optional[str] = None
    guaranteed_gpu: float = 0.0
    limit_gpu: Optional[float] = None
    over_quota_weight: int = 0
    members: List[str] = field(default_factory=list)
    min_runtime_s: float = 0.0
    used_gpu: float = 0.0
    jobs_running: int = 0
    jobs_pending: int = 0
    policy: Dict[str, Any] = field(default_factory=dict)
    recent_gpu: float = 0.0
    raw: Dict[str, Any] = _raw()


@dataclass
class Event(Record):
    SCHEMA: ClassVar[str] = "Event"

    job: int = 0
    ts_ms: int = 0
    kind: str = ""
    message: str = ""
    raw: Dict[str, Any] = _raw()


@dataclass
class UsageRow(Record):
    """One row of a usage report: the exact integer sums and the derived hours for people."""

    SCHEMA: ClassVar[str] = "UsageRow"

    key: str = ""
    name: Optional[str] = None
    gpu_milli_ms: int = 0
    idle_gpu_milli_ms: int = 0
    gpu_memory_mib_ms: int = 0
    cpu_milli_ms: int = 0
    memory_mib_ms: int = 0
    energy_mj: int = 0
    gpu_hours: float = 0.0
    idle_gpu_hours: float = 0.0
    gpu_memory_gib_hours: float = 0.0
    cpu_hours: float = 0.0
    memory_gib_hours: float = 0.0
    energy_kwh: float = 0.0
    cost: float = 0.0
    co2_kg: Optional[float] = None
    segments: int = 0
    jobs: int = 0
    simulated: bool = False
    raw: Dict[str, Any] = _raw()


@dataclass
class WhoAmI(Record):
    SCHEMA: ClassVar[str] = "WhoAmI"

    user: str = ""
    role: str = ""
    #: None: every project (an admin).
    projects: Optional[List[str]] = None
    raw: Dict[str, Any] = _raw()


class Records(List[R]):
    """A list of records that also turns into a pandas DataFrame (when pandas is installed)."""

    #: A usage report's total row (other lists have none).
    total: Optional[Record] = None

    def to_frame(self) -> Any:
        try:
            import pandas  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError as e:
            raise ImportError(
                "to_frame() needs pandas: pip install pandas (the records themselves need "
                "nothing more)"
            ) from e
        return pandas.DataFrame([r.to_dict() for r in self])
