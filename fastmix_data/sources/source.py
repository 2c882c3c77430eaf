"""The one Source implementation: a named, ordered list of indexed shards plus a format reader.

It is shipped to DataLoader worker processes, so it holds only plain data (paths, cached facts and
the reader's configuration): no open files, no decoded rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import pyarrow as pa

from fastmix_data.errors import FastMixDataError, SourceError
from fastmix_data.sources.arrow import shard_data_from_table, table_from_shard_data
from fastmix_data.sources.base import ShardData, ShardInfo
from fastmix_data.sources.reader import Columns, ShardReader
from fastmix_data.sources.safety import is_pipe
from fastmix_data.storage import Storage, is_url, redact
from fastmix_data.storage.urls import common_dir, relative_name


def check_unchanged(info: ShardInfo, where: str, since: str, advice: str = "") -> None:
    """Raise SourceError naming the shard if it is missing, or its size (or, when ``info`` knows it,
    its modification time: a same-size rewrite) differs from ``info``."""
    try:
        st = os.stat(info.path)
    except OSError as exc:
        raise SourceError(f"{where} cannot be read ({exc}); restore the file") from exc
    if st.st_size != info.bytes:
        raise SourceError(f"{where} changed since {since} ({st.st_size} bytes now, {info.bytes} then){advice}")
    if info.mtime_ns is not None and st.st_mtime_ns != info.mtime_ns:
        raise SourceError(f"{where} was rewritten since {since} (same size, new modification time){advice}")


class ShardedSource:
    """A source of one format (see :class:`fastmix_data.sources.base.Source`).

    Attributes:
        name: the source's name in the mixture.
        format: ``"parquet"``, ``"webdataset"``, ``"mds"`` or ``"hf"``.
        shards: readable shards in path order, with rows, tokens, bytes and sha256.
        columns: the text/ids/extra columns read from every shard.
        skipped: ``(path, reason)`` of shards left out by ``on_corrupt="skip"``.
        storage: remote settings (cache, prefetch, retries) when any shard is a URL, else None.
    """

    def __init__(
        self,
        name: str,
        format: str,
        shards: Sequence[ShardInfo],
        reader: ShardReader,
        columns: Columns,
        skipped: Sequence[tuple[str, str]] = (),
        storage: Storage | None = None,
    ):
        self.name = name
        self.format = format
        self.shards = list(shards)
        self.reader = reader
        self.columns = columns
        self.skipped = list(skipped)
        self.storage = storage

    @property
    def remote(self) -> bool:
        """True when the shards are URLs (read through the storage layer)."""
        return self.storage is not None and any(is_url(s.path) for s in self.shards[:1])

    @property
    def rows(self) -> int:
        """Total rows (samples) over all shards."""
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int | None:
        """Total tokens over all shards, or None when the source has neither text nor ids."""
        counts = [s.tokens for s in self.shards]
        return None if any(t is None for t in counts) else sum(counts)  # type: ignore[misc]

    def read_shard(self, index: int) -> ShardData:
        """Decode shard ``index``; raise SourceError naming the file if it changed or is unreadable.

        A zero-row shard (kept among non-empty ones) is only checked for changes, not decoded: it
        may lack columns it has no values for (an empty tar has no members)."""
        if self.shards[index].rows == 0:
            return self._checked(index, lambda path: self._empty())
        return self._checked(index, lambda path: self.reader.read(path, self.columns))

    def _empty(self) -> ShardData:
        return ShardData(
            texts=[] if self.columns.text else None,
            ids=[] if self.columns.ids else None,
            extra={n: [] for n in self.columns.extra},
        )

    def read_shard_table(self, index: int, row_groups: list[int] | None = None) -> pa.Table:
        """Shard ``index`` decoded to an Arrow table of the source's text/ids columns (only the rows
        of ``row_groups``, see `row_group_rows`, when given); `shard_from_table` gives rows.

        Raises:
            SourceError: as `read_shard`. ValueError: the source has extra columns (their Python
                values have no Arrow form in general), or row groups of a format without them.
        """
        if self.columns.extra:
            raise ValueError(f"source {self.name!r} has extra columns; its shards are not read as Arrow")
        if row_groups is not None:
            read_groups = getattr(self.reader, "read_row_groups", None)
            if read_groups is None:
                raise ValueError(f"source {self.name!r} ({self.format}) has no row groups")
            sizes = self.row_group_rows(index)
            return self._checked(
                index, lambda path: read_groups(path, self.columns, row_groups), rows=lambda t: t.num_rows,
                expect=sum(sizes[g] for g in row_groups), row_groups=row_groups,
            )  # fmt: skip
        read_table = getattr(self.reader, "read_table", None)
        if read_table is not None and self.shards[index].rows > 0:
            return self._checked(index, lambda path: read_table(path, self.columns), rows=lambda t: t.num_rows)
        return table_from_shard_data(self.read_shard(index), self.columns)

    def row_group_rows(self, index: int) -> list[int]:
        """Rows of each row group of shard ``index``: a Parquet shard's layout (from the index for a
        remote shard, else its footer), else one group of all rows.

        Raises:
            SourceError: the footer is unreadable or its row groups do not add up to the indexed rows.
        """
        cache = self.__dict__.setdefault("_row_groups", {})
        hit = cache.get(index)
        if hit is None:
            layout = getattr(self.reader, "layout", None)
            if layout is None:
                hit = [self.shards[index].rows]
            else:
                hit = self._checked(index, lambda path: [int(n) for n in layout(path)["rows"]], rows=sum, stat=False)
            cache[index] = hit
        return hit

    def shard_from_table(
        self, index: int, table: pa.Table, raw_text: bool = False, rows: int | None = None, native_ids: bool = False
    ) -> ShardData:
        """The rows of a table made by `read_shard_table` (``rows`` of them when it holds only some
        row groups); with ``raw_text`` the texts are UTF-8 memoryviews into the table (see
        `arrow.texts_of`), with ``native_ids`` the ids keep their stored integer type."""
        return self._checked(
            index,
            lambda path: shard_data_from_table(table, self.columns, path, raw_text, native_ids),
            stat=False,
            expect=rows,
        )

    # ------------------------------------------------------------------ remote: prefetch
    def _requests(self, index: int, row_groups: Sequence[int] | None = None) -> list:
        """[(cache key, bytes, part)] of what reading shard ``index`` (Parquet: only
        ``row_groups``, all when None) fetches from a remote store: one entry per part (Parquet:
        the footer, then one per row group; other formats: the whole object)."""
        memo = self.__dict__.setdefault("_request_memo", {})
        key = (index, None if row_groups is None else tuple(row_groups))
        hit = memo.get(key)
        if hit is None:
            path = self.shards[index].path
            parts: list = [None]
            if self.format == "parquet":
                parts = self.reader.parts(path, self.columns, row_groups)  # type: ignore[attr-defined]
            hit = memo[key] = [(*self.reader.files.cache_request(path, p), p) for p in parts]
            if len(memo) > 4096:  # a few blocks' reads; plans revisit them every epoch
                memo.clear()
        return hit

    def cache_keys(self, index: int, row_groups: Sequence[int] | None = None) -> list[str]:
        """The node-local cache entries a read of shard ``index`` (``row_groups`` of it) uses."""
        return [key for key, _, _ in self._requests(index, row_groups)] if self.remote else []

    def fetch_bytes(self, index: int, row_groups: Sequence[int] | None = None) -> int:
        """Bytes a read of shard ``index`` downloads (Parquet: the footer and the needed column
        chunks of ``row_groups``, all when None); 0 for a local shard."""
        return sum(n for _, n, _ in self._requests(index, row_groups)) if self.remote else 0

    def reads_bytes(self, reads: Sequence[tuple[int, Sequence[int] | None]]) -> int:
        """Bytes the cache must hold at once for ``reads`` (``(shard, row groups or None)``), each
        cache entry counted once (a shard's footer serves all its row-group reads)."""
        if not self.remote:
            return 0
        return sum({key: n for index, groups in reads for key, n, _ in self._requests(index, groups)}.values())

    def prefetch(self, reads: Sequence[tuple[int, Sequence[int] | None]], pin_hits: bool = True) -> list[str]:
        """Fetch what these reads need into the node-local cache in the background, in this order
        (the stream's block hook calls it; see :mod:`fastmix_data.storage.prefetch`).

        Args:
            reads: ``(shard index, row groups or None for all)`` per read.
            pin_hits: pin the entries already on this node until they are read (False for the
                current block's reads, which their read pins within moments: no flock then).

        Returns:
            The cache keys of the reads (each once). ``[]`` for local sources or without a cache.
        """
        if not self.remote or self.storage.cache is None:  # type: ignore[union-attr]
            return []
        from fastmix_data.storage.prefetch import prefetcher

        pool = prefetcher()
        cache = self.storage.cache  # type: ignore[union-attr]
        keys: dict[str, None] = {}
        for index, groups in reads:
            todo: dict[str, object] = {}  # the read's entries neither on this node nor in flight: one job
            for key, _, part in self._requests(index, groups):
                if key in keys:
                    continue
                keys[key] = None
                if pool.holds(key):
                    continue
                if not pin_hits:
                    if not cache.has(key):
                        todo[key] = part
                    continue
                pin = cache.pin(key)  # already on this node: pin it here, no background job (warm cache)
                if pin is not None:
                    pool.keep(key, pin)
                else:
                    todo[key] = part
            if todo:
                pool.submit(list(todo), self.reader.files.fetch_job(self.shards[index].path, list(todo.values())))
        return list(keys)

    def _release(self, index: int, row_groups: Sequence[int] | None = None) -> None:
        """Drop the prefetcher's pins of what a read of shard ``index`` (``row_groups``) used."""
        if self.remote and self.storage.cache is not None:  # type: ignore[union-attr]
            from fastmix_data.storage.prefetch import prefetcher

            pool = prefetcher()
            for key in self.cache_keys(index, row_groups):
                pool.release(key)

    def _checked(
        self, index: int, read, rows=lambda data: data.rows, stat: bool = True, expect: int | None = None,
        row_groups: Sequence[int] | None = None,
    ):  # fmt: skip
        """``read(path)`` of shard ``index`` with its errors named; ``stat``: a read of the file (check
        that a local one is unchanged first; release the prefetched pins of ``row_groups`` after)."""
        info = self.shards[index]
        where = f"shard {redact(info.path)} of source {self.name!r}"
        if stat and not is_pipe(info.path) and not is_url(info.path):
            check_unchanged(info, where, "it was indexed", "; re-open the source to re-index it")
        try:
            data = read(info.path)
        except FastMixDataError:
            raise
        except Exception as exc:
            raise SourceError(
                f"{where} is unreadable ({type(exc).__name__}: {exc}); replace the file"
            ) from exc
        finally:
            if stat:
                self._release(index, row_groups)
        want = info.rows if expect is None else expect
        if rows(data) != want:
            raise SourceError(f"{where} has {rows(data)} rows but was indexed with {want}; re-open the source")
        return data

    def fingerprint(self) -> str:
        """Hex sha256 of (format, columns, and per shard: its name relative to the shards' common
        directory or URL prefix, bytes, rows, tokens, sha256 or ``""``); the source name is not
        included. Independent of where the shards live, so the same files on local disk, in S3 or
        over http give the same fingerprint when both were indexed alike (both with sha256, or both
        without: ``verify="size"``)."""
        paths = [s.path for s in self.shards]
        root = None if any(is_pipe(p) for p in paths) else common_dir(paths)
        obj = {
            "format": self.format,
            "columns": [self.columns.text, self.columns.ids, list(self.columns.extra)],
            "shards": [
                [s.path if root is None else relative_name(s.path, root), s.bytes, s.rows, s.tokens, s.sha256]
                for s in self.shards
            ],
        }
        return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()

    def __repr__(self) -> str:
        return (
            f"ShardedSource(name={self.name!r}, format={self.format!r}, shards={len(self.shards)}, "
            f"rows={self.rows}, tokens={self.tokens}, skipped={len(self.skipped)})"
        )
