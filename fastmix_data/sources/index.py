"""The shard index: per-shard identity and stats (rows, tokens, bytes, layout), computed once, cached.

Local shards are keyed on (path, size, ``mtime_ns``) and hashed (sha256) by default; remote shards on
(URL, size, ETag or version id) from the listing, and hashed only with ``verify="sha256"`` (hashing
means downloading every byte). Entries are computed in threads (I/O-bound remote ones with more of
them) and cached in one JSON file per (format, reader configuration, common directory or prefix);
only new or changed shards are recomputed. See docs/sources.md for the file format.

:func:`write_index_file` / :func:`read_index_file` hold a whole source's index in one file at a path
or URL (``fastmix-data index``): a job of a thousand ranks loads it instead of listing the store a
thousand times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastmix_data.engine import Job, TaskOutcome, get_engine
from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.io import sha256_bytes, sha256_file, write_json_atomic
from fastmix_data.sources.reader import ShardReader, ShardStats
from fastmix_data.sources.safety import is_pipe
from fastmix_data.storage import CacheBudgetError, Expected, ObjectInfo, is_url, redact
from fastmix_data.storage.urls import common_dir

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: remote entries (version), Parquet layout; v1 files are ignored and rebuilt
CACHE_ENV = "FASTMIX_DATA_CACHE"
PROGRESS_MIN_SHARDS = 8
REMOTE_WORKERS = 32  # threads for remote entries (I/O-bound)
VERIFY = ("auto", "sha256", "size")


@dataclass(frozen=True)
class IndexEntry:
    """One shard entry: the file's identity and its stats.

    Attributes:
        size: bytes.
        mtime_ns: local files: modification time when indexed; 0 for URLs.
        sha256: hex digest, or ``""`` when not computed (remote shards without ``verify="sha256"``,
            local ones with ``verify="size"``).
        stats: rows, columns, text bytes, ids tokens, Parquet layout.
        version: URLs: the store's version id or ETag (``""`` for local files).
    """

    size: int
    mtime_ns: int
    sha256: str
    stats: ShardStats
    version: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256, **self.stats.to_json()}
        if self.version:
            out["version"] = self.version
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> IndexEntry:
        return cls(
            int(obj["size"]), int(obj["mtime_ns"]), str(obj["sha256"]), ShardStats.from_json(obj),
            str(obj.get("version", "")),
        )


def default_cache_dir() -> Path:
    """``$FASTMIX_DATA_CACHE`` if set, else ``~/.cache/fastmix_data/index``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fastmix_data" / "index"


def cache_path(cache_dir: str | os.PathLike, reader: ShardReader, paths: Sequence[str]) -> Path:
    """The cache file for shards ``paths`` read by ``reader``: keyed by their common directory (or
    URL prefix) and the reader's configuration."""
    located = [p for p in paths if not is_pipe(p)]
    root = common_dir(located) if located else ""
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


def _save_cache(path: Path, reader: ShardReader, entries: dict[str, IndexEntry]) -> None:
    # Merge with what another process may have written meanwhile; drop entries of deleted local files
    # (remote ones are dropped when a listing no longer has them: their file is rewritten then).
    merged = {p: e for p, e in _load_cache(path).items() if is_url(p) or os.path.exists(p)}
    merged.update(entries)
    obj = {
        "version": CACHE_VERSION,
        "format": reader.format,
        "config": reader.config(),
        "shards": {p: merged[p].to_json() for p in sorted(merged)},
    }
    try:
        write_json_atomic(path, obj, sort_keys=True, fsync=False)  # a cache: losing it costs re-indexing
    except OSError as exc:
        log.warning("cannot write shard index cache %s (%s); shards will be re-indexed next time", path, exc)


def _compute_local(reader: ShardReader, path: str, verify: str) -> IndexEntry:
    if is_pipe(path):
        data = reader.fetch(path)  # type: ignore[attr-defined]
        stats = reader.inspect_data(path, data)  # type: ignore[attr-defined]
        return IndexEntry(len(data), 0, sha256_bytes(data), stats)
    st = os.stat(path)
    digest = sha256_file(path) if verify != "size" else ""
    stats = reader.inspect(path)
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise SourceError(f"{path} changed while it was being indexed; retry once writers have finished")
    return IndexEntry(st.st_size, st.st_mtime_ns, digest, stats)


def _compute_remote(reader: ShardReader, url: str, obj: ObjectInfo, verify: str) -> IndexEntry:
    files = reader.files
    files.expected[url] = Expected(obj.size, obj.version)
    digest = ""
    if verify == "sha256":
        digest = sha256_bytes(files.read_bytes(url))  # whole object (through the cache)
        files.expected[url] = Expected(obj.size, obj.version, digest)
    return IndexEntry(obj.size, 0, digest, reader.inspect(url), obj.version)


def _is_fresh(entry: IndexEntry | None, path: str, obj: ObjectInfo | None, verify: str) -> bool:
    if entry is None or is_pipe(path):
        return False
    if verify == "sha256" and not entry.sha256:
        return False
    if is_url(path):
        return obj is not None and (entry.size, entry.version) == (obj.size, obj.version)
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (entry.size, entry.mtime_ns)


def _stat_missing(paths: Sequence[str], objects: dict[str, ObjectInfo], storage, workers: int) -> None:
    """HEAD the remote shards the listing gave no size or version for (in threads)."""
    todo = [p for p in paths if is_url(p) and (p not in objects or objects[p].size <= 0 or not objects[p].version)]
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        for info in pool.map(storage.stat, todo):
            objects[info.url] = info


def build_index(
    paths: Sequence[str],
    reader: ShardReader,
    *,
    source_name: str,
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: str = "raise",
    max_workers: int | None = None,
    objects: Mapping[str, ObjectInfo] | None = None,
    storage=None,
    verify: str = "auto",
    engine: Any = "local",
) -> tuple[dict[str, IndexEntry], list[tuple[str, str]]]:
    """Index entries of ``paths``, from the cache where fresh, computing the rest in threads.

    Args:
        paths: shard paths (absolute), URLs, or allowed ``pipe:`` URLs; pipes are never cached.
        reader: the format reader (its ``files`` reads remote shards).
        source_name: for messages.
        cache_dir: cache directory (default :func:`default_cache_dir`).
        on_corrupt: ``"raise"`` (SourceError naming the first bad shard) or ``"skip"`` (log a
            warning; the shard is left out and reported in the returned skip list).
        max_workers: threads used to compute entries (default: min(8, CPUs) for local shards,
            ``REMOTE_WORKERS`` when any shard is remote).
        objects: URL -> size and version from the listing (missing ones are HEAD-ed).
        storage: the source's :class:`~fastmix_data.storage.Storage` (remote shards only).
        verify: ``"auto"`` (sha256 of local files, identity only for URLs), ``"sha256"`` (hash every
            shard, downloading remote ones whole), ``"size"`` (identity only: size + mtime or version).
        engine: ``"local"`` (threads) or ``"ray"`` (one Ray task per shard to index), or an engine object
            (:mod:`fastmix_data.engine`). The entries are the same whatever the engine.

    Returns:
        (entries by path for readable shards, [(path, reason)] of skipped shards).
    """
    if verify not in VERIFY:
        raise SourceError(f"verify={verify!r} for source {source_name!r}; use one of {', '.join(VERIFY)}")
    remote = any(is_url(p) for p in paths)
    default_workers = REMOTE_WORKERS if remote else min(8, os.cpu_count() or 1)
    objects = dict(objects or {})
    if remote:
        _stat_missing(paths, objects, storage, max_workers or default_workers)
    file = cache_path(cache_dir if cache_dir is not None else default_cache_dir(), reader, paths)
    cached = _load_cache(file)
    entries = {p: cached[p] for p in paths if _is_fresh(cached.get(p), p, objects.get(p), verify)}
    for p, e in entries.items():
        if is_url(p):
            reader.files.expected[p] = Expected(e.size, e.version, e.sha256)
    todo = [p for p in paths if p not in entries]
    failures: dict[str, BaseException] = {}
    if todo:
        failures = _compute_all(
            todo, reader, source_name, objects, verify, max_workers or default_workers, entries, engine
        )
        todo_set = set(todo)
        computed = {p: e for p, e in entries.items() if p in todo_set and not is_pipe(p)}
        if computed:
            _save_cache(file, reader, computed)
    skipped = _report_failures(paths, failures, source_name, on_corrupt)
    return {p: entries[p] for p in paths if p in entries}, skipped


def _compute_all(todo, reader, source_name, objects, verify, workers, entries, engine) -> dict[str, BaseException]:
    """Entries of ``todo`` (into ``entries``) as engine tasks, one per shard; returns the failures."""
    if engine in (None, "local"):
        eng = get_engine("local", max(1, min(workers, len(todo))), threads=True)
    else:
        eng = get_engine(engine)
    context = (reader, {p: objects[p] for p in todo if p in objects}, verify)
    results, stats = eng.run(
        Job(_same, _index_task, context), todo, desc=f"indexing {source_name}",
        progress=len(todo) >= PROGRESS_MIN_SHARDS,
    )  # fmt: skip
    log.info("%s", stats.summary(f"index {source_name!r}"))
    failures: dict[str, BaseException] = {}
    for path, result in zip(todo, results):
        if isinstance(result, IndexEntry):
            entries[path] = result
        else:
            failures[path] = result
    return failures


def _same(context: Any) -> Any:
    return context


def _index_task(context: tuple, path: str) -> TaskOutcome:
    """One shard's entry (an engine task); a corrupt shard's error is the value, not raised."""
    reader, objects, verify = context
    try:
        if is_url(path):
            entry = _compute_remote(reader, path, objects[path], verify)
        else:
            entry = _compute_local(reader, path, verify)
    except (UnsafeInputError, CacheBudgetError, ImportError):  # not the shard's fault: a setting or an install
        raise
    except Exception as exc:  # any failure to decode is a corrupt shard
        return TaskOutcome(exc)
    return TaskOutcome(entry, bytes_read=entry.size if entry.sha256 else 0)


def _report_failures(paths, failures, source_name, on_corrupt) -> list[tuple[str, str]]:
    from fastmix_data.storage import RemoteError

    skipped: list[tuple[str, str]] = []
    for path in paths:
        if path not in failures:
            continue
        exc = failures[path]
        shown = redact(path)
        reason = f"{type(exc).__name__}: {exc}"
        if on_corrupt == "skip":
            log.warning("source %r: skipping unreadable shard %s (%s)", source_name, shown, reason)
            skipped.append((path, reason))
            continue
        if isinstance(exc, RemoteError):
            raise SourceError(f"shard {shown} of source {source_name!r}: {exc}") from exc
        if isinstance(exc, FileNotFoundError):
            raise SourceError(
                f"shard {shown} of source {source_name!r} does not exist; restore it or "
                "remove it from the source"
            ) from exc
        raise SourceError(
            f"shard {shown} of source {source_name!r} is corrupt or unreadable ({reason}); replace or "
            "re-create it, or pass on_corrupt='skip' to leave it out"
        ) from exc
    return skipped


# ----------------------------------------------------------------------------- index files
INDEX_FILE_FORMAT = "fastmix_data/shard-index"
INDEX_FILE_VERSION = 1


def index_document(
    format: str,
    reader: ShardReader,
    entries: Mapping[str, IndexEntry],
    skipped: Sequence[tuple[str, str]],
    spec: Any,
    verify: str,
    mds_locations: Mapping[str, tuple[str, int]] | None = None,
) -> dict[str, Any]:
    """The index-file JSON of a source's entries (see docs/sources.md, "Index files"): shard paths
    relative to ``root``, each with its identity and stats; MDS shards with their dataset root."""
    from fastmix_data.storage.urls import relative_name

    mds_locations = dict(mds_locations or {})
    roots = sorted({r for r, _ in mds_locations.values()})
    root = common_dir([*entries, *(f"{r}/index.json" for r in roots)])
    doc: dict[str, Any] = {
        "format": INDEX_FILE_FORMAT,
        "version": INDEX_FILE_VERSION,
        "source_format": format,
        "root": root,
        "spec": [redact(os.fspath(s)) for s in (spec if isinstance(spec, list | tuple) else [spec])],
        "verify": verify,
        "config": reader.config(),
        "shards": [{"path": relative_name(p, root), **e.to_json()} for p, e in entries.items()],
        "skipped": [[redact(p), r] for p, r in skipped],
    }
    if mds_locations:
        doc["mds"] = {
            relative_name(p, root): [relative_name(f"{r}/index.json", root).rpartition("/")[0] or ".", i]
            for p, (r, i) in mds_locations.items()
            if p in entries
        }
    return doc


def write_index_file(location: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """Write an index document to a local path or URL, atomically (see :mod:`fastmix_data.io`)."""
    write_json_atomic(os.fspath(location), dict(doc), indent=None)


def read_index_file(location: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> dict:
    """Load an index document from a path or URL.

    Raises:
        SourceError: unreadable, not an index file, or an unsupported version.
    """
    from fastmix_data.storage import read_bytes

    location = os.fspath(location)
    try:
        doc = json.loads(read_bytes(location, storage_options))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read index file {redact(location)} ({type(exc).__name__}: {exc}); "
                          "re-create it with `fastmix-data index`") from exc
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FILE_FORMAT:
        raise SourceError(f"{redact(location)} is not a fastmix_data index file; create one with `fastmix-data index`")
    if doc.get("version") != INDEX_FILE_VERSION:
        raise SourceError(f"index file {redact(location)} has version {doc.get('version')!r}; this build reads "
                          f"{INDEX_FILE_VERSION}: re-create it with `fastmix-data index`")
    return doc
