"""Items of one source: rows (sample mode) or packed token sequences (packing mode).

Packing is done per shard and per epoch, within one source, so every sequence has one source id:
the shard's rows are visited in a seeded order, each tokenized and followed by the end-of-document
token, concatenated, and cut into ``seq_len + 1``-token sequences. The tail shorter than a sequence
is dropped (at most ``seq_len`` tokens per shard per epoch; documented in docs/stream.md). The number
of sequences per shard is therefore known from the shard's token count before any shard is read,
which is what the planner needs.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fastmix_data.errors import SourceError
from fastmix_data.io import write_json_atomic
from fastmix_data.plan.order import _permutation, stable_key
from fastmix_data.sources.base import ShardData, Source
from fastmix_data.stream.tokenize import ByteTokenizer, CallableTokenizer


@dataclass
class Gathered:
    """Rows of one shard picked by index (sample mode): columns in the order of the indices.

    Attributes:
        texts, ids, extra: as in :class:`ShardData`, for the picked rows only.
        tokens: int64 (n,): tokens per row: ids length, else UTF-8 bytes + 1 (the byte tokenizer).
    """

    texts: list | None
    ids: list | None
    extra: dict[str, list]
    tokens: np.ndarray


@dataclass
class Packed:
    """A shard's token stream for one epoch: flat ids and document-start flags."""

    ids: np.ndarray  # int64 (T,)
    doc_start: np.ndarray  # bool (T,)


def _take(values, rows: list[int]) -> list:
    """``[values[i] for i in rows]``, vectorised for `Utf8Rows`."""
    take = getattr(values, "take", None)
    if take is not None:
        return take(rows)
    return pick(values, rows)


def pick(values, rows: list[int]) -> list:
    """``[values[i] for i in rows]`` as one ``itemgetter`` call (no per-row bytecode)."""
    return list(operator.itemgetter(*rows)(values)) if len(rows) > 1 else [values[i] for i in rows]


def row_tokens(data: ShardData) -> np.ndarray:
    """Tokens per row of a decoded shard, as the stream counts them: the ids length, else the UTF-8
    byte count + 1 (what the byte tokenizer makes of it), else 0. int64 (rows,)."""
    if data.ids is not None:
        return np.fromiter((len(x) for x in data.ids), dtype=np.int64, count=len(data.ids))
    if data.texts is not None:
        return np.fromiter((len(t.encode("utf-8")) + 1 for t in data.texts), dtype=np.int64, count=len(data.texts))
    return np.zeros(data.rows, dtype=np.int64)


class ItemSource:
    """Random access to the items of one source, with a small per-process shard cache.

    Args:
        source: the opened source.
        seed: the stream seed (packing visits rows in a seeded order per epoch).
        seq_len: packed sequence length (items have seq_len + 1 tokens); None = sample mode.
        tokenizer: used in packing mode for text columns.
        cache_shards: decoded shards kept per process.
    """

    def __init__(
        self,
        source: Source,
        seed: int,
        seq_len: int | None,
        tokenizer: ByteTokenizer | CallableTokenizer,
        cache_shards: int = 2,
        shuffle: bool = True,
    ):
        self.source = source
        self.seed = seed
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.cache_shards = cache_shards
        self.shuffle = shuffle
        self.key = stable_key(source.name)
        self._cache: OrderedDict = OrderedDict()
        self.shared = None  # SharedShards of the stream's DataLoader workers (set in workers only)
        self.raw_text = False  # texts as UTF-8 memoryviews (workers writing batches to shared memory)
        self.shard_tokens = self._shard_tokens()
        if seq_len is None:
            self.items_per_shard = [s.rows for s in source.shards]
        else:
            self.items_per_shard = [t // (seq_len + 1) for t in self.shard_tokens]
        if sum(self.items_per_shard) == 0:
            what = "rows" if seq_len is None else f"tokens for one sequence of {seq_len + 1}"
            raise SourceError(f"source {source.name!r} has no {what} (shards: {[s.path for s in source.shards][:3]}...)")

    # ----------------------------------------------------------------------------- sizes
    @property
    def has_ids(self) -> bool:
        """True when the source has a pre-tokenized ids column (packing then ignores text)."""
        return getattr(getattr(self.source, "columns", None), "ids", None) is not None

    def _shard_tokens(self) -> list[int]:
        """Tokens per shard as packing counts them (end-of-document tokens included)."""
        shards = self.source.shards
        has_ids = self.has_ids
        if isinstance(self.tokenizer, ByteTokenizer) and not has_ids:
            if all(s.tokens is not None for s in shards):
                return [int(s.tokens) for s in shards]
        if has_ids and all(s.tokens is not None for s in shards):
            eos = getattr(self.tokenizer, "eos_id", None)
            return [int(s.tokens) + (s.rows if eos is not None else 0) for s in shards]
        return self._count_tokens_by_tokenizing()

    def _count_tokens_by_tokenizing(self) -> list[int]:
        cache_file = self._token_cache_path()
        cached = {}
        if cache_file and os.path.exists(cache_file):
            try:
                with open(cache_file) as f:
                    cached = json.load(f)
            except (OSError, ValueError):
                cached = {}
        out, changed = [], False
        from tqdm.auto import tqdm

        for i, shard in enumerate(tqdm(self.source.shards, desc=f"tokenizing {self.source.name}", disable=None)):
            key = f"{shard.sha256}:{self.tokenizer.fingerprint()}"
            if key not in cached:
                data = self.source.read_shard(i)
                cached[key] = int(sum(len(d) for d in self._docs(data, range(data.rows))))
                changed = True
            out.append(cached[key])
        if changed and cache_file:
            write_json_atomic(cache_file, cached, indent=None, fsync=False)  # a cache: losing it costs a recount
        return out

    def _token_cache_path(self) -> str | None:
        root = os.environ.get("FASTMIX_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastmix_data")
        digest = hashlib.sha256(self.source.fingerprint().encode()).hexdigest()[:24]
        return os.path.join(root, "token_counts", f"{digest}.json")

    # ----------------------------------------------------------------------------- reading
    def _shard(self, shard: int) -> ShardData:
        key = ("shard", shard, self.raw_text)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._read(shard)
            if hit.row_tokens is None and self.seq_len is None:
                hit.row_tokens = row_tokens(hit)
            self._remember(key, hit)
        else:
            self._cache.move_to_end(key)
        return hit

    def _read(self, shard: int) -> ShardData:
        """Decode a shard; through the workers' shared decoded shards when the stream has them.
        Texts come as UTF-8 memoryviews when ``raw_text`` and the shard is (or is shared) as Arrow."""
        source = self.source
        if not hasattr(source, "read_shard_table") or source.columns.extra:
            return source.read_shard(shard)
        if self.shared is not None:
            table = self.shared.get(f"{self.key:016x}-{shard}", lambda: source.read_shard_table(shard))
        elif self.raw_text and hasattr(source.reader, "read_table"):
            table = source.read_shard_table(shard)
        else:
            return source.read_shard(shard)
        return source.shard_from_table(shard, table, self.raw_text)

    def _remember(self, key, value) -> None:
        self._cache[key] = value
        while len(self._cache) > 2 * self.cache_shards:
            self._cache.popitem(last=False)

    def _docs(self, data: ShardData, rows) -> list[np.ndarray]:
        eos = self.tokenizer.eos_id
        tail = np.array([eos], dtype=np.int64) if eos is not None else np.zeros(0, dtype=np.int64)
        if data.ids is not None:
            return [np.concatenate([data.ids[r], tail]) for r in rows]
        if data.texts is None:
            raise SourceError(f"source {self.source.name!r} has neither a text nor an ids column to pack")
        return [np.concatenate([self.tokenizer.encode(data.texts[r]), tail]) for r in rows]

    def _packed(self, epoch: int, shard: int) -> Packed:
        key = ("packed", epoch, shard)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        data = self._shard(shard)
        order = (
            _permutation(data.rows, self.seed, self.key, epoch, shard + 1, 0x70AC)
            if self.shuffle
            else np.arange(data.rows)
        )
        docs = self._docs(data, order)
        ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
        starts = np.zeros(len(ids), dtype=bool)
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])[lengths > 0]] = True
        if len(ids) != self.shard_tokens[shard]:
            raise SourceError(
                f"source {self.source.name!r}: shard {self.source.shards[shard].path} has {len(ids)} tokens "
                f"but its index says {self.shard_tokens[shard]}; the shard changed since it was indexed — "
                "reopen the source to re-index it"
            )
        packed = Packed(ids, starts)
        self._remember(key, packed)
        return packed

    def sequences(self, epoch: int, shard: int, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Packed sequences ``items`` of ``shard`` in ``epoch``: (ids [n, L+1], doc_start [n, L+1])."""
        packed = self._packed(epoch, shard)
        width = self.seq_len + 1
        idx = items[:, None] * width + np.arange(width)[None, :]
        return packed.ids[idx], packed.doc_start[idx]

    def rows(self, shard: int, items: np.ndarray) -> ShardData:
        """The rows ``items`` of ``shard`` (sample mode)."""
        data = self._shard(shard)
        return ShardData(
            texts=None if data.texts is None else [data.texts[i] for i in items],
            ids=None if data.ids is None else [data.ids[i] for i in items],
            extra={k: [v[i] for i in items] for k, v in data.extra.items()},
        )

    def gather(self, shard: int, items: np.ndarray) -> Gathered:
        """The rows ``items`` of ``shard`` and their token counts (sample mode, the stream's path)."""
        data = self._shard(shard)
        tokens = data.row_tokens[items]
        picks = items.tolist()
        return Gathered(
            texts=None if data.texts is None else _take(data.texts, picks),
            ids=None if data.ids is None else [data.ids[i] for i in picks],
            extra={k: [v[i] for i in picks] for k, v in data.extra.items()},
            tokens=tokens,
        )

    def mean_tokens_per_item(self) -> float:
        """Mean tokens per item (for weights in token units in sample mode)."""
        if self.seq_len is not None:
            return float(self.seq_len + 1)
        return sum(self.shard_tokens) / max(1, sum(self.items_per_shard))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state
