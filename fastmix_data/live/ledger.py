"""The job-wide ledger of a following stream: where each followed change applies, decided once.

Design problem: a change published beside the job must apply at one global batch E on every rank,
and no rank may have served batch E under the old weights. Pausing every worker of
every rank for each change (the `set_weights` protocol) would need every rank to answer at once.

Solution: *grants*. No rank may serve a batch at or past the job's grant G without asking the
ledger, which raises G to ``need + lookahead`` (one compare-and-set on the store, every few
batches per rank). A change is decided at E = max(G, last change + 1) in the same compare-and-set
cell, so it lies past every batch any rank may have served; a rank learns it the next time it asks
for batches, which it must do before serving E. The decision is recorded, so it is the same on
every rank and in every checkpoint.

Store layout under ``<namespace>/s<session>/`` (JSON values)::

    base      {"history": [...], "next_batch": 1200, "fingerprint": "9c1e…"}   merged by every rank
    joined    count of ranks that wrote ``base`` (store.add)
    sched     {"grant": 1216, "n": 3, "tail": {...change 2...}}
    change/i  change i, for i < n - 1 (written by the next decider before it replaces ``tail``)

A rank's history is ``base.history + change/0 … change/n-1``. ``base`` starts as the longest of
the ranks' histories (after a resume they may differ in changes that no rank had reached; the
shorter must be a prefix of the longer, wall-clock ``time`` stamps aside), and nothing is granted before every rank has joined.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

from fastmix_data.errors import CoordinationError

#: (new history version, effective batch, current history) -> the new entry, or None for no change
MakeEntry = Callable[[int, int, list], "dict | None"]


def merge_bases(a: dict, b: dict) -> dict:
    """The merged ``base`` of two ranks (see the module docstring).

    Raises:
        CoordinationError: different streams, or histories where neither extends the other.
    """
    if a["fingerprint"] != b["fingerprint"]:
        raise CoordinationError(
            "the ranks of this job built different streams (their fingerprints differ: sources, seed, batch "
            "layout...); every rank must construct the same MixtureStream, in the same order"
        )
    short, long_ = sorted((a["history"], b["history"]), key=len)
    if any(_strip_time(x) != _strip_time(y) for x, y in zip(short, long_)):
        raise CoordinationError(
            "the ranks resumed from weight histories that disagree before their last common change; load every "
            "rank from states saved at the same checkpoint"
        )
    return {"history": long_, "next_batch": max(a["next_batch"], b["next_batch"]), "fingerprint": a["fingerprint"]}


def _strip_time(entry: dict) -> dict:
    """An entry without its wall-clock ``time`` (each rank stamps the entries it made itself)."""
    return {k: v for k, v in entry.items() if k != "time"}


class LocalLedger:
    """The ledger of a one-rank job: kept in the training process."""

    def __init__(self, lookahead: int):
        self.lookahead = lookahead
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self._history: list | None = None
        self._grant = 0

    def join(self, history: list, next_batch: int, fingerprint: str) -> None:
        with self._lock:
            self._history, self._grant = [dict(h) for h in history], next_batch

    def ready(self) -> bool:
        return self._history is not None

    def extend(self, need: int) -> tuple[int, list]:
        with self._lock:
            self._grant = max(self._grant, need + self.lookahead)
            return self._grant, list(self._history)

    def decide(self, make: MakeEntry) -> tuple[dict | None, int, list]:
        with self._lock:
            last = self._history[-1]
            entry = make(last["version"] + 1, max(self._grant, last["batch"] + 1), list(self._history))
            if entry is not None:
                self._history.append(json.loads(json.dumps(entry)))
            return entry, self._grant, list(self._history)


class StoreLedger:
    """The ledger of a multi-rank job, in the job's c10d store (see the module docstring).

    Args:
        store: this process's connection (``fastmix_data.stream.distributed.job_store``).
        namespace: the stream's namespace; each `reset` starts a new session below it.
        world: number of ranks.
        lookahead: batches a grant reaches past the batch asked for.
    """

    def __init__(self, store: Any, namespace: str, world: int, lookahead: int):
        self.store, self.namespace, self.world, self.lookahead = store, namespace, world, lookahead
        self._lock = threading.Lock()
        self._session = -1
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._session += 1
            self._base: dict | None = None
            self._changes: list[dict] = []

    def _key(self, name: str) -> str:
        return f"{self.namespace}/s{self._session}/{name}"

    def _get(self, name: str) -> bytes:
        return self.store.get(self._key(name)) if self.store.check([self._key(name)]) else b""

    def join(self, history: list, next_batch: int, fingerprint: str) -> None:
        """Merge this rank's history into ``base`` and count the rank in."""
        mine = {"history": history, "next_batch": int(next_batch), "fingerprint": fingerprint}
        with self._lock:
            while True:
                cur = self._get("base")
                raw = json.dumps(merge_bases(json.loads(cur), mine) if cur else mine).encode()
                if raw == cur or self.store.compare_set(self._key("base"), cur, raw) == raw:
                    break
            self.store.add(self._key("joined"), 1)

    def ready(self) -> bool:
        """Every rank has joined (then ``base`` is final)."""
        with self._lock:
            if self._base is None:
                if int(self.store.add(self._key("joined"), 0)) < self.world:
                    return False
                self._base = json.loads(self._get("base"))
            return True

    def _sched(self) -> tuple[bytes, dict]:
        raw = self._get("sched")
        if not raw:
            init = json.dumps({"grant": self._base["next_batch"], "n": 0, "tail": None}).encode()
            raw = self.store.compare_set(self._key("sched"), b"", init)
        return raw, json.loads(raw)

    def _pull(self, sched: dict) -> list:
        """The full history as of ``sched`` (fetching the changes this process has not seen)."""
        known, n = len(self._changes), sched["n"]
        if n > known:
            keys = [self._key(f"change/{i}") for i in range(known, n - 1)]
            self._changes += [json.loads(v) for v in (self.store.multi_get(keys) if keys else [])]
            self._changes.append(sched["tail"])
        return self._base["history"] + self._changes

    def extend(self, need: int) -> tuple[int, list]:
        """A grant past ``need`` and the history as of that grant."""
        with self._lock:
            while True:
                raw, sched = self._sched()
                history = self._pull(sched)
                if sched["grant"] > need:
                    return sched["grant"], history
                new = json.dumps(dict(sched, grant=need + self.lookahead)).encode()
                if self.store.compare_set(self._key("sched"), raw, new) == new:
                    return need + self.lookahead, history

    def decide(self, make: MakeEntry) -> tuple[dict | None, int, list]:
        """Append the change ``make(version, E, history)`` at E = max(grant, last change + 1) (no
        change when it returns None); return it, the grant and the new history."""
        with self._lock:
            while True:
                raw, sched = self._sched()
                history = self._pull(sched)
                last = history[-1]
                entry = make(last["version"] + 1, max(sched["grant"], last["batch"] + 1), history)
                if entry is None:
                    return None, sched["grant"], history
                entry = json.loads(json.dumps(entry))
                if sched["tail"] is not None:  # keep "change/0 … change/n-2 exist" true for n + 1
                    self.store.set(self._key(f"change/{sched['n'] - 1}"), json.dumps(sched["tail"]))
                new = json.dumps({"grant": sched["grant"], "n": sched["n"] + 1, "tail": entry}).encode()
                if self.store.compare_set(self._key("sched"), raw, new) == new:
                    self._changes.append(entry)
                    return entry, sched["grant"], history + [entry]
