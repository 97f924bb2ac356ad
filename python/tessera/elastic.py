"""Follow an elastic Tessera job's replica set (Python standard library only).

An elastic job (`replicas: {min: 1, max: 8}`) starts with `min` replicas, grows into idle
capacity and gives replicas back when other work needs the room. Every replica finds the current
set in the file named by TESSERA_REPLICA_SET_FILE, which the agent replaces whole on every change:

    from tessera.elastic import ReplicaSet

    replicas = ReplicaSet()
    world = replicas.current()                   # {"generation", "min", "max", "replicas": [...]}
    rank = replicas.rank()                        # this replica's position in the set
    while training:
        train_one_step(world)
        if replicas.changed():                    # cheap: one stat() call
            world = replicas.current()            # re-form the group (e.g. a new all-reduce ring)

Each entry of "replicas" has the replica's "index" (TESSERA_REPLICA of that replica), its "node"
and "host". A replica that is given back gets its checkpoint signal first (see
tessera.checkpoint); one that joins later may start from the checkpoint of one that left
(TESSERA_RESUME_FROM). Outside Tessera (no TESSERA_REPLICA_SET_FILE) the set is this process
alone.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple


class ReplicaSet:
    def __init__(self, path: Optional[str] = None) -> None:
        p = path or os.environ.get("TESSERA_REPLICA_SET_FILE")
        self.path: Optional[Path] = Path(p) if p else None
        self.index = int(os.environ.get("TESSERA_REPLICA", "0"))
        self._seen: Optional[Tuple[int, int, int]] = None

    def _stamp(self) -> Optional[Tuple[int, int, int]]:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
            return (st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError:
            return None

    def current(self) -> Dict[str, Any]:
        """The replica set now (and remembers it as seen)."""
        if self.path is None:
            return {
                "generation": 0,
                "min": 1,
                "max": 1,
                "replicas": [{"index": self.index, "node": "", "host": "127.0.0.1"}],
            }
        self._seen = self._stamp()
        with open(self.path) as f:
            world: Dict[str, Any] = json.load(f)
        return world

    def changed(self) -> bool:
        """Whether the set changed since `current()` was last called."""
        return self.path is not None and self._stamp() != self._seen

    def rank(self, world: Optional[Dict[str, Any]] = None) -> Optional[int]:
        """This replica's position in the set, or None once it has been given back."""
        world = world or self.current()
        indexes = [r["index"] for r in world["replicas"]]
        return indexes.index(self.index) if self.index in indexes else None

    def wait_for_change(
        self, timeout: Optional[float] = None, poll: float = 0.1
    ) -> Optional[Dict[str, Any]]:
        """Blocks until the set changes (or `timeout` seconds pass); returns the new set or None."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.changed():
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(poll)
        return self.current()
