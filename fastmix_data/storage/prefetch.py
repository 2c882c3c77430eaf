"""Plan-driven prefetch: fetch the shards the next blocks need while the current one is served.

The plan knows the future. A source's draws visit its shards in a seeded order per epoch
(:class:`fastmix_data.plan.order.SourceOrder`), whatever the weights: weights only change how fast a
source advances through that order. So after a block whose last draw from source k is ``d``, the
shards source k reads next are exactly those holding draws ``d + 1, d + 2, ...``: :func:`shards_ahead`
lists them, and the stream fetches the current block's shards and ``prefetch`` more per source into
the node-local cache in background threads. Every worker of every rank on the node asks for the same
upcoming shards, and the cache makes that one download per node. Peers prefetch in file order or at
random; this prefetch fetches nothing the plan will not read (unless a weight change drops a source).

The stream makes **one call** per block, :func:`prefetch_block` (see ``MixtureStream._batches``).
Sources that are not remote, or have no ``prefetch`` method, are skipped. Prefetch only warms the
cache: what is served is decided by the plan alone, so it never changes content or order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from fastmix_data.storage.cache import CacheBudgetError, Pin

log = logging.getLogger(__name__)
PREFETCH_THREADS = 4
MAX_PINS = 256  # prefetched entries kept pinned per process before the oldest are released


def shards_ahead(order, last_draw: int, count: int) -> list[int]:
    """The ``count`` shards a source visits after its draw ``last_draw`` (pure).

    Args:
        order: the source's ``SourceOrder`` (``total``, ``sizes``, ``shard_order(epoch)``).
        last_draw: the source's last draw in the current block.
        count: how many shards to list (crossing into later epochs as needed).

    Returns:
        Shard indices in the order they will be read, excluding the shard of ``last_draw``.
    """
    total = int(order.total)
    if count <= 0 or total == 0:
        return []
    epoch, offset = divmod(int(last_draw), total)
    shard_order = order.shard_order(epoch)
    ends = np.cumsum(np.asarray(order.sizes)[shard_order])
    pos = int(np.searchsorted(ends, offset, side="right")) + 1
    out: list[int] = []
    while len(out) < count:
        if pos >= len(shard_order):
            epoch, pos = epoch + 1, 0
            shard_order = order.shard_order(epoch)
            if len(out) >= len(shard_order):  # fewer shards than the distance: all are listed
                break
        shard = int(shard_order[pos])
        if order.sizes[shard] > 0:
            out.append(shard)
        pos += 1
    return list(dict.fromkeys(out))


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

    def submit(self, key: str, job: Callable[[], Pin], after: Sequence[str] = ()) -> None:
        """Run ``job`` (a cache fetch returning its pin) in the background unless ``key`` is already
        pinned or in flight; with ``after``, only once those keys' fetches have ended (the shards the
        current block reads get the bandwidth first). Failures are logged at DEBUG: the stream's own
        read retries and reports."""
        with self._lock:
            if key in self._pending or key in self._pins:
                return
            self._pending.add(key)
            waits = [f for f in (self._futures.get(k) for k in after) if f is not None]
            self._futures[key] = self._pool.submit(self._run, key, job, waits)

    def _run(self, key: str, job: Callable[[], Pin], waits=()) -> None:
        for future in waits:
            with contextlib.suppress(Exception):
                future.result()
        try:
            pin = job()
        except CacheBudgetError as exc:
            log.info("prefetch skipped: %s", exc)
            self.failed += 1
            pin = None
        except Exception as exc:  # the synchronous read will retry and raise a clear error
            log.debug("prefetch of cache entry %s failed: %s", key, exc)
            self.failed += 1
            pin = None
        with self._lock:
            self._pending.discard(key)
            self._futures.pop(key, None)
            if pin is None:
                return
            self.fetched += 1
            self._pins[key] = pin
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


def prefetch_block(sources: Sequence, orders: Sequence, block) -> None:
    """Tell remote sources which shards this block reads and which come next (the stream's hook).

    Args:
        sources: the stream's sources, in plan order; those with a ``prefetch(shards)`` method and
            ``remote`` true take part.
        orders: the plan's per-source ``SourceOrder`` (``MixturePlan.orders``).
        block: the block's ``PlanSlice`` (``source``, ``shard``, ``draw`` arrays).

    Raises:
        CacheBudgetError: the shards this block reads do not fit in the cache budget at once.
    """
    wanted: list[tuple[object, list[int], list[int]]] = []
    for k in np.unique(block.source).tolist():
        source = sources[k]
        if not getattr(source, "remote", False) or not hasattr(source, "prefetch"):
            continue
        mask = block.source == k
        shards = block.shard[mask]
        now = list(dict.fromkeys(shards[np.argsort(block.draw[mask], kind="stable")].tolist()))
        distance = source.storage.prefetch if source.storage is not None else 0
        wanted.append((source, now, shards_ahead(orders[k], int(block.draw[mask].max()), distance)))
    if not wanted:
        return
    _check_block_budget(wanted)
    current = [key for source, now, _ in wanted for key in source.prefetch(now)]
    for source, now, ahead in wanted:  # the next shards start once this block's are in
        source.prefetch([s for s in ahead if s not in now], after=current)


def _check_block_budget(wanted) -> None:
    need = 0
    cache = None
    for source, now, _ in wanted:
        if source.storage is None or source.storage.cache is None:
            continue
        cache = source.storage.cache
        need += sum(source.fetch_bytes(i) for i in now)
    if cache is not None and need > cache.budget():
        raise CacheBudgetError(
            f"cache_limit={cache.budget():,} bytes is smaller than one block: the next block reads "
            f"{need:,} bytes of remote shards ({sum(len(n) for _, n, _ in wanted)} shards); raise "
            "cache_limit to at least that, or lower block_batches"
        )
