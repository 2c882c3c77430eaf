"""The shard index: per-shard rows, tokens, bytes and sha256, computed once and cached as JSON.

Computing an entry reads the whole shard twice (a sha256 pass and a decoding pass that also
validates it), so entries are cached. One cache file holds the entries of every shard under one
directory read with one reader configuration; an entry is reused while the shard's size and
``mtime_ns`` are unchanged, and only changed or new shards are recomputed. See docs/sources.md for
the file format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.leftovers import sweep_temp_files, temp_prefix
from fastmix_data.sources.reader import ShardReader, ShardStats
from fastmix_data.sources.safety import is_pipe

log = logging.getLogger(__name__)

CACHE_VERSION = 1
CACHE_ENV = "FASTMIX_DATA_CACHE"
PROGRESS_MIN_SHARDS = 8
_CHUNK = 1 << 22


@dataclass(frozen=True)
class IndexEntry:
    """One cached shard entry: the file's identity (size, mtime_ns, sha256) and its stats."""

    size: int
    mtime_ns: int
    sha256: str
    stats: ShardStats

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256, **self.stats.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> IndexEntry:
        return cls(int(obj["size"]), int(obj["mtime_ns"]), str(obj["sha256"]), ShardStats.from_json(obj))


def default_cache_dir() -> Path:
    """``$FASTMIX_DATA_CACHE`` if set, else ``~/.cache/fastmix_data/index``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fastmix_data" / "index"


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(cache_dir: str | os.PathLike, reader: ShardReader, paths: Sequence[str]) -> Path:
    """The cache file for shards ``paths`` read by ``reader``: keyed by their common directory and
    the reader's configuration."""
    local = [p for p in paths if not is_pipe(p)]
    root = os.path.commonpath([os.path.dirname(p) for p in local]) if local else ""
    key = json.dumps(
        {"v": CACHE_VERSION, "format": reader.format, "config": reader.config(), "root": root}, sort_keys=True
    )
    return Path(cache_dir) / f"{reader.format}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _load_cache(path: Path) -> dict[str, IndexEntry]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        if obj.get("version") != CACHE_VERSION:
            return {}
        return {p: IndexEntry.from_json(e) for p, e in obj["shards"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable shard index cache %s (%s); it will be rebuilt", path, exc)
        return {}


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(path.parent)  # what killed writers left here
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_cache(path: Path, reader: ShardReader, entries: dict[str, IndexEntry]) -> None:
    # Merge with what another process may have written meanwhile; drop entries of deleted files.
    merged = {p: e for p, e in _load_cache(path).items() if os.path.exists(p)}
    merged.update(entries)
    obj = {
        "version": CACHE_VERSION,
        "format": reader.format,
        "config": reader.config(),
        "shards": {p: merged[p].to_json() for p in sorted(merged)},
    }
    try:
        write_json_atomic(path, obj)
    except OSError as exc:
        log.warning("cannot write shard index cache %s (%s); shards will be re-indexed next time", path, exc)


def _compute(reader: ShardReader, path: str) -> IndexEntry:
    if is_pipe(path):
        data = reader.fetch(path)  # type: ignore[attr-defined]
        stats = reader.inspect_data(path, data)  # type: ignore[attr-defined]
        return IndexEntry(len(data), 0, hashlib.sha256(data).hexdigest(), stats)
    st = os.stat(path)
    digest = sha256_file(path)
    stats = reader.inspect(path)
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise SourceError(f"{path} changed while it was being indexed; retry once writers have finished")
    return IndexEntry(st.st_size, st.st_mtime_ns, digest, stats)


def _is_fresh(entry: IndexEntry | None, path: str) -> bool:
    if entry is None or is_pipe(path):
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns)


def build_index(
    paths: Sequence[str],
    reader: ShardReader,
    *,
    source_name: str,
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: str = "raise",
    max_workers: int | None = None,
) -> tuple[dict[str, IndexEntry], list[tuple[str, str]]]:
    """Index entries of ``paths``, from the cache where fresh, computing the rest in threads.

    Args:
        paths: shard paths (absolute) or allowed ``pipe:`` URLs; pipes are never cached.
        reader: the format reader.
        source_name: for messages.
        cache_dir: cache directory (default :func:`default_cache_dir`).
        on_corrupt: ``"raise"`` (SourceError naming the first bad shard) or ``"skip"`` (log a
            warning; the shard is left out and reported in the returned skip list).
        max_workers: threads used to compute entries (default: min(8, CPUs)).

    Returns:
        (entries by path for readable shards, [(path, reason)] of skipped shards).
    """
    file = cache_path(cache_dir if cache_dir is not None else default_cache_dir(), reader, paths)
    cached = _load_cache(file)
    entries = {p: cached[p] for p in paths if _is_fresh(cached.get(p), p)}
    todo = [p for p in paths if p not in entries]
    failures: dict[str, BaseException] = {}
    if todo:
        workers = max(1, min(max_workers or min(8, os.cpu_count() or 1), len(todo)))
        bar = tqdm(
            total=len(todo),
            desc=f"indexing {source_name}",
            unit="shard",
            disable=len(todo) < PROGRESS_MIN_SHARDS,
            leave=False,
        )

        def run(path: str) -> tuple[str, IndexEntry | BaseException]:
            try:
                return path, _compute(reader, path)
            except (UnsafeInputError, ImportError):  # not the shard's fault: a setting or a broken install
                raise
            except Exception as exc:  # any failure to decode is a corrupt shard
                return path, exc
            finally:
                bar.update(1)

        with bar, ThreadPoolExecutor(max_workers=workers) as pool:
            for path, result in pool.map(run, todo):
                if isinstance(result, IndexEntry):
                    entries[path] = result
                else:
                    failures[path] = result
        todo_set = set(todo)
        computed = {p: e for p, e in entries.items() if p in todo_set and not is_pipe(p)}
        if computed:
            _save_cache(file, reader, computed)
    skipped: list[tuple[str, str]] = []
    for path in paths:
        if path not in failures:
            continue
        exc = failures[path]
        reason = f"{type(exc).__name__}: {exc}"
        if on_corrupt == "skip":
            log.warning("source %r: skipping unreadable shard %s (%s)", source_name, path, reason)
            skipped.append((path, reason))
            continue
        if isinstance(exc, FileNotFoundError):
            raise SourceError(
                f"shard {path} of source {source_name!r} does not exist; restore it or "
                "remove it from the source"
            ) from exc
        raise SourceError(
            f"shard {path} of source {source_name!r} is corrupt or unreadable ({reason}); replace or "
            "re-create it, or pass on_corrupt='skip' to leave it out"
        ) from exc
    return {p: entries[p] for p in paths if p in entries}, skipped
