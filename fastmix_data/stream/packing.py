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


def pack(rows: IdRows, order: np.ndarray, eos: int | None, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``order`` of ``rows`` back to back, each followed by ``eos`` (if not None).

    Returns:
        (ids as ``dtype`` (T,), doc_start bool (T,)): T = sum of the rows' lengths (+1 each with eos).
    """
    dtype = np.dtype(dtype)
    starts = rows.offsets[order]
    lengths = rows.offsets[order + 1] - starts
    extra = 0 if eos is None else 1
    sizes = lengths + extra
    bounds = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    total = int(bounds[-1])
    doc_start = np.zeros(total, dtype=bool)
    doc_start[bounds[:-1][sizes > 0]] = True
    values = rows.values if rows.values.dtype == dtype else rows.values.astype(dtype)
    if total == 0:
        return np.zeros(0, dtype=dtype), doc_start
    if total < SHORT_DOCS * max(len(order), 1):
        src = np.repeat(starts - bounds[:-1], sizes) + np.arange(total, dtype=np.int64)
        out = values[np.minimum(src, max(len(values) - 1, 0))] if len(values) else np.zeros(total, dtype=dtype)
        if extra:
            out[bounds[1:] - 1] = eos
        return out, doc_start
    begin, end = starts.tolist(), (starts + lengths).tolist()
    if extra:
        tail = np.array([eos], dtype=dtype)
        parts = [x for a, b in zip(begin, end) for x in (values[a:b], tail)]
    else:
        parts = [values[a:b] for a, b in zip(begin, end)]
    return np.concatenate(parts), doc_start


def sequences(ids: np.ndarray, doc_start: np.ndarray, width: int, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sequences ``items`` (indices) of a packed array cut into rows of ``width`` tokens."""
    n = len(ids) // width
    return ids[: n * width].reshape(n, width)[items], doc_start[: n * width].reshape(n, width)[items]
