"""Rank, world size and DataLoader worker identity, and how ranks agree without the training's group.

Design problem: a GPU job's default process group is usually NCCL, which carries only CUDA tensors,
so a CPU ``all_reduce`` on it fails ("No backend type associated with device type cpu"); a job may
also stream before ``init_process_group`` or never call it (torchrun without a group). The stream's
own agreement (where a weight change applies, whose weights win) must not depend on that group.

Solution: the c10d *store* every torchrun job already has: the default group's store when a group
is initialised (cloned, so this module's traffic has its own connection), else torchrun's agent
store (``MASTER_ADDR``/``MASTER_PORT`` with ``TORCHELASTIC_USE_AGENT_STORE``). One agreement is one
gather to rank 0 and one published result: each rank ``set``s its payload (JSON), rank 0 waits for
all of them, reduces, ``set``s the result, every rank reads it. No tensors, no collective to create
beforehand (a gloo side group would need every rank to call ``new_group`` at the same point), works
with NCCL, gloo or no default group. benchmarks/results/coordination.md measures it against a gloo
side group.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from fastmix_data.errors import CoordinationError

log = logging.getLogger(__name__)

STORE_PREFIX = "fastmix_data"
STORE_TIMEOUT_S = 600.0  # how long a rank waits for the others at one agreement (they may be slow to start)
_instances = itertools.count()  # multi-rank streams made in this process (same order on every rank)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_and_count() -> tuple[int, int]:
    """(DataLoader worker id, number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1
    return info.id, info.num_workers


def job_store(timeout_s: float = STORE_TIMEOUT_S) -> torch.distributed.Store | None:
    """A connection of this process to the job's c10d store, or None when there is none.

    The default process group's store when a group is initialised (whatever its backend), else
    torchrun's agent store; each call opens a new connection (``clone``), so callers in different
    threads do not share one."""
    dist = torch.distributed
    if not dist.is_available():
        return None
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        store = dist.distributed_c10d._get_default_store().clone()
        store.set_timeout(timeout)
        return dist.PrefixStore(STORE_PREFIX, store)
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timeout)
        attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")  # the agent's store outlives a restart
        return dist.PrefixStore(f"{STORE_PREFIX}/attempt_{attempt}", store)
    return None


def require_store(rank: int, world: int, what: str) -> torch.distributed.Store:
    """`job_store`, or a `CoordinationError` that says how to provide one."""
    store = job_store()
    if store is None:
        raise CoordinationError(
            f"{what} on rank {rank} of {world} needs to reach the other ranks, and this process has neither an "
            "initialised torch.distributed process group (any backend) nor torchrun's store "
            "(MASTER_ADDR/MASTER_PORT with TORCHELASTIC_USE_AGENT_STORE=True). Start the job with torchrun, or "
            "call torch.distributed.init_process_group before iterating the stream."
        )
    return store


def stream_namespace() -> str:
    """A store namespace for one multi-rank stream: the n-th such stream made in this process.

    Every rank makes the same streams in the same order, so the n-th stream of every rank shares it."""
    return f"stream{next(_instances)}"


class Coordinator:
    """Agreement among the ranks of one stream through the job's store (see the module docstring).

    Args:
        rank, world: this rank and the number of ranks.
        namespace: store key prefix shared by this stream's instances on every rank.
    """

    def __init__(self, rank: int, world: int, namespace: str):
        self.rank, self.world, self.namespace = rank, world, namespace
        self._store: torch.distributed.Store | None = None
        self._seq = 0
        self._lock = threading.Lock()

    def store(self) -> torch.distributed.Store:
        if self._store is None:
            self._store = require_store(self.rank, self.world, "agreeing on a weight change")
        return self._store

    def reduce(self, payload: Any, combine: Callable[[list[Any]], Any]) -> Any:
        """``combine`` (run on rank 0) of every rank's JSON ``payload``, returned on every rank.

        A collective: every rank calls it the same number of times, in the same order."""
        if self.world == 1:
            return combine([payload])
        with self._lock:
            store, seq = self.store(), self._seq
            self._seq += 1
            key = f"{self.namespace}/agree/{seq}"
            store.set(f"{key}/{self.rank}", json.dumps(payload))
            if self.rank == 0:
                keys = [f"{key}/{r}" for r in range(self.world)]
                store.wait(keys)
                result = combine([json.loads(v) for v in store.multi_get(keys)])
                store.set(f"{key}/result", json.dumps(result))
                _delete(store, keys + ([f"{self.namespace}/agree/{seq - 1}/result"] if seq else []))
                return result
            store.wait([f"{key}/result"])
            return json.loads(store.get(f"{key}/result"))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None  # a connection is per process
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _delete(store: torch.distributed.Store, keys: list[str]) -> None:
    """Remove agreement keys that no rank will read again (a store that cannot delete keeps them)."""
    for key in keys:
        try:
            store.delete_key(key)
        except RuntimeError:
            return
