"""Plan-driven prefetch: fetch what this process's next block reads while the current one is served.

The plan knows the future. With canonical partitions a process serves only its own partitions, and
the plan of its next block (its batches g, g + W, ... after the current block, ``plan_ranges``)
names exactly the shards, and the Parquet row groups of them, that it will read there: the stream
lists them per source (`fastmix_data.stream.batches.block_reads`: ``(shard, row groups or None)``
per shard read, in read order) for the current block and for the next one. One call per block,
:func:`prefetch_block`, then fetches into the node-local cache, in background threads: first the
current block's reads (concurrently, so a cold block is not fetched one shard at a time), then,
once those are in (they get the bandwidth first), the first ``prefetch`` reads per source of the
next block that the current one does not make. A process fetches nothing its own partitions will
not read (unless a weight change alters the next block), and the cache makes what several processes
of a node need (a slice shared by partitions, or P = 1) one download per node.

Sources that are not remote, or have no ``prefetch`` method, are skipped. Prefetch only warms the
cache: what is served is decided by the plan alone, so it never changes content or order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from fastmix_data.storage.cache import CacheBudgetError, Pin

log = logging.getLogger(__name__)
PREFETCH_THREADS = 4
MAX_PINS = 256  # prefetched entries kept pinned per process before the oldest are released


class Prefetcher:
    """Background fetches into the shard cache for one process; the pins they leave are released
    when the stream reads the entry (:meth:`release`) or when more than ``max_pins`` are held.

    Args:
        threads: concurrent fetches.
        max_pins: prefetched entries kept pinned at most.
    """

    def __init__(self, threads: int = PREFETCH_THREADS, max_pins: int = MAX_PINS):
        self.threads = threads
        self.max_pins = max_pins
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastmix-prefetch")
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._futures: dict[str, Future] = {}
        self._pins: OrderedDict[str, Pin] = OrderedDict()
        self.fetched = 0
        self.failed = 0

    def submit(self, keys: Sequence[str], job: Callable[[], Sequence[Pin]], after: Sequence[str] = ()) -> None:
        """Run ``job`` (a cache fetch of the entries ``keys``, returning their pins in that order; one
        read's entries, downloaded together) in the background unless one of ``keys`` is already
        pinned or in flight; with ``after``, only once those keys' fetches have ended (the shards the
        current block reads get the bandwidth first). Failures are logged at DEBUG: the stream's own
        read retries and reports."""
        keys = list(keys)
        with self._lock:
            if not keys or any(k in self._pending or k in self._pins for k in keys):
                return
            self._pending.update(keys)
            waits = list({id(f): f for f in (self._futures.get(k) for k in after) if f is not None}.values())
            future = self._pool.submit(self._run, keys, job, waits)
            for k in keys:
                self._futures[k] = future

    def _run(self, keys: list[str], job: Callable[[], Sequence[Pin]], waits=()) -> None:
        for future in waits:
            with contextlib.suppress(Exception):
                future.result()
        try:
            pins: Sequence[Pin] | None = job()
        except CacheBudgetError as exc:
            log.info("prefetch skipped: %s", exc)
            self.failed += 1
            pins = None
        except Exception as exc:  # the synchronous read will retry and raise a clear error
            log.debug("prefetch of cache entries %s failed: %s", keys, exc)
            self.failed += 1
            pins = None
        with self._lock:
            for k in keys:
                self._pending.discard(k)
                self._futures.pop(k, None)
            if pins is None:
                return
            self.fetched += len(keys)
            for k, pin in zip(keys, pins):
                self._pins[k] = pin
            while len(self._pins) > self.max_pins:
                self._pins.popitem(last=False)[1].close()

    def keep(self, key: str, pin: Pin) -> None:
        """Hold ``pin`` (an entry already in the cache, pinned by the caller) until it is read."""
        with self._lock:
            old = self._pins.pop(key, None)
            self._pins[key] = pin
            extra = [self._pins.popitem(last=False)[1] for _ in range(len(self._pins) - self.max_pins)]
        for p in ([old] if old is not None else []) + extra:
            p.close()

    def holds(self, key: str) -> bool:
        """Whether ``key`` is pinned by, or in flight in, this prefetcher."""
        with self._lock:
            return key in self._pins or key in self._pending

    def release(self, key: str) -> None:
        """Drop the pin of ``key`` (the stream has read it)."""
        with self._lock:
            pin = self._pins.pop(key, None)
        if pin is not None:
            pin.close()

    def release_all(self) -> None:
        with self._lock:
            pins, self._pins = list(self._pins.values()), OrderedDict()
        for pin in pins:
            pin.close()

    def wait(self) -> None:
        """Block until every submitted fetch has finished (tests, benchmarks)."""
        while True:
            with self._lock:
                if not self._pending:
                    return
            threading.Event().wait(0.01)


_STATE: dict[str, object] = {"pid": None, "prefetcher": None}
_STATE_LOCK = threading.Lock()


def prefetcher() -> Prefetcher:
    """This process's prefetcher (a new one in a forked DataLoader worker: threads do not survive
    a fork)."""
    with _STATE_LOCK:
        if _STATE["pid"] != os.getpid():
            _STATE["pid"], _STATE["prefetcher"] = os.getpid(), Prefetcher()
        return _STATE["prefetcher"]  # type: ignore[return-value]


Read = tuple  # (shard index, tuple of row groups or None for the whole shard)


def prefetch_block(
    sources: Sequence,
    now: Mapping[int, Sequence[Read]],
    ahead: Mapping[int, Sequence[Read]] | Callable[[], Mapping[int, Sequence[Read]]],
) -> None:
    """Fetch this block's reads, then the next block's first ones, of every remote source (the
    stream's hook, one call per block).

    Args:
        sources: the stream's sources, in plan order; those with a ``prefetch(reads)`` method and
            ``remote`` true take part.
        now: per source index, the current block's reads ``(shard, row groups or None)`` in read order.
        ahead: the same for this process's next block, or a function returning it (called once this
            block's fetches are under way: planning the next block then no longer delays them); at
            most ``storage.prefetch`` of them per source (those the current block does not make) are
            fetched.

    Raises:
        CacheBudgetError: what this block reads does not fit in the cache budget at once.
    """
    remote = [k for k, source in enumerate(sources)
              if getattr(source, "remote", False) and hasattr(source, "prefetch")]  # fmt: skip
    if not remote:
        return
    current = [(sources[k], list(now.get(k, ()))) for k in remote]
    _check_block_budget(current)
    current_keys = [key for source, reads in current for key in source.prefetch(reads)]
    later = ahead() if callable(ahead) else ahead
    for k in remote:  # the next block's reads start once this block's are in
        source = sources[k]
        distance = source.storage.prefetch if source.storage is not None else 0
        seen = set(now.get(k, ()))
        next_reads = [r for r in later.get(k, ()) if r not in seen][:distance]
        if next_reads:
            source.prefetch(next_reads, after=current_keys)


def _check_block_budget(wanted) -> None:
    need = 0
    cache = None
    for source, reads in wanted:
        if source.storage is None or source.storage.cache is None:
            continue
        cache = source.storage.cache
        need += source.reads_bytes(reads)
    if cache is not None and need > cache.budget():
        raise CacheBudgetError(
            f"cache_limit={cache.budget():,} bytes is smaller than one block: the next block reads "
            f"{need:,} bytes of remote shards ({sum(len(n) for _, n in wanted)} shard reads); raise "
            "cache_limit to at least that, or lower block_batches"
        )
