"""The Source/Shard protocol shared by every format reader.

A *source* is a named, ordered list of shards of one format. Readers decode one whole shard at a
time into a :class:`ShardData`; the stream picks rows out of it by index (within-shard shuffles are
planned elsewhere, in :mod:`fastmix_data.plan`). The per-shard facts the planner needs (rows,
tokens, bytes, sha256) live in :class:`ShardInfo` and are computed once and cached by
:mod:`fastmix_data.sources.index`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ShardInfo:
    """Facts about one shard file (or shard directory for HF datasets).

    Attributes:
        path: absolute path of the shard.
        rows: number of samples (rows) in the shard.
        tokens: total tokens when known: the length sum of the ids column, or for text the UTF-8
            byte count plus one end-of-document token per row (the byte-level tokenizer's count).
            None when the shard has neither.
        bytes: size of the shard on disk, in bytes.
        sha256: hex digest of the shard's bytes.
        mtime_ns: modification time when it was indexed (None when unknown, e.g. from a manifest):
            a shard rewritten in place with the same size is still noticed before it is read.
    """

    path: str
    rows: int
    tokens: int | None
    bytes: int
    sha256: str
    mtime_ns: int | None = None


class IdRows:
    """Token-id rows back to back: row i is ``values[offsets[i]:offsets[i + 1]]``.

    A list-like view (``len``, indexing and iteration give one 1-D array per row) over one flat
    integer array, so the stream gathers and packs rows with numpy instead of per-row Python.

    Args:
        values: 1-D integer array (any width; the storage's own type).
        offsets: int64 (rows + 1,), non-decreasing, ``offsets[0] == 0``.
    """

    __slots__ = ("values", "offsets")

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values = values
        self.offsets = offsets

    @classmethod
    def of(cls, rows) -> IdRows:
        """``rows`` as IdRows: itself when it is one, else a list of 1-D arrays concatenated once."""
        if isinstance(rows, IdRows):
            return rows
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate([np.asarray(r) for r in rows]) if len(rows) else np.zeros(0, dtype=np.int64)
        return cls(values if values.dtype.kind in "iu" else values.astype(np.int64), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.values[int(self.offsets[row]) : int(self.offsets[row + 1])]

    def __iter__(self):
        bounds = self.offsets.tolist()
        return (self.values[a:b] for a, b in zip(bounds[:-1], bounds[1:]))

    def lengths(self) -> np.ndarray:
        """int64 (rows,): the length of every row."""
        return self.offsets[1:] - self.offsets[:-1]

    def take(self, rows) -> IdRows:
        """Rows ``rows`` (indices, any order, repeats allowed) as new IdRows, gathered with numpy."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        if total == 0:
            return IdRows(self.values[:0].copy(), offsets)
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(total, dtype=np.int64)
        return IdRows(self.values[index], offsets)

    def slice(self, lo: int, hi: int) -> IdRows:
        """Rows [lo, hi) (a view of the values)."""
        a, b = int(self.offsets[lo]), int(self.offsets[hi])
        return IdRows(self.values[a:b], self.offsets[lo : hi + 1] - a)

    @classmethod
    def concat(cls, parts: list[IdRows]) -> IdRows:
        """The rows of ``parts`` one after another (one copy of the values)."""
        if len(parts) == 1:
            return parts[0]
        values = np.concatenate([p.values for p in parts])
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([[0], *(p.offsets[1:] + s for p, s in zip(parts, shifts))]).astype(np.int64)
        return cls(values, offsets)


@dataclass
class ShardData:
    """One decoded shard: column arrays of equal length ``rows``.

    Attributes:
        texts: the text column (one str per row), or None when the source has no text column. Read
            for shared-memory transport (``raw_text``), a `sources.arrow.Utf8Rows` instead.
        ids: the pre-tokenized column (one 1-D integer array per row: a list, or an `IdRows`), or
            None.
        extra: other decoded columns by name (lists of Python values), for sample mode.
        row_tokens: optional int64 (rows,): tokens per row as the stream counts them (ids length,
            else UTF-8 bytes + 1); readers that get it for free fill it, the stream computes it
            otherwise.
    """

    texts: Sequence[str] | Sequence[memoryview] | None
    ids: list[np.ndarray] | IdRows | None
    extra: dict[str, list] = field(default_factory=dict)
    row_tokens: np.ndarray | None = None

    @property
    def rows(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        if self.ids is not None:
            return len(self.ids)
        return 0


@runtime_checkable
class Source(Protocol):
    """A named, ordered list of shards of one format.

    Attributes:
        name: the source's name in the mixture.
        format: one of "parquet", "webdataset", "mds", "hf".
        shards: the shards in a stable order (sorted paths), with their cached facts.
    """

    name: str
    format: str
    shards: list[ShardInfo]

    def read_shard(self, index: int) -> ShardData:
        """Decode shard ``index`` (position in ``shards``); raise SourceError naming the file."""
        ...

    def fingerprint(self) -> str:
        """A hex digest of (format, column config, shard paths, sizes and sha256s)."""
        ...
