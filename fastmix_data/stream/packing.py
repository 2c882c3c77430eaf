"""Packing: documents back to back in one token array, vectorised (no per-token Python).

A piece of a shard is packed per epoch: its rows in a seeded order, each followed by the
end-of-document id of the tokenizer that made the ids (none when it has none), concatenated; the
array is then cut into ``seq_len + 1``-token sequences and the tail shorter than that is dropped.
``doc_start`` marks the first token of every document whether or not an end-of-document id exists.
"""

from __future__ import annotations

import numpy as np

from fastmix_data.errors import SourceError
from fastmix_data.sources.base import IdRows

SHORT_DOCS = 16  # below this many tokens per document on average, gather with one index array


def narrow(values: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """``values`` as ``dtype`` (unchanged when it already is); ids outside its range are an error.

    Raises:
        SourceError: naming ``where`` and the offending id."""
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return values
    if len(values) and values.dtype != np.uint8:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > np.iinfo(dtype).max:
            bad = lo if lo < 0 else hi
            raise SourceError(
                f"{where} has token id {bad}, outside 0..{np.iinfo(dtype).max} ({dtype}); pass the tokenizer "
                "that made the ids (its vocab_size decides the id type), or fix the ids"
            )
    return values.astype(dtype)


def pack(parts: IdRows | list[IdRows], order: np.ndarray, eos: int | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``order`` of ``parts`` back to back, each followed by ``eos`` (if not None).

    ``parts``: the rows as one `IdRows`, or as several (row groups of a piece: the rows of all of
    them in turn, indexed from 0 across them), which are read in place, never concatenated first.

    Returns:
        (ids as ``dtype`` (T,), doc_start bool (T,)): T = sum of the rows' lengths (+1 each with eos).
    """
    dtype = np.dtype(dtype)
    parts = [parts] if isinstance(parts, IdRows) else list(parts)
    order = np.asarray(order, dtype=np.int64)
    starts, lengths, which = _row_table(parts, order)
    extra = 0 if eos is None else 1
    sizes = lengths + extra
    bounds = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    total = int(bounds[-1])
    doc_start = np.zeros(total, dtype=bool)
    doc_start[bounds[:-1][sizes > 0]] = True
    out = np.empty(total, dtype=dtype)
    if total == 0:
        return out, doc_start
    values = [p.values if p.values.dtype == dtype else p.values.astype(dtype) for p in parts]
    if total < SHORT_DOCS * max(len(order), 1):
        for k, vals in enumerate(values):
            mine = slice(None) if len(values) == 1 else which == k
            _gather_rows(vals, starts[mine], lengths[mine], bounds[:-1][mine], out)
        if extra:
            out[bounds[1:] - 1] = eos
        return out, doc_start
    begin, end, part = starts.tolist(), (starts + lengths).tolist(), which.tolist()
    if extra:
        tail = np.array([eos], dtype=dtype)
        pieces = [x for k, a, b in zip(part, begin, end) for x in (values[k][a:b], tail)]
    else:
        pieces = [values[k][a:b] for k, a, b in zip(part, begin, end)]
    np.concatenate(pieces, out=out)
    return out, doc_start


def _row_table(parts: list[IdRows], order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows ``order`` (indices across ``parts``): start in its part's values, length, part index."""
    if len(parts) == 1:
        offsets = parts[0].offsets
        starts = offsets[order]
        return starts, offsets[order + 1] - starts, np.zeros(len(order), dtype=np.int64)
    starts = np.concatenate([p.offsets[:-1] for p in parts])[order]
    lengths = np.concatenate([p.lengths() for p in parts])[order]
    which = np.repeat(np.arange(len(parts), dtype=np.int64), [len(p) for p in parts])[order]
    return starts, lengths, which


def _gather_rows(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
    """``out[dest[i] : dest[i] + lengths[i]] = values[starts[i] : starts[i] + lengths[i]]`` for every i,
    with two index arrays (short rows: cheaper than one slice per row)."""
    heads = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=heads[1:])
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(heads, lengths)
    out[np.repeat(dest, lengths) + within] = values[np.repeat(starts, lengths) + within]


def sequences(ids: np.ndarray, doc_start: np.ndarray, width: int, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequences ``items`` (indices) of a packed array cut into rows of ``width`` tokens."""
    n = len(ids) // width
    return ids[: n * width].reshape(n, width)[items], doc_start[: n * width].reshape(n, width)[items]
