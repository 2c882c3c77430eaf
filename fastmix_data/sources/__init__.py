"""Sharded sources: one reader per format behind one small protocol, plus the cached shard index.

Typical use::

    src = open_source("web", "/data/web/*.parquet")
    src.shards[0].rows, src.shards[0].tokens
    data = src.read_shard(0)          # ShardData(texts=[...], ids=[...] or None)

See docs/sources.md for each format's layout and the index cache file.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Mapping, Sequence
from typing import Any

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.sources.base import ShardData, ShardInfo, Source
from fastmix_data.sources.discover import FORMATS, Spec, discover
from fastmix_data.sources.hf import HFReader
from fastmix_data.sources.index import (
    VERIFY,
    IndexEntry,
    build_index,
    default_cache_dir,
    index_document,
    read_index_file,
    write_index_file,
)
from fastmix_data.sources.mds import MDSReader
from fastmix_data.sources.parquet import ParquetReader
from fastmix_data.sources.reader import Columns, ShardReader
from fastmix_data.sources.schema import resolve_columns, shard_tokens
from fastmix_data.sources.source import ShardedSource
from fastmix_data.sources.webdataset import WebDatasetReader
from fastmix_data.storage import Expected, RetryPolicy, ShardFiles, Storage, is_url, redact, urls
from fastmix_data.storage.store import DEFAULT_PREFETCH

__all__ = [
    "FORMATS",
    "READERS",
    "Columns",
    "ShardData",
    "ShardInfo",
    "ShardedSource",
    "Source",
    "default_cache_dir",
    "index_source",
    "open_source",
]

READERS: dict[str, type] = {
    "parquet": ParquetReader,
    "webdataset": WebDatasetReader,
    "mds": MDSReader,
    "hf": HFReader,
}
ON_CORRUPT = ("raise", "skip")


def _storage(cache_dir, remote_cache, cache_limit, storage_options, retry, prefetch) -> Storage:
    shards_dir: Any = False if not remote_cache else (os.path.join(os.fspath(cache_dir), "shards") if cache_dir else None)
    return Storage(shards_dir, cache_limit, storage_options, retry, prefetch)


def _from_index_file(name: str, location, reader_opts: dict, storage: Storage, format: str | None):
    """(format, reader, entries, skipped) from a `fastmix-data index` file; nothing is listed."""
    doc = read_index_file(location, storage.remote.storage_options)
    fmt = doc["source_format"]
    if format is not None and format != fmt:
        raise SourceError(f"index file {redact(os.fspath(location))} is for format {fmt!r}, not {format!r}")
    root = doc["root"]

    full = urls.joiner(root) if is_url(root) else (lambda rel: os.path.join(root, rel))

    locations = {full(rel): (root if r == "." else full(r), int(i)) for rel, (r, i) in doc.get("mds", {}).items()}
    reader = READERS[fmt](**reader_opts, locations=locations)
    if reader.config() != doc["config"]:
        raise SourceError(
            f"index file {redact(os.fspath(location))} was built with reader settings {doc['config']}, but source "
            f"{name!r} asks for {reader.config()}; rebuild it with the same text_field/ids_field"
        )
    entries = {full(e["path"]): IndexEntry.from_json(e) for e in doc["shards"]}
    return fmt, reader, entries, [tuple(x) for x in doc.get("skipped", [])]


def _index(name, spec, format, reader_opts, storage, cache_dir, on_corrupt, allow_unsafe, verify, engine):
    """(format, reader, entries, skipped): discover ``spec``, then index it (cached)."""
    try:
        found = discover(spec, format=format, allow_unsafe=allow_unsafe, remote=storage.remote)
    except (SourceError, UnsafeInputError) as exc:  # name the source: a mixture has several
        if type(exc) not in (SourceError, UnsafeInputError):  # RemoteError etc. already name the URL
            raise
        raise type(exc)(f"source {name!r}: {exc}") from None
    reader: ShardReader = READERS[found.format](**reader_opts, locations=found.mds_locations)
    reader.files = ShardFiles(storage)
    try:
        entries, skipped = build_index(
            found.paths, reader, source_name=name, cache_dir=cache_dir, on_corrupt=on_corrupt,
            objects=found.objects, storage=storage, verify=verify, engine=engine,
        )
    except ImportError as exc:  # the format's optional dependency is missing or broken
        raise SourceError(f"source {name!r} ({found.format}) cannot be read: {exc}") from exc
    return found.format, reader, entries, skipped


def open_source(
    name: str,
    spec: Spec | None = None,
    *,
    format: str | None = None,
    text_field: str | None = "text",
    ids_field: str | None = "input_ids",
    extra_fields: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: str = "raise",
    allow_unsafe: bool = False,
    verify: str = "auto",
    index_file: str | os.PathLike | None = None,
    cache_limit: int | str | None = None,
    prefetch: int | str = DEFAULT_PREFETCH,
    remote_cache: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    engine: str | Any = "local",
) -> ShardedSource:
    """Open a sharded source: discover its shards, index them (cached), check their schema.

    Args:
        name: the source's name in the mixture (used in messages).
        spec: a directory, a glob, a shard file, a URL (``s3://``, ``gs://``, ``az://``, ``hf://``,
            ``http(s)://``: an object, a prefix or a glob), or a list of those. Shards are sorted by
            path. None only with ``index_file``.
        format: ``"parquet"``, ``"webdataset"``, ``"mds"`` or ``"hf"``; detected when None.
        text_field: text column (WebDataset: member suffix; the default also accepts ``txt``).
            The default may be absent; another name must exist. None: do not read text.
        ids_field: token-ids column (WebDataset: ``<name>.npy``/``<name>.json``; the default also
            accepts ``npy``/``json`` members holding int lists). Same absence rules as text_field.
        extra_fields: further columns (members) decoded into ``ShardData.extra``.
        cache_dir: node-local cache directory: index entries, and remote shards under
            ``<cache_dir>/shards`` (default ``$FASTMIX_DATA_CACHE`` or ``~/.cache/fastmix_data/index``
            for the index, ``$FASTMIX_DATA_CACHE/shards`` or ``~/.cache/fastmix_data/shards`` for shards).
        on_corrupt: ``"raise"`` (default) or ``"skip"``: leave corrupt shards out, log a warning and
            list them in ``source.skipped``.
        allow_unsafe: allow ``pipe:`` URLs (WebDataset) and pickled members/columns.
        verify: ``"auto"`` (default: sha256 of local shards; size + ETag/version of remote ones),
            ``"sha256"`` (hash every shard, downloading remote ones whole once), ``"size"`` (no hash).
        index_file: a path or URL written by ``fastmix-data index``: its shards and entries are used
            as they are, without listing the store (``spec`` may then be None).
        cache_limit: byte budget of the remote shard cache (int or ``"20GB"``; default 80 % of the
            free space). It must hold the remote shards of one block.
        prefetch: bytes (int or ``"128MB"``) of the remote reads this process's plan makes after its
            current block (shards, or row groups of Parquet shards) fetched ahead, all at once
            (default 128 MB, at most a quarter of ``cache_limit``, at least the next read; 0: none).
        remote_cache: False reads remote shards into memory without a local copy (no prefetch).
        storage_options: fsspec options (credentials, endpoint, ...); never logged or stored.
        retry: retry policy of remote calls (default ``RetryPolicy()``: 6 tries, backoff from 0.2 s).
        engine: where shards missing from the index cache are indexed: ``"local"`` (threads,
            default), ``"ray"`` (one Ray task per shard) or an engine object (:mod:`fastmix_data.engine`).

    Returns:
        A picklable :class:`ShardedSource` (implements :class:`Source`).

    Raises:
        SourceError: missing path, empty glob, no shards, corrupt shard (when raising), schema
            mismatch, unknown column, empty source; remote failures after retries (`RemoteError`).
        UnsafeInputError: ``pipe:`` or pickle without ``allow_unsafe``; credentials inside a URL.
    """
    source, _ = _open(name, spec, format, text_field, ids_field, extra_fields, cache_dir, on_corrupt,
                      allow_unsafe, verify, index_file, cache_limit, prefetch, remote_cache, storage_options, retry,
                      engine)
    return source


def index_source(name: str, spec: Spec, out: str | os.PathLike | None = None, **options: Any) -> dict[str, Any]:
    """Index a source (as :func:`open_source` with ``options``) and return its index document,
    written to ``out`` (a path or URL) when given. See docs/sources.md, "Index files"."""
    keys = ("format", "text_field", "ids_field", "extra_fields", "cache_dir", "on_corrupt", "allow_unsafe",
            "verify", "index_file", "cache_limit", "prefetch", "remote_cache", "storage_options", "retry", "engine")
    unknown = sorted(set(options) - set(keys))
    if unknown:
        raise TypeError(f"index_source got unknown options {unknown}")
    defaults = dict(format=None, text_field="text", ids_field="input_ids", extra_fields=(), cache_dir=None,
                    on_corrupt="raise", allow_unsafe=False, verify="auto", index_file=None, cache_limit=None,
                    prefetch=DEFAULT_PREFETCH, remote_cache=True, storage_options=None, retry=None, engine="local")
    opts = {**defaults, **options}
    source, doc = _open(name, spec, *(opts[k] for k in keys))
    if out is not None:
        write_index_file(out, doc)
    return doc


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector while building per-shard objects: with 100,000 shards its
    full passes over the growing heap cost half of opening an index file (and free nothing)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _open(name, spec, format, text_field, ids_field, extra_fields, cache_dir, on_corrupt, allow_unsafe, verify,
          index_file, cache_limit, prefetch, remote_cache, storage_options, retry, engine) -> tuple[ShardedSource, dict]:
    _check_arguments(name, spec, format, text_field, ids_field, extra_fields, cache_dir, on_corrupt, allow_unsafe,
                     index_file)
    if verify not in VERIFY:
        raise SourceError(f"verify={verify!r} for source {name!r}; use one of {', '.join(VERIFY)}")
    if spec is None and index_file is None:
        raise SourceError(f"source {name!r} needs a spec (path, glob or URL) or an index_file")
    storage = _storage(cache_dir, remote_cache, cache_limit, storage_options, retry, prefetch)
    reader_opts = dict(text_field=text_field, ids_field=ids_field, allow_unsafe=allow_unsafe)
    if index_file is not None:
        with _gc_paused():
            fmt, reader, entries, skipped = _from_index_file(name, index_file, reader_opts, storage, format)
    else:  # (indexing downloads and decodes: the collector stays on)
        fmt, reader, entries, skipped = _index(name, spec, format, reader_opts, storage, cache_dir, on_corrupt,
                                               allow_unsafe, verify, engine)
    with _gc_paused():
        return _finish(name, spec, fmt, reader, entries, skipped, storage, extra_fields, verify, index_file)


def _finish(name, spec, fmt, reader, entries, skipped, storage, extra_fields, verify, index_file):
    """The opened source (and its index document) from its entries: schema, safety, shard facts."""
    if not entries:
        raise SourceError(
            f"source {name!r} has no readable shards: all {len(skipped)} were skipped as corrupt "
            f"(first: {redact(skipped[0][0])}: {skipped[0][1]}); fix or replace them"
        )
    remote = {p: e for p, e in entries.items() if is_url(p)}
    reader.files = ShardFiles(
        storage if remote else None,
        {p: Expected(e.size, e.version, e.sha256) for p, e in remote.items()},
        {p: e.stats.layout for p, e in remote.items() if e.stats.layout is not None},
    )
    for path, entry in entries.items():
        reader.check_safe(path, entry.stats)
    stats = {p: e.stats for p, e in entries.items()}
    if all(s.rows == 0 for s in stats.values()):
        raise SourceError(
            f"source {name!r} is empty: its {len(stats)} shards hold zero rows ({redact(next(iter(entries)))} ...)"
        )
    columns = resolve_columns(name, reader, stats, extra_fields)
    # sha256 is part of ShardInfo (and so of the fingerprint) exactly when this open asked for it,
    # whatever an earlier open left in the index cache
    hashed = {"sha256": lambda p: True, "size": lambda p: False, "auto": lambda p: not is_url(p)}[verify]
    shards = [
        ShardInfo(
            path=p, rows=e.stats.rows, tokens=shard_tokens(e.stats, columns), bytes=e.size,
            sha256=e.sha256 if index_file is not None or hashed(p) else "", mtime_ns=e.mtime_ns or None,
        )
        for p, e in entries.items()
    ]
    doc = index_document(fmt, reader, entries, skipped, spec if spec is not None else [], verify,
                         getattr(reader, "locations", None)) if index_file is None else {}
    return ShardedSource(name, fmt, shards, reader, columns, skipped, storage if remote else None), doc


OPTIONS = ("format", "text_field", "ids_field", "extra_fields", "cache_dir", "on_corrupt", "allow_unsafe",
           "verify", "index_file", "cache_limit", "prefetch", "remote_cache", "storage_options", "retry", "engine")


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse reader options `open_source` does not take (a source spec dict's keys, or
    MixtureStream/build_manifest keyword arguments meant for the readers), naming them."""
    unknown = sorted(set(options) - set(OPTIONS), key=str)
    if unknown:
        raise SourceError(f"source {name!r}: unknown reader option(s) {unknown}; the options are {list(OPTIONS)}")


def _check_arguments(name, spec, format, text_field, ids_field, extra_fields, cache_dir, on_corrupt, allow_unsafe,
                     index_file=None):
    """Types of `open_source`'s arguments, each refused with a `SourceError` naming it."""

    def bad(what: str, value: Any, want: str) -> SourceError:
        return SourceError(f"source {name!r}: {what}={value!r} {want}"[:300])

    if not isinstance(name, str) or not name:
        raise SourceError(f"a source name must be a non-empty string, got {name!r}")
    items = [spec] if isinstance(spec, (str, os.PathLike)) else ([] if spec is None and index_file else spec)
    if not isinstance(items, Sequence) or not all(isinstance(x, (str, os.PathLike)) for x in items):
        raise bad("spec", spec, "must be a directory, a glob, a shard path or a list of those")
    if format is not None and format not in FORMATS:
        raise SourceError(f"source {name!r}: unknown format {format!r}; use one of {', '.join(FORMATS)}")
    for what, value in (("text_field", text_field), ("ids_field", ids_field)):
        if value is not None and (not isinstance(value, str) or not value):
            raise bad(what, value, "must be a column name or None")
    if (
        isinstance(extra_fields, str)
        or not isinstance(extra_fields, Sequence)
        or not all(isinstance(x, str) and x for x in extra_fields)
    ):
        raise bad("extra_fields", extra_fields, "must be a list of column names")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise bad("cache_dir", cache_dir, "must be a directory path or None")
    if not isinstance(on_corrupt, str) or on_corrupt not in ON_CORRUPT:
        raise SourceError(f"on_corrupt={on_corrupt!r} for source {name!r}; use 'raise' or 'skip'")
    if not isinstance(allow_unsafe, bool):
        raise bad("allow_unsafe", allow_unsafe, "must be True or False")
