"""One partition's weight segments: the weight history and the exhaustion policies in local positions.

A partition serves its own local sequence (see :mod:`fastmix_data.plan.partition`). Each weight
change of the global history starts a segment of that sequence at the partition's first item at or
after the change; inside it, the partition's items follow the low-discrepancy schedule of the
segment's weights (:mod:`fastmix_data.plan.schedule`) from schedule position ``base`` on, where
``base`` is the partition's offset in the segment's sliding rounds (`Partitioning.segment_offset`).
Exhaustion policies are applied per partition, to its own share of each source's items: when a
capped source would exceed the partition's allowance, a *derived* segment starts there, with that
source removed and the others renormalised, on a fresh schedule (base 0); a "stop" source ends the
partition, and with it the stream. Derived segments depend only on what precedes them, so they are
recomputed, not stored: O(#changes * K log N) per partition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastmix_data.plan.schedule import first_position_reaching, prefix_counts


@dataclass(frozen=True)
class Segment:
    """A run of one partition's local positions [start, end) under one weight vector (end None = open).

    Attributes:
        weights: per source, normalised (sources removed by exhaustion have 0).
        version: the weight-history version that produced it.
        draws_before: int64 (K,): the partition's draws per source before ``start``.
        base: schedule position of ``start``; local position l is schedule position
            ``base + l - start``.
        base_counts: int64 (K,): ``prefix_counts(weights, base)`` (draws the schedule makes before
            ``base``, which belong to other partitions' rounds).
    """

    start: int
    end: int | None
    weights: np.ndarray
    version: int
    draws_before: np.ndarray
    base: int = 0
    base_counts: np.ndarray | None = None

    def draws_at(self, local: int) -> np.ndarray:
        """The partition's draws per source before local position ``local`` (start <= local <= end)."""
        return self.draws_before + prefix_counts(self.weights, self.base + local - self.start) - self.counts0

    @property
    def counts0(self) -> np.ndarray:
        return self.base_counts if self.base_counts is not None else np.zeros(len(self.weights), dtype=np.int64)


@dataclass(frozen=True)
class GlobalSegment:
    """A run of global positions [start, end) of the weight history (end None = open)."""

    start: int
    end: int | None
    weights: tuple[float, ...]
    version: int


def derive_segments(
    spans: Sequence[tuple[int, int | None, int, GlobalSegment]],
    caps: Sequence[int | None],
    stop: Sequence[bool],
    totals: np.ndarray,
) -> tuple[list[Segment], int | None]:
    """A partition's segments, and the local position where it ends (None: never).

    Args:
        spans: per global segment that reaches this partition, (local start, local end or None,
            schedule offset ``base``, the global segment).
        caps: per source, the most draws this partition may take (None: no limit, ``repeat``).
        stop: per source, True when reaching its cap ends the stream (``stop``) rather than
            dropping the source (``cap``, ``drop``).
        totals: per source, items in this partition's slice (0: never drawn).
    """
    k = len(caps)
    draws = np.zeros(k, dtype=np.int64)
    dropped = np.zeros(k, dtype=bool)
    segs: list[Segment] = []
    for start, stop_at, base, glob in spans:
        while True:
            w = shares(np.where(dropped | (totals == 0), 0.0, np.asarray(glob.weights, dtype=np.float64)))
            if w is None:
                return segs, start
            span = None if stop_at is None else stop_at - start
            counts0 = prefix_counts(w, base)
            hit = first_exhaustion(w, draws, caps, span, base, counts0)
            if hit is None:
                segs.append(Segment(start, stop_at, w, glob.version, draws.copy(), base, counts0))
                if span is not None:
                    draws = draws + prefix_counts(w, base + span) - counts0
                break
            local, src = hit
            if local > 0:
                segs.append(Segment(start, start + local, w, glob.version, draws.copy(), base, counts0))
                draws = draws + prefix_counts(w, base + local) - counts0
            start, base = start + local, 0
            if stop[src]:
                return segs, start
            dropped[src] = True
    return segs, None


def shares(w: np.ndarray) -> np.ndarray | None:
    """``w / w.sum()`` (None when the sum is 0), scaled by the maximum first when the sum overflows."""
    with np.errstate(over="ignore"):
        total = w.sum()
    if not total > 0:
        return None
    if not math.isfinite(total):
        w = w / w.max()
        total = w.sum()
    return w / total


def first_exhaustion(
    w: np.ndarray,
    draws: np.ndarray,
    caps: Sequence[int | None],
    span: int | None,
    base: int,
    counts0: np.ndarray,
) -> tuple[int, int] | None:
    """(local offset, source) of the first position, within ``span`` of a segment starting at
    schedule position ``base``, that would draw a source past its cap; None if none does."""
    best: tuple[int, int] | None = None
    for src, cap in enumerate(caps):
        if cap is None or w[src] <= 0:
            continue
        remaining = cap - int(draws[src])
        want = remaining + 1 + int(counts0[src])  # schedule count at which the cap is exceeded
        hi = base + (span if span is not None else int(math.ceil((remaining + 1) / w[src] + len(w) + 2)))
        reach = first_position_reaching(w, src, want, hi)
        if reach is None:
            continue
        local = reach - 1 - base
        if best is None or local < best[0]:
            best = (local, src)
    return best


def locate_segments(segs: list[Segment], local: np.ndarray) -> np.ndarray:
    """Index of the segment holding each local position (positions past the last segment's end get
    the last index; callers cut them off at the partition's end)."""
    starts = np.array([s.start for s in segs], dtype=np.int64)
    return np.maximum(np.searchsorted(starts, local, side="right") - 1, 0)
