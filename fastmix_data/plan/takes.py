"""Which items of each piece a slice's draws have taken: the closed form behind manifests (pure).

A slice of N items is shared by m partitions; the partition with offset q has drawn D_q times, i.e.
slice indices {q, q + m, ..., q + (D_q - 1) m}. Index x is item x mod N of epoch x // N, and an
epoch visits the slice's pieces in its own shuffled order, so the epochs below min_q(X_q // N) with
X_q = D_q m + q are whole (every item once) and only the few epochs after that need counting, per
piece and per sharer, by arithmetic on the index ranges: O(#pieces * #partial epochs * m).
"""

from __future__ import annotations

import numpy as np

from fastmix_data.plan.order import SourceOrder


def _count_below(limit: np.ndarray, q: np.ndarray, m: int) -> np.ndarray:
    """#{x < limit : x = q mod m, x >= 0} elementwise (broadcasting)."""
    return np.maximum(0, (limit - q + m - 1) // m)


def slice_takes(order: SourceOrder, m: int, qs: np.ndarray, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items taken from each piece of ``order`` and epochs touching it.

    Args:
        order: the slice's order (its pieces and their sizes).
        m: partitions sharing the slice.
        qs: int64: each sharer's offset q (0 <= q < m).
        draws: int64: each sharer's draw count D_q.

    Returns:
        (take, epochs) per piece: items served (over all epochs), and the number of epochs that
        served at least one item of the piece (the most times any one item of it was served).
    """
    sizes = order.sizes
    take = np.zeros(len(sizes), dtype=np.int64)
    epochs = np.zeros(len(sizes), dtype=np.int64)
    n = int(order.total)
    qs, draws = np.asarray(qs, dtype=np.int64), np.asarray(draws, dtype=np.int64)
    if n == 0 or len(qs) == 0 or int(draws.max(initial=0)) == 0:
        return take, epochs
    stop = draws * m + qs  # sharer q has served exactly its indices below stop_q
    whole = int((stop // n).min())
    take += whole * sizes
    epochs[sizes > 0] = whole
    last = int(-(-int(stop.max()) // n))
    for e in range(whole, last):
        visit = order.shard_order(e)
        ends = np.cumsum(sizes[visit]) + e * n
        begins = ends - sizes[visit]
        hi = np.minimum(ends[:, None], stop[None, :])
        got = np.where(hi > begins[:, None], _count_below(hi, qs[None, :], m) - _count_below(begins[:, None], qs[None, :], m), 0)
        served = got.sum(axis=1)
        take[visit] += served
        epochs[visit] += served > 0
    return take, epochs
