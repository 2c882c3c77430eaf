"""Plan-driven prefetch: fetch what this process reads next, by a byte budget, while it serves.

The plan knows the future. With canonical partitions a process serves only its own partitions, and
the plan of its coming blocks (its batches g, g + W, ... after the current block, ``plan_ranges``)
names exactly the shards, and the Parquet row groups of them, that it will read there: the stream
lists them per source (`fastmix_data.stream.batches.block_reads`: ``(shard, row groups or None)``
per shard read, in read order) for the current block and, lazily, for each coming block. One call
per block, :func:`prefetch_block`, then submits to background threads the current block's reads
that are not on the node and, once those are in (they get the bandwidth first: the first batch
waits for them), all the coming reads at once, in plan order, until their bytes reach the
source's ``prefetch`` budget (``Storage.prefetch_bytes``; at least one read). The coming reads are
in flight together (``PREFETCH_THREADS`` per process) while the current block is served, so a cold
epoch costs about one block's download more than a warm one rather than one round trip per read. A process
fetches nothing its own partitions will not read (unless a weight change alters a coming block),
and the cache makes what several processes of a node need one download per node; an entry another
process is downloading is left to it (the read waits for it), so a prefetch thread never blocks on
another process's download while its own reads wait in the queue.

Sources that are not remote, or have no ``prefetch`` method, are skipped. Prefetch only warms the
cache: what is served is decided by the plan alone, so it never changes content or order.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from fastmix_data.storage.cache import CacheBudgetError, Pin

log = logging.getLogger(__name__)
PREFETCH_THREADS = 8  # concurrent fetch jobs per process (each one read's GETs; they wait on the network)
MAX_PINS = 256  # prefetched entries kept pinned per process before the oldest are released (one fd each)
MAX_BLOCKS_AHEAD = 16  # coming blocks planned for prefetch at most


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
        self._gates = 0  # `after` calls waiting to run
        self._pins: OrderedDict[str, Pin] = OrderedDict()
        self.fetched = 0
        self.failed = 0

    def submit(self, keys: Sequence[str], job: Callable[[], Sequence[Pin | None]]) -> None:
        """Run ``job`` (a cache fetch of the entries ``keys``, returning their pins in that order, None
        for one another process is downloading; one read's entries, downloaded together) in the
        background, after those submitted before, unless one of ``keys`` is already pinned or in
        flight. Failures are logged at DEBUG: the stream's own read retries and reports."""
        keys = list(keys)
        with self._lock:
            if not keys or any(k in self._pending or k in self._pins for k in keys):
                return
            self._pending.update(keys)
            future = self._pool.submit(self._run, keys, job)
            for k in keys:
                self._futures[k] = future

    def after(self, keys: Sequence[str], fn: Callable[[], None]) -> None:
        """Call ``fn`` once the fetches of ``keys`` now in flight have ended: at once when none is,
        else in a background thread (the current block's downloads get the bandwidth first)."""
        with self._lock:
            waits = list({id(f): f for f in (self._futures.get(k) for k in keys) if f is not None}.values())
        if not waits:
            fn()
            return

        def run() -> None:
            try:
                for future in waits:
                    future.exception()  # waits; a failure is the stream's read's to report
                fn()
            except Exception as exc:  # the stream's reads fetch what is missing, and report
                log.debug("prefetch of coming reads failed: %s", exc)
            finally:
                with self._lock:
                    self._gates -= 1

        with self._lock:
            self._gates += 1
        self._pool.submit(run)

    def _run(self, keys: list[str], job: Callable[[], Sequence[Pin | None]]) -> None:
        try:
            pins: Sequence[Pin | None] | None = job()
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
            for k, pin in zip(keys, pins):
                if pin is not None:
                    self.fetched += 1
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

    def pinned(self) -> int:
        """Entries pinned now."""
        with self._lock:
            return len(self._pins)

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
                if not self._pending and not self._gates:
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
    ahead: Iterable[Mapping[int, Sequence[Read]]] | Callable[[], Iterable[Mapping[int, Sequence[Read]]]],
) -> None:
    """Fetch this block's reads, then the coming ones up to each source's byte budget, of every
    remote source (the stream's hook, one call per block).

    Args:
        sources: the stream's sources, in plan order; those with a ``prefetch(reads)`` method and
            ``remote`` true take part.
        now: per source index, the current block's reads ``(shard, row groups or None)`` in read order.
        ahead: the same for this process's coming blocks, in order (an iterable, consumed lazily and
            only as far as the budgets need, or a function returning one, called once this block's
            fetches are submitted); per source, the reads the current block does not make are
            fetched, once this block's fetches have ended, until their bytes reach
            ``storage.prefetch_bytes()`` (at least one read).

    Raises:
        CacheBudgetError: what this block reads does not fit in the cache budget at once.
    """
    remote = [k for k, source in enumerate(sources)
              if getattr(source, "remote", False) and hasattr(source, "prefetch")]  # fmt: skip
    if not remote:
        return
    current = [(sources[k], list(now.get(k, ()))) for k in remote]
    _check_block_budget(current)
    current_keys = [key for source, reads in current for key in source.prefetch(reads, pin_hits=False)]
    coming = _coming_reads(sources, remote, now, ahead)
    if coming:
        prefetcher().after(current_keys, lambda: [sources[k].prefetch(reads) for k, reads in coming])


def _coming_reads(sources, remote: list[int], now, ahead) -> list[tuple[int, list[Read]]]:
    """Per remote source, the coming reads (not in ``now``) up to its byte budget, in plan order."""
    budget = {k: sources[k].storage.prefetch_bytes() if sources[k].storage is not None else 0 for k in remote}
    taken = {k: 0 for k in remote}
    seen = {k: set(now.get(k, ())) for k in remote}
    picked: dict[int, list[Read]] = {k: [] for k in remote}
    open_ = [k for k in remote if budget[k] > 0]
    blocks = (ahead() if callable(ahead) else ahead) if open_ else ()
    for n, later in enumerate(blocks):
        for k in list(open_):
            for read in later.get(k, ()):
                if read in seen[k] or taken[k] >= budget[k]:
                    continue
                seen[k].add(read)
                picked[k].append(read)
                taken[k] += sources[k].reads_bytes([read])
            if taken[k] >= budget[k]:
                open_.remove(k)
        if not open_ or n + 1 >= MAX_BLOCKS_AHEAD or prefetcher().pinned() >= prefetcher().max_pins // 2:
            break
    return [(k, reads) for k, reads in picked.items() if reads]


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
