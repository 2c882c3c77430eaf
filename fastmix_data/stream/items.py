"""Items of one source: rows (sample mode) or packed token sequences (packing mode), and its slices.

With canonical partitions a source's items are cut into P_k slices of equal size
(:mod:`fastmix_data.plan.partition`). In sample mode items are rows and the cuts fall anywhere. In
packing mode the cuts fall between rows, at equal token counts: a shard cut by one is split into
*pieces* (row ranges), and packing is per piece and per epoch, within one source, so every sequence
has one source id: the piece's rows are visited in a seeded order, each followed by the
end-of-document id of the tokenizer that made its ids, concatenated and cut into ``seq_len + 1``-token
sequences (vectorised, :mod:`fastmix_data.stream.packing`). The tail shorter than a sequence is
dropped (at most ``seq_len`` tokens per piece per epoch). Sequences per piece follow from its token
count before anything is packed, which is what the planner needs; a cut shard's row token counts are
read once and cached with its cut points.

Rows are read by *unit*: a Parquet row group (only the row groups a block needs, only the needed
columns), or a whole shard for formats without row groups.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from fastmix_data.errors import SourceError
from fastmix_data.io import write_json_atomic
from fastmix_data.plan.order import _permutation, stable_key
from fastmix_data.plan.partition import Piece, SourceLayout, equal_cuts, slice_count
from fastmix_data.sources.base import IdRows, ShardData, Source
from fastmix_data.stream.packing import narrow, pack, sequences
from fastmix_data.stream.tokenize import ByteTokenizer, CallableTokenizer, token_dtype

PACK_TAG = 0x70AC  # seeds of the packing row order (see ItemSource._packed)
_DEFAULT = object()


@dataclass
class Gathered:
    """Rows of one shard picked by index (sample mode): columns in the order of the indices.

    Attributes:
        texts, extra: as in :class:`ShardData`, for the picked rows only.
        ids: the picked rows' ids (`IdRows` in the stream's token dtype), or None.
        tokens: int64 (n,): tokens per row: ids length, else UTF-8 bytes + 1 (the byte tokenizer).
    """

    texts: list | None
    ids: IdRows | None
    extra: dict[str, list]
    tokens: np.ndarray


@dataclass
class _Unit:
    """Decoded rows [start, start + rows) of a shard: one row group, or the whole shard."""

    start: int
    data: ShardData
    tokens: np.ndarray  # int64 per-row tokens (row_tokens)
    packed_ids: IdRows | None = None  # the rows as packing ids (tokenized text), made on first use
    extra: dict = field(default_factory=dict)


def _take(values, rows: np.ndarray) -> list:
    """``[values[i] for i in rows]`` (``rows`` an int64 array), vectorised for `Utf8Rows`."""
    take = getattr(values, "take", None)
    if take is not None:
        return take(rows)
    return pick(values, rows.tolist())


def pick(values, rows: list[int]) -> list:
    """``[values[i] for i in rows]`` as one ``itemgetter`` call (no per-row bytecode)."""
    return list(operator.itemgetter(*rows)(values)) if len(rows) > 1 else [values[i] for i in rows]


def row_tokens(data: ShardData) -> np.ndarray:
    """Tokens per row of a decoded shard, as the stream counts them: the ids length, else the UTF-8
    byte count + 1 (what the byte tokenizer makes of it), else 0. int64 (rows,)."""
    if data.ids is not None:
        return IdRows.of(data.ids).lengths()
    if data.texts is not None:
        offsets = getattr(data.texts, "offsets", None)
        if offsets is not None:
            return (offsets[1:] - offsets[:-1]).astype(np.int64) + 1
        return np.fromiter((len(t.encode("utf-8")) + 1 for t in data.texts), dtype=np.int64, count=len(data.texts))
    return np.zeros(data.rows, dtype=np.int64)


class ItemSource:
    """Random access to the items of one source, with a small per-process cache of decoded units.

    Args:
        source: the opened source.
        seed: the stream seed (packing visits rows in a seeded order per epoch).
        seq_len: packed sequence length (items have seq_len + 1 tokens); None = sample mode.
        tokenizer: used in packing mode for text columns.
        cache_shards: decoded shards (or as many rows in row groups) kept per process and per
            partition it serves (``cursors``, set by the stream).
        shuffle: shuffle packing order (as the plan shuffles items).
        partitions: P; the source is cut into `slice_count` (a divisor of P) slices.
        ids_eos_id: end-of-document id appended to pre-tokenized rows in packing mode: that of the
            tokenizer that made the ids. Default: the tokenizer's ``eos_id`` for a user tokenizer,
            none for the byte tokenizer (its 256 is an ordinary id of other vocabularies).
        dtype: token dtype of packed and served ids; default the narrowest that holds this source's
            ids (`token_dtype`); the stream sets one for all its sources.
    """

    def __init__(
        self,
        source: Source,
        seed: int,
        seq_len: int | None,
        tokenizer: ByteTokenizer | CallableTokenizer,
        cache_shards: int = 2,
        shuffle: bool = True,
        *,
        partitions: int = 1,
        ids_eos_id=_DEFAULT,
        dtype=None,
    ):
        self.source = source
        self.seed = seed
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.cache_shards = cache_shards
        self.shuffle = shuffle
        self.key = stable_key(source.name)
        self._cache: OrderedDict = OrderedDict()  # decoded units and packed pieces, oldest first
        self._groups: dict[int, np.ndarray] = {}  # shard -> its units' first rows (tiny; never evicted)
        self._most_groups = 0  # the largest unit count of a shard in _groups (sizes the cache)
        self.raw_text = False  # texts as UTF-8 memoryviews (workers writing batches to shared memory)
        self.cursors = 1  # partitions this process serves: each keeps its own unit of this source cached
        if ids_eos_id is _DEFAULT:
            ids_eos_id = None if isinstance(tokenizer, ByteTokenizer) else tokenizer.eos_id
        self.eos_id = ids_eos_id if self.has_ids else tokenizer.eos_id
        self.dtype = np.dtype(dtype) if dtype is not None else token_dtype(self.max_id())
        self.shard_tokens = self._shard_tokens()
        self.set_partitions(int(partitions))
        if sum(self.items_per_shard) == 0:
            what = "rows" if seq_len is None else f"tokens for one sequence of {seq_len + 1}"
            raise SourceError(f"source {source.name!r} has no {what} (shards: {[s.path for s in source.shards][:3]}...)")

    def set_partitions(self, partitions: int) -> None:
        """Cut the source into `slice_count` slices for ``partitions`` partitions (sets ``layout``,
        ``items_per_shard``; reads the row token counts of cut shards in packing mode, once)."""
        self.layout, self._pieces = self._make_layout(int(partitions))
        self.items_per_shard = list(self.layout.items_per_shard)
        self._forget()

    def _forget(self) -> None:
        """Drop every cached unit, piece and row-group layout."""
        self._cache = OrderedDict()
        self._groups = {}
        self._most_groups = 0

    @property
    def total_items(self) -> int:
        """Items of the source without cuts (rows, or per-shard packed sequences)."""
        if self.seq_len is None:
            return sum(s.rows for s in self.source.shards)
        return sum(t // (self.seq_len + 1) for t in self.shard_tokens)

    # ----------------------------------------------------------------------------- sizes
    @property
    def has_ids(self) -> bool:
        """True when the source has a pre-tokenized ids column (packing then ignores text)."""
        return getattr(getattr(self.source, "columns", None), "ids", None) is not None

    @property
    def eos_extra(self) -> int:
        """Tokens packing adds per document (1 with an end-of-document id, else 0)."""
        return 0 if self.eos_id is None else 1

    def max_id(self) -> int | None:
        """The largest id this source can produce (None: unknown): from the vocabulary of the
        tokenizer that makes (or made) its ids, else from the ids column's stored integer type."""
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if self.has_ids and isinstance(self.tokenizer, ByteTokenizer):
            vocab = _stored_id_range(self.source)
        top = None if vocab is None else int(vocab) - 1
        if top is not None and self.eos_id is not None:
            top = max(top, int(self.eos_id))
        return top

    def _shard_tokens(self) -> list[int]:
        """Tokens per shard as packing counts them (end-of-document tokens included)."""
        shards = self.source.shards
        if isinstance(self.tokenizer, ByteTokenizer) and not self.has_ids:
            if all(s.tokens is not None for s in shards):
                return [int(s.tokens) for s in shards]
        if self.has_ids and all(s.tokens is not None for s in shards):
            return [int(s.tokens) + s.rows * self.eos_extra for s in shards]
        return self._count_tokens_by_tokenizing()

    def _count_tokens_by_tokenizing(self) -> list[int]:
        cached = self._load_cache("token_counts")
        out, changed = [], False
        from tqdm.auto import tqdm

        for i, shard in enumerate(tqdm(self.source.shards, desc=f"tokenizing {self.source.name}", disable=None)):
            key = f"{shard.sha256}:{self.tokenizer.fingerprint()}"
            if key not in cached:
                cached[key] = int(self._row_token_counts(i).sum())
                changed = True
            out.append(cached[key])
        if changed:
            self._save_cache("token_counts", cached)
        return out

    def _row_token_counts(self, shard: int) -> np.ndarray:
        """int64 per row: the tokens packing makes of each row of ``shard`` (EOS included)."""
        data = self.source.read_shard(shard)
        if data.ids is not None and self.has_ids:
            return IdRows.of(data.ids).lengths() + self.eos_extra
        if data.texts is None:
            raise SourceError(f"source {self.source.name!r} has neither a text nor an ids column to pack")
        return self.tokenizer.encode_rows(data.texts).lengths() + self.eos_extra

    def _cache_path(self, kind: str) -> str:
        root = os.environ.get("FASTMIX_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastmix_data")
        digest = hashlib.sha256(self.source.fingerprint().encode()).hexdigest()[:24]
        return os.path.join(root, kind, f"{digest}.json")

    def _load_cache(self, kind: str) -> dict:
        path = self._cache_path(kind)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _save_cache(self, kind: str, obj: dict) -> None:
        path = self._cache_path(kind)
        try:
            write_json_atomic(path, obj, indent=None, fsync=False)  # a cache: losing it costs a recount
        except OSError:  # a read-only cache only costs recomputing
            pass

    # ----------------------------------------------------------------------------- slices
    def _make_layout(self, partitions: int) -> tuple[SourceLayout, list[list[tuple[int, int, int, int, int]]]]:
        """The source's slices, and per shard its pieces (row lo, row hi, item lo, item hi, tokens)."""
        rows = [s.rows for s in self.source.shards]
        if self.seq_len is None:
            layout = SourceLayout.equal(rows, slice_count(sum(rows), partitions))
            if layout.count > 1 and _row_grouped(self.source):
                layout = self._by_row_group(layout)
            pieces = [[(0, n, 0, n, t)] for n, t in zip(rows, self.shard_tokens)]
            return layout, pieces
        width = self.seq_len + 1
        count = slice_count(sum(self.shard_tokens) // width, partitions)
        while True:
            cut_rows = self._token_cuts(count) if count > 1 else []
            layout, pieces = self._packed_layout(cut_rows, count, width)
            if count == 1 or layout.slice_sizes().min() > 0:
                return layout, pieces
            count //= 2  # a slice without one whole sequence (documents longer than a slice)

    def _by_row_group(self, layout: SourceLayout) -> SourceLayout:
        """``layout`` with every piece cut at its shard's row-group boundaries: an epoch of a slice then
        visits row groups in a shuffled order and rows within one in a shuffled order, so a partition
        needs one decoded row group of a source at a time (a process serving P / (W * R) partitions
        keeps that many, not as many whole shards)."""
        slices = []
        for pieces in layout.slices:
            out = []
            for piece in pieces:
                bounds = self._group_starts(piece.shard)
                cuts = [b for b in bounds.tolist() if piece.lo < b < piece.hi]
                edges = [piece.lo, *cuts, piece.hi]
                out += [Piece(piece.shard, a, b) for a, b in zip(edges[:-1], edges[1:])]
            slices.append(tuple(out))
        return SourceLayout(layout.items_per_shard, tuple(slices))

    def _token_cuts(self, count: int) -> list[tuple[int, int]]:
        """(shard, row) where each of the count - 1 cuts of equal token counts falls; cached."""
        key = f"{self.tokenizer.fingerprint()}:{self.eos_id}:{count}"
        cached = self._load_cache("slices")
        if key in cached:
            return [tuple(x) for x in cached[key]]
        tokens = np.asarray(self.shard_tokens, dtype=np.int64)
        ends = np.cumsum(tokens)
        cuts = []
        row_counts: dict[int, np.ndarray] = {}
        for x in equal_cuts(int(ends[-1]), count)[1:-1].tolist():
            shard = int(np.searchsorted(ends, x, side="right"))
            if shard >= len(tokens):
                cuts.append((len(tokens) - 1, self.source.shards[-1].rows))
                continue
            if shard not in row_counts:
                row_counts[shard] = np.concatenate([[0], np.cumsum(self._row_token_counts(shard))])
            local = x - int(ends[shard] - tokens[shard])
            cuts.append((shard, int(np.searchsorted(row_counts[shard], local, side="left"))))
        cached[key] = cuts
        for shard, counts in row_counts.items():  # remember the pieces' token counts too
            cached[f"{key}:{shard}"] = counts.tolist()
        self._save_cache("slices", cached)
        return cuts

    def _piece_tokens(self, shard: int, lo: int, hi: int, count: int, slices: dict) -> int:
        """Tokens of rows [lo, hi) of ``shard``, from ``slices`` (the loaded "slices" cache) when there."""
        if lo == 0 and hi == self.source.shards[shard].rows:
            return int(self.shard_tokens[shard])
        counts = slices.get(f"{self.tokenizer.fingerprint()}:{self.eos_id}:{count}:{shard}")
        if counts is None:
            counts = np.concatenate([[0], np.cumsum(self._row_token_counts(shard))]).tolist()
        return int(counts[hi] - counts[lo])

    def _packed_layout(self, cut_rows, count, width):
        per_slice: list[list[Piece]] = [[] for _ in range(count)]
        pieces: list[list[tuple[int, int, int, int, int]]] = []
        s = 0
        cuts = sorted(cut_rows)
        slices = self._load_cache("slices") if cuts else {}  # once, not per piece (a JSON file)
        for shard, info in enumerate(self.source.shards):
            lo, item = 0, 0
            mine: list[tuple[int, int, int, int, int]] = []
            while True:
                hi = info.rows
                if s < len(cuts) and cuts[s][0] == shard:
                    hi = min(max(cuts[s][1], lo), info.rows)
                tok = self._piece_tokens(shard, lo, hi, count, slices)
                n = tok // width
                if hi > lo or not mine:
                    mine.append((lo, hi, item, item + n, tok))
                    per_slice[s].append(Piece(shard, item, item + n))
                item += n
                lo = hi
                if s < len(cuts) and cuts[s][0] == shard:
                    s += 1
                    continue
                break
            pieces.append(mine)
        items = [p[-1][3] for p in pieces]
        return SourceLayout(tuple(items), tuple(tuple(x) for x in per_slice)), pieces

    # ----------------------------------------------------------------------------- reading
    def _group_starts(self, shard: int) -> np.ndarray:
        """int64: the first row of each unit of ``shard`` and its row count (units = row groups of a
        Parquet shard read as Arrow, else the whole shard)."""
        hit = self._groups.get(shard)
        if hit is None:
            rows = self.source.shards[shard].rows
            sizes = [rows]
            if _row_grouped(self.source):
                sizes = self.source.row_group_rows(shard)
            hit = self._groups[shard] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._most_groups = max(self._most_groups, len(hit) - 1)
        return hit

    def _units(self, shard: int, groups: list[int]) -> list[_Unit]:
        """The decoded units ``groups`` of ``shard``: cached ones, the rest read in one call."""
        starts = self._group_starts(shard)
        out: dict[int, _Unit] = {}
        missing = []
        for g in groups:
            hit = self._cache.get(("unit", shard, g, self.raw_text))
            if hit is None:
                missing.append(g)
            else:
                self._cache.move_to_end(("unit", shard, g, self.raw_text))
                out[g] = hit
        if missing:
            for g, data in zip(missing, self._read(shard, missing if len(starts) > 2 else None)):
                unit = _Unit(int(starts[g]), data, data.row_tokens if data.row_tokens is not None else row_tokens(data))
                self._remember(("unit", shard, g, self.raw_text), unit)
                out[g] = unit
        return [out[g] for g in groups]

    def _read(self, shard: int, groups: list[int] | None) -> list[ShardData]:
        """Decode row groups ``groups`` of a shard (None: the whole shard, as one unit). Texts come as
        UTF-8 memoryviews when ``raw_text`` and the shard is read as Arrow."""
        source = self.source
        if groups is None:
            if _arrow_readable(source):
                return [source.shard_from_table(shard, source.read_shard_table(shard), self.raw_text, native_ids=True)]
            return [source.read_shard(shard)]
        table = source.read_shard_table(shard, row_groups=groups)
        sizes = np.diff(self._group_starts(shard))[groups]
        out, at = [], 0
        for n in sizes.tolist():
            out.append(source.shard_from_table(shard, table.slice(at, n), self.raw_text, rows=n, native_ids=True))
            at += n
        return out

    def _remember(self, key, value) -> None:
        """Cache a decoded unit or packed piece; evict the least recently used beyond the limit
        (2 x cache_shards x the most units of a shard seen x the partitions served here)."""
        self._cache[key] = value
        limit = 2 * self.cache_shards * max(1, self._most_groups) * max(1, self.cursors)
        while len(self._cache) > limit:
            self._cache.popitem(last=False)

    def reads(self, shard: int, items: np.ndarray) -> tuple[int, ...] | None:
        """The row groups of ``shard`` that serving ``items`` of it reads (in any epoch; sample mode:
        the rows' groups; packing mode: the groups of the rows of the items' pieces), or None when
        the shard is read whole (formats without row groups, or a single row group). What the
        stream's prefetch asks a remote source for (`stream.batches.block_reads`)."""
        starts = self._group_starts(shard)
        if len(starts) == 2:
            return None
        items = np.asarray(items, dtype=np.int64)
        if self.seq_len is None:
            return tuple(np.unique(np.searchsorted(starts, items, side="right") - 1).tolist())
        pieces = self._pieces[shard]
        firsts = np.array([p[2] for p in pieces], dtype=np.int64)
        groups: set[int] = set()
        for piece in np.unique(np.searchsorted(firsts, items, side="right") - 1).tolist():
            groups.update(self._groups_of_rows(shard, pieces[piece][0], pieces[piece][1]))
        return tuple(sorted(groups))

    def _groups_of_rows(self, shard: int, lo: int, hi: int) -> range:
        """The units (row groups) of ``shard`` holding rows [lo, hi)."""
        starts = self._group_starts(shard)
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, max(hi - 1, lo), side="right")) - 1
        return range(first, last + 1)

    def gather(self, shard: int, items: np.ndarray) -> Gathered:
        """The rows ``items`` of ``shard`` and their token counts (sample mode, the stream's path):
        only the units (row groups) holding them are read."""
        starts = self._group_starts(shard)
        items = np.asarray(items, dtype=np.int64)
        if len(starts) == 2:
            return self._gather_unit(self._units(shard, [0])[0], items)
        group = np.searchsorted(starts, items, side="right") - 1
        order = np.argsort(group, kind="stable")
        wanted = np.unique(group).tolist()
        parts = [
            self._gather_unit(unit, items[order][group[order] == g])
            for g, unit in zip(wanted, self._units(shard, wanted))
        ]
        back = np.empty(len(items), dtype=np.int64)
        back[order] = np.arange(len(items))
        return _combine(parts, back)

    def _gather_unit(self, unit: _Unit, items: np.ndarray) -> Gathered:
        local = items - unit.start
        data = unit.data
        picks = local.tolist() if data.extra else []
        ids = None
        if data.ids is not None:
            ids = IdRows.of(data.ids).take(local)
            ids.values = narrow(ids.values, self.dtype, f"source {self.source.name!r}")
        return Gathered(
            texts=None if data.texts is None else _take(data.texts, local),
            ids=ids,
            extra={k: [v[i] for i in picks] for k, v in data.extra.items()},
            tokens=unit.tokens[local],
        )

    def rows(self, shard: int, items: np.ndarray) -> ShardData:
        """The rows ``items`` of ``shard`` (sample mode): texts, ids (one array per row), extra."""
        got = self.gather(shard, items)
        return ShardData(texts=got.texts, ids=None if got.ids is None else list(got.ids), extra=got.extra)

    # ----------------------------------------------------------------------------- packing
    def _piece_rows(self, shard: int, lo: int, hi: int) -> list[IdRows]:
        """Rows [lo, hi) of ``shard`` as packing ids (pre-tokenized ids, else the tokenizer's): one
        `IdRows` per row group, views of the cached units (`pack` reads them in place)."""
        parts = []
        for unit in self._units(shard, list(self._groups_of_rows(shard, lo, hi))):
            ids = self._unit_ids(unit)
            n = len(ids)
            a, b = max(lo - unit.start, 0), min(hi - unit.start, n)
            parts.append(ids if (a, b) == (0, n) else ids.slice(a, b))
        return parts

    def _unit_ids(self, unit: _Unit) -> IdRows:
        if unit.packed_ids is None:
            data = unit.data
            if self.has_ids and data.ids is not None:
                rows = IdRows.of(data.ids)
            elif data.texts is not None:
                rows = self.tokenizer.encode_rows(data.texts)
            else:
                raise SourceError(f"source {self.source.name!r} has neither a text nor an ids column to pack")
            where = f"a row group of source {self.source.name!r}"
            unit.packed_ids = IdRows(narrow(rows.values, self.dtype, where), rows.offsets)
        return unit.packed_ids

    def _packed(self, epoch: int, shard: int, piece: int) -> tuple[np.ndarray, np.ndarray]:
        key = ("packed", epoch, shard, piece)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        lo, hi, _, _, tokens = self._pieces[shard][piece]
        rows = self._piece_rows(shard, lo, hi)
        whole = (lo, hi) == (0, self.source.shards[shard].rows)
        if not self.shuffle:
            order = np.arange(hi - lo)
        elif whole:
            order = _permutation(hi - lo, self.seed, self.key, epoch, shard + 1, PACK_TAG)
        else:
            order = _permutation(hi - lo, self.seed, self.key, epoch, shard + 1, PACK_TAG, lo + 1)
        packed = pack(rows, np.asarray(order), self.eos_id, self.dtype)
        if len(packed[0]) != tokens:
            raise SourceError(
                f"source {self.source.name!r}: shard {self.source.shards[shard].path} rows {lo}..{hi} have "
                f"{len(packed[0])} tokens but its index says {tokens}; the shard changed since it was "
                "indexed — reopen the source to re-index it"
            )
        self._remember(key, packed)
        self._drop_superseded(epoch, shard, piece)
        return packed

    def _drop_superseded(self, epoch: int, shard: int, piece: int) -> None:
        """Uncache the packed piece's epochs before ``epoch`` - 1: served (epochs advance; the
        partitions sharing a slice may be one apart), and their memory is reused for the next ones."""
        for key in [k for k in self._cache if k[0] == "packed" and k[2:] == (shard, piece) and k[1] < epoch - 1]:
            del self._cache[key]

    def sequences(self, epoch: int, shard: int, items: np.ndarray, out=None) -> tuple[np.ndarray, np.ndarray]:
        """Packed sequences ``items`` of ``shard`` in ``epoch``: (ids [n, L+1] in ``dtype``,
        doc_start [n, L+1]). With ``out = (ids, doc_start, rows)`` they are written to
        ``ids[rows]``, ``doc_start[rows]`` instead (no intermediate arrays), and those are returned."""
        pieces = self._pieces[shard]
        width = self.seq_len + 1
        items = np.asarray(items, dtype=np.int64)
        if out is None:
            if len(pieces) == 1:
                return sequences(*self._packed(epoch, shard, 0), width, items)
            out = (np.empty((len(items), width), dtype=self.dtype), np.empty((len(items), width), dtype=bool), None)
        ids, starts, rows = out
        if len(pieces) == 1:
            ids[rows], starts[rows] = sequences(*self._packed(epoch, shard, 0), width, items)
            return ids, starts
        firsts = np.array([p[2] for p in pieces], dtype=np.int64)
        which = np.searchsorted(firsts, items, side="right") - 1
        rows = np.arange(len(items)) if rows is None else np.asarray(rows)
        for piece in np.unique(which).tolist():
            m = which == piece
            ids[rows[m]], starts[rows[m]] = sequences(*self._packed(epoch, shard, piece), width, items[m] - firsts[piece])
        return ids, starts

    def mean_tokens_per_item(self) -> float:
        """Mean tokens per item (for weights in token units in sample mode)."""
        if self.seq_len is not None:
            return float(self.seq_len + 1)
        return sum(self.shard_tokens) / max(1, sum(self.items_per_shard))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_cache=OrderedDict(), _groups={}, _most_groups=0)
        return state


def _combine(parts: list[Gathered], back: np.ndarray) -> Gathered:
    """Gathered parts (grouped by unit) put back in the order of the items asked for."""
    order = back.tolist()
    texts = None
    if parts[0].texts is not None:
        flat = [t for p in parts for t in p.texts]
        texts = pick(flat, order)
    ids = None
    if parts[0].ids is not None:
        ids = IdRows.concat([p.ids for p in parts]).take(back)
    extra = {k: pick([v for p in parts for v in p.extra[k]], order) for k in parts[0].extra}
    tokens = np.concatenate([p.tokens for p in parts])[back]
    return Gathered(texts, ids, extra, tokens)


def _row_grouped(source) -> bool:
    """Whether the stream reads ``source`` by row group (Parquet shards read as Arrow, local or remote:
    `ShardedSource.read_shard_table(row_groups=...)`)."""
    return hasattr(getattr(source, "reader", None), "read_row_groups") and _arrow_readable(source)


def _arrow_readable(source) -> bool:
    return hasattr(source, "read_shard_table") and hasattr(source.reader, "read_table") and not source.columns.extra


def _stored_id_range(source) -> int | None:
    """One past the largest id the ids column's stored integer type can hold, when that is at most
    2**16 (Parquet shards, local or remote: the first shard's schema from its footer); None otherwise
    (unknown: 32-bit ids, range-checked on read)."""
    schema = getattr(getattr(source, "reader", None), "schema", None)
    if source.format != "parquet" or not source.shards or schema is None:
        return None
    import pyarrow as pa

    try:
        field = schema(source.shards[0].path).field(source.columns.ids)
    except (OSError, KeyError, ValueError):
        return None
    value = getattr(field.type, "value_type", None)
    if value is None or not (value.bit_width <= 16):
        return None
    return 1 << (value.bit_width - (1 if pa.types.is_signed_integer(value) else 0))
