"""The node-local shard cache: one download per node, a byte budget, and pins that eviction respects.

Layout under ``<cache_dir>`` (default ``$FASTMIX_DATA_CACHE/shards``, else
``~/.cache/fastmix_data/shards``)::

    blobs/<key>        a finished entry: the bytes of one object, or of a list of its byte ranges
                       concatenated (Parquet column chunks); key = sha256 of (URL, size, version,
                       ranges), so a changed object never hits an old entry
    partial/<key>.lock the download claim of an entry (flock'ed by its downloader)
    partial/<key>.<pid>.<thread>.tmp   the bytes being downloaded
    .lock              taken (flock) only around publishing: make room, then rename partial -> blob

Protocol, shared by every process on the node (DataLoader workers, ranks, other jobs):

1. **Hit**: open ``blobs/<key>``, take a *shared* flock on it (the pin), bump its mtime (LRU).
2. **Miss**: open/create ``partial/<key>.lock`` and take an *exclusive* flock. A process that finds
   the flock taken waits for it: someone else is downloading that very entry, so there is one
   download per node. With the flock, look again for the blob (another process may have just
   published it), else download into a temporary file of its own, with no other lock.
3. **Publish**: take ``.lock``, evict least-recently-used *unpinned* blobs (an exclusive
   non-blocking flock on a blob succeeds only when nobody pins it) until the new entry fits in
   ``limit`` bytes, ``os.replace`` the temporary file onto ``blobs/<key>`` (atomic), release.
4. **Pins**: a reader holds its shared flock while it reads; the prefetcher holds the pins of the
   entries it fetched ahead until the stream reads them. Eviction never removes a pinned blob, so a
   shard that a block still needs stays. If even after evicting everything unpinned the entry does
   not fit, :class:`CacheBudgetError` says how many bytes are pinned, needed and allowed.

A process that dies mid-download releases its flock; the next one to want the entry starts over.
Stale partial files are harmless (rewritten on the next miss).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastmix_data.errors import SourceError

log = logging.getLogger(__name__)

CACHE_ENV = "FASTMIX_DATA_CACHE"
DEFAULT_FREE_FRACTION = 0.8  # default limit: this share of the free space when the cache opens
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?i?b?)\s*$", re.I)
_BYTES = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


class CacheBudgetError(SourceError):
    """The shard cache's byte budget cannot hold what must be on disk at once."""


def parse_size(size: str | int) -> int:
    """``"256MB"`` -> 256_000_000, ``"1GiB"`` -> 2**30, an int -> bytes.

    Raises:
        ValueError: unparsable, zero or negative.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match or match.group(2).lower() not in _BYTES:
            raise ValueError(f"cannot parse size {size!r}; use e.g. '256MB', '1GiB' or a number of bytes")
        value = int(float(match.group(1)) * _BYTES[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


def default_shard_cache_dir() -> Path:
    """``$FASTMIX_DATA_CACHE/shards`` if the variable is set, else ``~/.cache/fastmix_data/shards``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) / "shards" if env else Path.home() / ".cache" / "fastmix_data" / "shards"


def entry_key(url: str, size: int, version: str, ranges: Sequence[tuple[int, int]] | None) -> str:
    """The cache key of an object's bytes (``ranges`` None: the whole object)."""
    body = json.dumps([url, int(size), version, [list(r) for r in ranges] if ranges is not None else None])
    return hashlib.sha256(body.encode()).hexdigest()[:40]


@dataclass
class Pin:
    """A pinned cache entry: its local path, size, and the open descriptor holding the shared flock.
    Release it (``close``) once the bytes are read; the entry may then be evicted."""

    key: str
    path: str
    size: int
    fd: int

    def read(self) -> bytes:
        """The entry's bytes."""
        return os.pread(self.fd, self.size, 0)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardCache:
    """A node-local cache of remote object bytes with a byte budget (see the module docstring).

    Args:
        directory: the cache directory (created on first use).
        limit: byte budget for finished entries (int or ``"20GB"``); default: 80 % of the free space
            of the directory's filesystem when the cache is first used.

    Picklable (only the directory and the limit travel); counters are per process.
    """

    def __init__(self, directory: str | os.PathLike | None = None, limit: int | str | None = None):
        self.directory = Path(directory) if directory is not None else default_shard_cache_dir()
        self.limit = parse_size(limit) if limit is not None else None
        self.downloaded_bytes = 0  # bytes this process fetched from the store into the cache
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ paths
    def _dirs(self) -> tuple[Path, Path]:
        blobs, partial = self.directory / "blobs", self.directory / "partial"
        blobs.mkdir(parents=True, exist_ok=True)
        partial.mkdir(parents=True, exist_ok=True)
        return blobs, partial

    def budget(self) -> int:
        """The byte budget (resolving the default on first use)."""
        if self.limit is None:
            self._dirs()
            st = os.statvfs(self.directory)
            self.limit = int((st.f_bavail * st.f_frsize + self.bytes_on_disk()) * DEFAULT_FREE_FRACTION)
        return self.limit

    def bytes_on_disk(self) -> int:
        """Bytes of finished entries."""
        blobs = self.directory / "blobs"
        if not blobs.is_dir():
            return 0
        total = 0
        for entry in os.scandir(blobs):
            with contextlib.suppress(OSError):
                total += entry.stat().st_size
        return total

    # ------------------------------------------------------------------ get
    def pin(self, key: str) -> Pin | None:
        """The entry ``key`` pinned, or None when it is not in the cache."""
        path = os.path.join(self.directory, "blobs", key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        size = os.fstat(fd).st_size
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU order
        return Pin(key, path, size, fd)

    def get(self, key: str, size: int, fill: Callable[[str], None]) -> Pin:
        """Entry ``key`` pinned, downloading it with ``fill(partial_path)`` when it is missing.

        Args:
            key: from :func:`entry_key`.
            size: the entry's expected bytes (checked after ``fill``; used to make room).
            fill: writes the bytes to the given local path (raises on failure; retried by the caller).

        Raises:
            CacheBudgetError: ``size`` does not fit in the budget beside the pinned entries.
            SourceError: ``fill`` wrote a different number of bytes.
        """
        hit = self.pin(key)
        if hit is not None:
            self.hits += 1
            return hit
        self._check_fits(size, self.budget())
        _, partial = self._dirs()
        claim = str(partial / f"{key}.lock")
        fd = os.open(claim, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process downloads this entry
            hit = self.pin(key)
            if hit is not None:
                self.hits += 1
                return hit
            self._download(key, size, fill)
        finally:
            os.close(fd)
        return self._pin_published(key)

    def has(self, key: str) -> bool:
        """Whether entry ``key`` is in the cache now (unpinned: it may be evicted later)."""
        return os.path.exists(os.path.join(self.directory, "blobs", key))

    def get_many(
        self, entries: Sequence[tuple[str, int]], fill: Callable[[list[int]], list[bytes]], wait: bool = True
    ) -> list[Pin | None]:
        """Entries ``[(key, size)]`` pinned, the missing ones downloaded together.

        The missing entries that no other process is downloading are claimed (a non-blocking
        exclusive flock each) and filled by one call ``fill(indices) -> bytes per index`` (one
        round of requests for all of them); the others are waited for as in :meth:`get` (their
        downloader's claim), so there is still one download per entry and node. With ``wait``
        False they are not waited for: None in their place (prefetch: the read will wait).

        Raises:
            CacheBudgetError, SourceError: as :meth:`get`.
        """
        pins: list[Pin | None] = [self.pin(key) for key, _ in entries]
        self.hits += sum(p is not None for p in pins)
        try:
            missing = [i for i, p in enumerate(pins) if p is None]
            self._fill_claimed(entries, missing, pins, fill)
            for i in missing if wait else ():
                if pins[i] is None:  # another process's download (or a failed one: then ours)
                    key, size = entries[i]
                    pins[i] = self.get(key, size, lambda part, i=i: _write(part, fill([i])[0]))
        except BaseException:
            for pin in pins:
                if pin is not None:
                    pin.close()
            raise
        return pins  # type: ignore[return-value]

    def _fill_claimed(self, entries, missing: list[int], pins: list, fill) -> None:
        """Claim what of ``missing`` nobody else downloads, fill it in one call, publish and pin it."""
        if not missing:
            return
        budget = self.budget()
        for i in missing:
            self._check_fits(entries[i][1], budget)
        _, partial = self._dirs()
        claims: dict[int, int] = {}
        try:
            for i in missing:
                fd = os.open(str(partial / f"{entries[i][0]}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)  # another process downloads it: waited for by the caller
                    continue
                claims[i] = fd
                pins[i] = self.pin(entries[i][0])  # published just before our claim?
                self.hits += pins[i] is not None
            mine = [i for i in claims if pins[i] is None]
            if mine:
                for i, data in zip(mine, fill(mine)):
                    key, size = entries[i]
                    self._download(key, size, lambda part, data=data: _write(part, data))
                    pins[i] = self._pin_published(key)
        finally:
            for fd in claims.values():
                os.close(fd)

    def _download(self, key: str, size: int, fill: Callable[[str], None]) -> None:
        """With the entry's claim held: ``fill`` a temporary file of this thread, check its size,
        publish it as ``blobs/<key>`` and drop the claim file (later arrivals make a new one and find
        the blob). The temporary file is removed whatever happens."""
        self.misses += 1
        blobs, partial = self._dirs()
        part = str(partial / f"{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            fill(part)
            self._publish_checked(part, str(blobs / key), key, size)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(part)
        with contextlib.suppress(OSError):
            os.unlink(partial / f"{key}.lock")

    def _check_fits(self, size: int, budget: int) -> None:
        if size > budget:
            raise CacheBudgetError(
                f"a shard of {size:,} bytes does not fit in the shard cache's budget of {budget:,} bytes "
                f"({self.directory}); raise cache_limit to at least one block's shards"
            )

    def _publish_checked(self, part: str, blob: str, key: str, size: int) -> None:
        got = os.stat(part).st_size
        if got != size:
            raise SourceError(f"downloaded {got:,} bytes for cache entry {key} but expected {size:,}")
        self._publish(part, blob, size)
        self.downloaded_bytes += got

    def _pin_published(self, key: str) -> Pin:
        hit = self.pin(key)
        if hit is None:  # evicted between publish and pin: only by a budget far below one shard
            raise CacheBudgetError(f"cache entry {key} was evicted as soon as it was published; raise cache_limit")
        return hit

    # ------------------------------------------------------------------ publish / evict
    def _publish(self, part: str, blob: str, size: int) -> None:
        lock = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._make_room(size)
            os.replace(part, blob)
        finally:
            os.close(lock)

    def _make_room(self, size: int) -> None:
        budget = self.budget()
        entries = []
        for entry in os.scandir(self.directory / "blobs"):
            with contextlib.suppress(OSError):
                st = entry.stat()
                entries.append((st.st_mtime_ns, entry.path, st.st_size))
        used = sum(e[2] for e in entries)
        pinned = 0
        for _, path, bytes_ in sorted(entries):
            if used + size <= budget:
                return
            if self._evict(path):
                used -= bytes_
                log.debug("shard cache: evicted %s (%d bytes)", os.path.basename(path), bytes_)
            else:
                pinned += bytes_
        if used + size > budget:
            raise CacheBudgetError(
                f"the shard cache ({self.directory}) cannot take {size:,} more bytes: its budget is "
                f"{budget:,} bytes and {pinned:,} bytes are pinned by shards that blocks still need; "
                "raise cache_limit (it must hold at least the shards of one block of every process on "
                "this node), lower prefetch, or lower block_batches"
            )

    @staticmethod
    def _evict(path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False  # pinned
            raise
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
        return True

    def clear(self) -> None:
        """Remove every unpinned entry."""
        blobs = self.directory / "blobs"
        if blobs.is_dir():
            for entry in os.scandir(blobs):
                self._evict(entry.path)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
