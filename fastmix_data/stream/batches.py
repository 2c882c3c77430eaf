"""Batches of a planned block: reading each shard once per block, and the packed batch format.

A *packed* batch is what a worker builds and sends: numpy arrays and lists, with the integer rows in
one ``_meta`` array (rows `META_KEYS`), per-source counts in ``_counts``, token ids in the stream's
narrow dtype (uint16/uint32): ``tokens`` [B, L+1] in packing mode, ``_ids`` = (flat ids, row lengths)
in sample mode. `unpack` makes the user-facing batch of tensors in the training process and widens
the ids to int64 there (unless the stream keeps them narrow).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch

from fastmix_data.plan.planner import PlanSlice
from fastmix_data.sources.base import IdRows
from fastmix_data.stream.items import ItemSource, pick

META_KEYS = ("source", "shard", "item", "epoch", "num_tokens")  # the rows of a packed batch's "_meta"


def build(
    items: Sequence[ItemSource], sl: PlanSlice, batch_indices: Sequence[int], size: int, seq_len: int | None,
    dtype: np.dtype, own: bool = True,
) -> list[dict]:  # fmt: skip
    """Packed batches of ``size`` consecutive items of ``sl``, one per batch index.

    Items are read grouped by (source, epoch, shard) over the whole block, so per-batch work is
    slicing. Each batch owns its arrays (copies of its slice of the block), so a batch that crosses
    processes carries itself, not its block; unless not ``own``: then its token arrays are views of
    the block's (for a batch that is copied into shared memory or pickled before it is used).
    """
    n = len(batch_indices) * size
    if n == 0:
        return []
    meta = np.empty((5, n), dtype=np.int64)  # source, shard, item, epoch, num_tokens
    meta[0], meta[1], meta[2], meta[3] = sl.source[:n], sl.shard[:n], sl.item[:n], sl.epoch[:n]
    version = sl.version[:n].reshape(-1, size).max(axis=1).tolist()
    order, groups = groups_of(meta[0], meta[3], meta[1])
    columns: dict[str, list] = {}
    ids: IdRows | None = None
    if seq_len is not None:
        tokens = np.empty((n, seq_len + 1), dtype=dtype)
        starts = np.empty((n, seq_len + 1), dtype=bool)
        for (src, epoch, shard), idx in groups:
            items[src].sequences(epoch, shard, meta[2, idx], out=(tokens, starts, idx))
        meta[4] = seq_len + 1
    else:
        picked = [(idx, items[src].gather(shard, meta[2, idx])) for (src, _epoch, shard), idx in groups]
        for idx, rows in picked:
            meta[4, idx] = rows.tokens
        columns = columns_in_order(picked, n, order)
        ids = ids_in_order(picked, n, order, dtype)
    counts = per_batch_counts(meta, size, max(len(items), 1))
    out = []
    for j, g in enumerate(batch_indices):
        lo, hi = j * size, (j + 1) * size
        batch: dict[str, Any] = {"_meta": meta[:, lo:hi].copy(), "_counts": counts[j], "batch_index": g,
                                 "weight_version": version[j]}  # fmt: skip
        if seq_len is not None:
            batch["tokens"], batch["doc_start"] = (tokens[lo:hi].copy(), starts[lo:hi].copy()) if own else \
                (tokens[lo:hi], starts[lo:hi])  # fmt: skip
        for key, col in columns.items():
            batch[key] = col[lo:hi]
        if ids is not None:
            part = ids.slice(lo, hi)
            batch["_ids"] = (part.values.copy(), part.lengths())
        out.append(batch)
    return out


def block_reads(items: Sequence[ItemSource], sl: PlanSlice, sources: Collection[int]) -> dict[int, list[tuple]]:
    """What building the batches of ``sl`` reads from each of ``sources`` (indices): per source,
    ``(shard, row groups or None for the whole shard)`` per shard, in the order `build` reads them
    (its groups' order). The stream's prefetch asks remote sources for these
    (:func:`fastmix_data.storage.prefetch.prefetch_block`)."""
    if not len(sl.position):
        return {}
    _, groups = groups_of(sl.source, sl.epoch, sl.shard)
    per_shard: dict[tuple[int, int], list[np.ndarray]] = {}
    for (src, _epoch, shard), idx in groups:
        if src in sources:
            per_shard.setdefault((src, shard), []).append(sl.item[idx])
    out: dict[int, list[tuple]] = {}
    for (src, shard), parts in per_shard.items():
        out.setdefault(src, []).append((shard, items[src].reads(shard, np.concatenate(parts))))
    return out


def groups_of(source: np.ndarray, epoch: np.ndarray, shard: np.ndarray):
    """Positions grouped by (source, epoch, shard): (order, [((src, epoch, shard), positions)]).

    Groups come in the order of their first position, which is the order a source visits its
    shards, so a small LRU shard cache keeps the shard a block ends in for the next block; ``order``
    is the groups' positions concatenated. One int64 key per position, sorted once."""
    key = (source << 52) | (epoch << 32) | shard  # sources < 2^11, epochs < 2^20, shards < 2^32
    by_key = np.argsort(key, kind="stable")
    cuts = np.flatnonzero(np.diff(key[by_key])) + 1
    parts = np.split(by_key, cuts)
    parts.sort(key=lambda idx: int(idx[0]))
    groups = []
    for idx in parts:
        k = int(key[idx[0]])
        groups.append(((k >> 52, (k >> 32) & 0xFFFFF, k & 0xFFFFFFFF), idx))
    return np.concatenate(parts), groups


def _inverse(order: np.ndarray, n: int) -> np.ndarray:
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    return inverse


def columns_in_order(picked: list, n: int, order: np.ndarray) -> dict[str, list]:
    """Per list column (text, extra columns), the gathered rows of every group in position order.

    ``picked`` holds (positions, Gathered) per group, groups in the order of ``order`` (the sorted
    positions), so concatenating the groups gives the values at order[0], order[1], ..."""
    back = _inverse(order, n).tolist()
    columns: dict[str, list] = {}
    parts = [(idx, rows.texts) for idx, rows in picked]
    if not all(p is None for _, p in parts):
        # a source without the column contributes None for its rows
        flat = list(itertools.chain.from_iterable(p if p is not None else [None] * len(idx) for idx, p in parts))
        columns["text"] = pick(flat, back)
    extra_keys = list(dict.fromkeys(k for _, rows in picked for k in rows.extra))
    for key in extra_keys:
        flat = list(itertools.chain.from_iterable(rows.extra.get(key, [None] * len(idx)) for idx, rows in picked))
        columns[key] = pick(flat, back)
    return columns


def ids_in_order(picked: list, n: int, order: np.ndarray, dtype: np.dtype) -> IdRows | None:
    """The gathered ids rows of every group in position order (rows of sources without ids are
    empty), as one `IdRows` in ``dtype``; None when no source has ids."""
    if all(rows.ids is None for _, rows in picked):
        return None
    empty = np.zeros(0, dtype=dtype)
    parts = [
        rows.ids if rows.ids is not None else IdRows(empty, np.zeros(len(idx) + 1, dtype=np.int64))
        for idx, rows in picked
    ]
    return IdRows.concat(parts).take(_inverse(order, n))


def per_batch_counts(meta: np.ndarray, size: int, k: int, tokens_row: int = 4) -> np.ndarray:
    """int64 (batches, 2, k): per batch of ``size`` consecutive columns of ``meta`` and per source,
    the number of items and their tokens (row 0 of ``meta``: source ids, ``tokens_row``: tokens)."""
    nb = meta.shape[1] // size
    cell = meta[0, : nb * size] + k * np.repeat(np.arange(nb), size)
    samples = np.bincount(cell, minlength=nb * k).reshape(nb, k)
    tokens = np.bincount(cell, weights=meta[tokens_row, : nb * size], minlength=nb * k).reshape(nb, k)
    return np.stack([samples, tokens.astype(np.int64)], axis=1)


def _tensor(array: np.ndarray, widen: bool) -> torch.Tensor:
    if widen and array.dtype.kind == "u":
        array = array.astype(np.int64)
    return torch.from_numpy(array)


def unpack(packed: dict, widen: bool = True) -> tuple[dict, np.ndarray]:
    """A packed batch as the user-facing batch of tensors, and its per-source counts (``_counts``,
    see `per_batch_counts`). The integer rows are views of one tensor (one storage per batch); token
    ids become int64 when ``widen`` (else they stay uint16/uint32)."""
    batch = dict(packed)
    meta = batch.pop("_meta")
    counts = batch.pop("_counts")
    batch.update(zip(META_KEYS, torch.from_numpy(meta).unbind(0)))
    if "tokens" in batch:
        batch["tokens"] = _tensor(batch["tokens"], widen)
    if "doc_start" in batch:
        batch["doc_start"] = torch.from_numpy(batch["doc_start"])
    if "_ids" in batch:
        flat, lengths = batch.pop("_ids")
        batch["input_ids"] = list(_tensor(flat, widen).split(lengths.tolist()))
    return batch, counts
