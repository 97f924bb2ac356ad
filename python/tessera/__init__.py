"""Tessera's Python client, and the helpers jobs use inside the pool.

    import tessera
    job = tessera.Client().submit("python3 train.py", gpu=0.5)
    print(job.wait().state, job.logs())

- `tessera.Client`: submit, list, wait for, read the output of, cancel and move jobs; read the
  pool's nodes, projects and usage (as typed records, `.to_frame()` for pandas).
- `tessera.checkpoint.Checkpointer`: save and resume a job's state (inside a job).
- `tessera.elastic.ReplicaSet`: follow an elastic job's replicas (inside a job).

The package is on every process-mode job's PYTHONPATH; elsewhere, `pip install ./python`.
"""

from .client import FINAL_STATES, Client, Job, PoolUnreachable, TesseraError, config_path
from .records import Device, Event, Node, Project, Records, Replica, UsageRow, WhoAmI

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Job",
    "TesseraError",
    "PoolUnreachable",
    "FINAL_STATES",
    "config_path",
    "Device",
    "Event",
    "Node",
    "Project",
    "Records",
    "Replica",
    "UsageRow",
    "WhoAmI",
]
