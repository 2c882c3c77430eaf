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


@dataclass
class ShardData:
    """One decoded shard: column arrays of equal length ``rows``.

    Attributes:
        texts: the text column (one str per row), or None when the source has no text column. Read
            for shared-memory transport (``raw_text``), a `sources.arrow.Utf8Rows` instead.
        ids: the pre-tokenized column (one 1-D int64 array per row), or None.
        extra: other decoded columns by name (lists of Python values), for sample mode.
        row_tokens: optional int64 (rows,): tokens per row as the stream counts them (ids length,
            else UTF-8 bytes + 1); readers that get it for free fill it, the stream computes it
            otherwise.
    """

    texts: Sequence[str] | Sequence[memoryview] | None
    ids: list[np.ndarray] | None
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
