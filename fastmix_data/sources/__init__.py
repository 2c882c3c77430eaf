"""Sharded sources: one reader per format behind one small protocol, plus the cached shard index.

Typical use::

    src = open_source("web", "/data/web/*.parquet")
    src.shards[0].rows, src.shards[0].tokens
    data = src.read_shard(0)          # ShardData(texts=[...], ids=[...] or None)

See docs/sources.md for each format's layout and the index cache file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.sources.base import ShardData, ShardInfo, Source
from fastmix_data.sources.discover import FORMATS, Spec, discover
from fastmix_data.sources.hf import HFReader
from fastmix_data.sources.index import build_index, default_cache_dir
from fastmix_data.sources.mds import MDSReader
from fastmix_data.sources.parquet import ParquetReader
from fastmix_data.sources.reader import Columns, ShardReader
from fastmix_data.sources.schema import resolve_columns, shard_tokens
from fastmix_data.sources.source import ShardedSource
from fastmix_data.sources.webdataset import WebDatasetReader

__all__ = [
    "FORMATS",
    "READERS",
    "Columns",
    "ShardData",
    "ShardInfo",
    "ShardedSource",
    "Source",
    "default_cache_dir",
    "open_source",
]

READERS: dict[str, type] = {
    "parquet": ParquetReader,
    "webdataset": WebDatasetReader,
    "mds": MDSReader,
    "hf": HFReader,
}
ON_CORRUPT = ("raise", "skip")


def open_source(
    name: str,
    spec: Spec,
    *,
    format: str | None = None,
    text_field: str | None = "text",
    ids_field: str | None = "input_ids",
    extra_fields: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
    on_corrupt: str = "raise",
    allow_unsafe: bool = False,
) -> ShardedSource:
    """Open a sharded source: discover its shards, index them (cached), check their schema.

    Args:
        name: the source's name in the mixture (used in messages).
        spec: a directory, a glob, a shard file, or a list of those. Shards are sorted by path.
        format: ``"parquet"``, ``"webdataset"``, ``"mds"`` or ``"hf"``; detected when None.
        text_field: text column (WebDataset: member suffix; the default also accepts ``txt``).
            The default may be absent; another name must exist. None: do not read text.
        ids_field: token-ids column (WebDataset: ``<name>.npy``/``<name>.json``; the default also
            accepts ``npy``/``json`` members holding int lists). Same absence rules as text_field.
        extra_fields: further columns (members) decoded into ``ShardData.extra``.
        cache_dir: index cache directory (default ``$FASTMIX_DATA_CACHE`` or
            ``~/.cache/fastmix_data/index``).
        on_corrupt: ``"raise"`` (default) or ``"skip"``: leave corrupt shards out, log a warning and
            list them in ``source.skipped``.
        allow_unsafe: allow ``pipe:`` URLs (WebDataset) and pickled members/columns.

    Returns:
        A picklable :class:`ShardedSource` (implements :class:`Source`).

    Raises:
        SourceError: missing path, empty glob, no shards, corrupt shard (when raising), schema
            mismatch, unknown column, empty source.
        UnsafeInputError: URL schemes, ``pipe:`` or pickle without ``allow_unsafe``.
    """
    _check_arguments(name, spec, format, text_field, ids_field, extra_fields, cache_dir, on_corrupt, allow_unsafe)
    try:
        found = discover(spec, format=format, allow_unsafe=allow_unsafe)
    except (SourceError, UnsafeInputError) as exc:  # name the source: a mixture has several
        raise type(exc)(f"source {name!r}: {exc}") from None
    reader: ShardReader = READERS[found.format](
        text_field=text_field, ids_field=ids_field, allow_unsafe=allow_unsafe, locations=found.mds_locations
    )
    try:
        entries, skipped = build_index(
            found.paths, reader, source_name=name, cache_dir=cache_dir, on_corrupt=on_corrupt
        )
    except ImportError as exc:  # the format's optional dependency is missing or broken
        raise SourceError(f"source {name!r} ({found.format}) cannot be read: {exc}") from exc
    if not entries:
        raise SourceError(
            f"source {name!r} has no readable shards: all {len(skipped)} were skipped as corrupt "
            f"(first: {skipped[0][0]}: {skipped[0][1]}); fix or replace them"
        )
    for path, entry in entries.items():
        reader.check_safe(path, entry.stats)
    stats = {p: e.stats for p, e in entries.items()}
    if all(s.rows == 0 for s in stats.values()):
        raise SourceError(
            f"source {name!r} is empty: its {len(stats)} shards hold zero rows ({found.paths[0]} ...)"
        )
    columns = resolve_columns(name, reader, stats, extra_fields)
    shards = [
        ShardInfo(
            path=p, rows=e.stats.rows, tokens=shard_tokens(e.stats, columns), bytes=e.size, sha256=e.sha256,
            mtime_ns=e.mtime_ns or None,
        )
        for p, e in entries.items()
    ]
    return ShardedSource(name, found.format, shards, reader, columns, skipped)


OPTIONS = ("format", "text_field", "ids_field", "extra_fields", "cache_dir", "on_corrupt", "allow_unsafe")


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse reader options `open_source` does not take (a source spec dict's keys, or
    MixtureStream/build_manifest keyword arguments meant for the readers), naming them."""
    unknown = sorted(set(options) - set(OPTIONS), key=str)
    if unknown:
        raise SourceError(f"source {name!r}: unknown reader option(s) {unknown}; the options are {list(OPTIONS)}")


def _check_arguments(name, spec, format, text_field, ids_field, extra_fields, cache_dir, on_corrupt, allow_unsafe):
    """Types of `open_source`'s arguments, each refused with a `SourceError` naming it."""

    def bad(what: str, value: Any, want: str) -> SourceError:
        return SourceError(f"source {name!r}: {what}={value!r} {want}"[:300])

    if not isinstance(name, str) or not name:
        raise SourceError(f"a source name must be a non-empty string, got {name!r}")
    items = [spec] if isinstance(spec, (str, os.PathLike)) else spec
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
