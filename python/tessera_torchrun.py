"""torchrun's elastic rendezvous through an elastic Tessera job's replica set.

An elastic job (`replicas: {min: 1, max: 8}`) grows into idle capacity and gives replicas back
when other work needs the room; the agent rewrites the replica-set file
(TESSERA_REPLICA_SET_FILE) on every change. With this rendezvous backend, each replica's
torchrun forms its group from that file instead of negotiating membership itself:

    torchrun --rdzv-backend=tessera train.py      # Tessera sets PET_RDZV_BACKEND=tessera

- A replica's node rank is its position in the set; the group is the set's members.
- When the set's generation changes (a replica joined or was given back), torchrun's monitor sees
  "nodes waiting", stops its workers and forms the group again at the new size, without using up
  a restart: the training script restarts from its last checkpoint (tessera.checkpoint), as with
  any elastic torchrun.
- The set's first member hosts the agents' store on the job's rendezvous port (MASTER_PORT), and
  its workers' store on a port it picks per generation, so no key of an earlier group is seen.

torchrun finds the backend through the `torchrun.handlers` entry point that the
tessera_torchrun dist-info beside this file declares (so it must be on PYTHONPATH, as the
agent's Python helpers are). Standard library and PyTorch only.
"""

import os
import time
from datetime import timedelta

from tessera.elastic import ReplicaSet

# Imported lazily by `create`, so that this module can be read without PyTorch.
_torch = None


def _api():
    global _torch
    if _torch is None:
        import torch.distributed as dist
        from torch.distributed.elastic.rendezvous import api

        _torch = (dist, api)
    return _torch


def membership(world, index):
    """(rank, size, host of rank 0) of replica `index` in the set `world`; rank None when it is
    not a member (it has been given back, or has not been added yet)."""
    indexes = [r["index"] for r in world["replicas"]]
    rank = indexes.index(index) if index in indexes else None
    host = world["replicas"][0]["host"] if world["replicas"] else None
    return rank, len(indexes), host


def create(params):
    """The handler for torchrun's `RendezvousParameters`."""
    dist, api = _api()

    class TesseraRendezvousHandler(api.RendezvousHandler):
        def __init__(self):
            self._set = ReplicaSet()
            self._index = int(os.environ.get("TESSERA_REPLICA", "0"))
            self._port = int(os.environ.get("MASTER_PORT", "29500"))
            self._timeout = timedelta(seconds=float(params.config.get("join_timeout", 600)))
            self._generation = None
            self._latest = None
            self._server = None  # the agents' store, while this replica is the set's first
            self._closed = False

        def get_backend(self):
            return "tessera"

        @property
        def use_agent_store(self):
            return False

        def _current(self):
            """The set once this replica is a member of it."""
            deadline = time.monotonic() + self._timeout.total_seconds()
            while True:
                world = self._set.current()
                rank, size, host = membership(world, self._index)
                if rank is not None:
                    return world, rank, size, host
                if self._closed:
                    raise api.RendezvousClosedError()
                if time.monotonic() >= deadline:
                    raise api.RendezvousTimeoutError(
                        f"replica {self._index} is not in its job's replica set"
                    )
                time.sleep(0.1)

        def next_rendezvous(self):
            world, rank, size, host = self._current()
            self._generation = self._latest = world["generation"]
            if rank == 0 and self._server is None:
                self._server = dist.TCPStore(
                    "0.0.0.0", self._port, is_master=True, timeout=self._timeout,
                    wait_for_workers=False,
                )
            elif rank != 0 and self._server is not None:
                # Another replica hosts it now (perhaps on this host and port).
                self._server = None
            store = self._server or dist.TCPStore(
                host, self._port, is_master=False, timeout=self._timeout
            )
            store = dist.PrefixStore(f"tessera/{self._generation}/", store)
            info = api.RendezvousStoreInfo.build(rank, store, local_addr=host if rank == 0 else None)
            return api.RendezvousInfo(store, rank, size, info)

        def is_closed(self):
            return self._closed

        def set_closed(self):
            self._closed = True

        def num_nodes_waiting(self):
            # Not a count of nodes: any change of the set (one joined or was given back) means
            # the group must form again.
            if self._set.changed():
                self._latest = self._set.current()["generation"]
            return int(self._generation is not None and self._latest != self._generation)

        def get_run_id(self):
            return params.run_id

        def shutdown(self):
            self._server = None
            return True

    return TesseraRendezvousHandler()


def handler():
    """The `torchrun.handlers` entry point: torchrun calls it for the handler's creator."""
    return create
