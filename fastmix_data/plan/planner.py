"""The mixture plan: (seed, sources, weight history, exhaustion policies, position) -> item.

This is the single function behind online serving, offline resampling and offline manifest
generation. It does no I/O and knows nothing of torch: sources are given as item counts per shard.

The weight history is a list of :class:`WeightChange` (global item position where the change takes
effect, and weights in item units). Exhaustion policies turn into further, derived changes: a
capped source that has served its last allowed draw is removed and the others renormalised from the
next position on; a "stop" source ends the stream there. Derived segments depend only on the history
before them, so they are recomputed, not stored (O(#changes * K log N)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fastmix_data.plan.order import SourceOrder, stable_key
from fastmix_data.plan.schedule import first_position_reaching, prefix_counts, schedule_range

POLICIES = ("repeat", "cap", "drop", "stop")
COVER_FACTOR = 8  # plan_ranges schedules the covering span when it is at most this many times the items


@dataclass(frozen=True)
class WeightChange:
    """One entry of the weight history.

    Attributes:
        version: 0 for the initial weights, then 1, 2, ... per `set_weights`.
        position: global item position (sample or packed sequence) where it takes effect.
        weights: per source, in item units, normalised to sum 1 (zeros allowed).
    """

    version: int
    position: int
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Exhaustion:
    """What a source does when its items run out.

    Attributes:
        policy: "repeat" (new shuffled epoch, forever; default), "cap" (at most max_epochs epochs,
            then drop), "drop" (one epoch, then drop and renormalise the others), "stop" (the whole
            stream ends when this source has served max_epochs epochs, default 1).
        max_epochs: epochs allowed for "cap" and "stop".
    """

    policy: str = "repeat"
    max_epochs: int | None = None

    def limit_epochs(self) -> int | None:
        if self.policy == "repeat":
            return None
        if self.policy == "drop":
            return 1
        return self.max_epochs if self.max_epochs is not None else 1

    def validate(self, source: str) -> None:
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(f"source {source!r}: unknown exhaustion policy {self.policy!r}; use one of {POLICIES}")
        if self.max_epochs is not None and (
            not isinstance(self.max_epochs, int) or isinstance(self.max_epochs, bool) or self.max_epochs < 1
        ):
            raise ValueError(f"source {source!r}: max_epochs must be an integer >= 1, got {self.max_epochs!r}")

    @classmethod
    def of(cls, spec: object, source: str, error: type[Exception] = ValueError) -> Exhaustion:
        """The policy of ``spec``: None (repeat), a policy name, ``{"policy", "max_epochs"}`` or an
        `Exhaustion`; validated. Raises ``error`` naming the source (the caller's error class)."""
        if spec is None:
            return cls()
        if isinstance(spec, Exhaustion):
            out = spec
        elif isinstance(spec, str):
            out = cls(spec)
        elif isinstance(spec, Mapping):
            out = cls(spec.get("policy", "repeat"), spec.get("max_epochs"))
        else:
            raise error(f"source {source!r}: exhaustion must be a policy name or {{'policy', 'max_epochs'}}, got {spec!r}")
        try:
            out.validate(source)
        except ValueError as exc:
            raise error(str(exc)) from None
        return out


@dataclass(frozen=True)
class Segment:
    """A run of positions [start, end) served under one weight vector (end None = open)."""

    start: int
    end: int | None
    weights: np.ndarray
    version: int
    draws_before: np.ndarray  # int64 (K,): draws per source before `start`


@dataclass
class PlanSlice:
    """Planned items for a range of positions. All arrays int64 of equal length."""

    position: np.ndarray
    source: np.ndarray
    draw: np.ndarray
    epoch: np.ndarray
    shard: np.ndarray
    item: np.ndarray
    version: np.ndarray
    ended: bool = False  # the stream ends inside (or at the start of) the requested range


@dataclass
class MixturePlan:
    """Pure planner over K sources.

    Args:
        names: source names, in the stream's source order.
        items_per_shard: per source, items (rows or packed sequences) in each shard.
        seed: the stream seed.
        history: weight changes sorted by position; the first at position 0.
        policies: per source exhaustion policy (default repeat).
        shuffle: shuffle shards and items (False: file order, for debugging and manifests).
        limit: total items the stream serves (a budget), None = unbounded.
    """

    names: list[str]
    items_per_shard: list[list[int]]
    seed: int
    history: list[WeightChange]
    policies: list[Exhaustion] = field(default_factory=list)
    shuffle: bool = True
    limit: int | None = None

    def __post_init__(self) -> None:
        k = len(self.names)
        if not self.policies:
            self.policies = [Exhaustion() for _ in range(k)]
        for name, pol in zip(self.names, self.policies):
            pol.validate(name)
        self.orders = [SourceOrder(n, s, self.seed, self.shuffle) for n, s in zip(self.names, self.items_per_shard)]
        self.totals = np.array([o.total for o in self.orders], dtype=np.int64)
        self._segments: list[Segment] | None = None
        self.end: int | None = None

    # ----------------------------------------------------------------------------- segments
    def with_history(self, history: list[WeightChange]) -> None:
        """Replace the weight history (derived segments are recomputed lazily)."""
        self.history = list(history)
        self._segments = None

    def segments(self) -> list[Segment]:
        if self._segments is None:
            self._segments, self.end = self._derive_segments()
            if self.limit is not None:
                self.end = self.limit if self.end is None else min(self.end, self.limit)
        return self._segments

    def _derive_segments(self) -> tuple[list[Segment], int | None]:
        k = len(self.names)
        limits = [
            None if p.limit_epochs() is None else p.limit_epochs() * int(t)
            for p, t in zip(self.policies, self.totals)
        ]
        draws = np.zeros(k, dtype=np.int64)
        dropped = np.zeros(k, dtype=bool)
        segs: list[Segment] = []
        hist = sorted(self.history, key=lambda c: (c.position, c.version))
        for i, change in enumerate(hist):
            start = change.position
            stop = hist[i + 1].position if i + 1 < len(hist) else None
            if stop is not None and stop <= start:
                continue
            while True:
                w = np.where(dropped | (self.totals == 0), 0.0, np.asarray(change.weights, dtype=np.float64))
                w = _shares(w)
                if w is None:
                    return segs, start
                span = None if stop is None else stop - start
                hit = self._first_exhaustion(w, draws, limits, span)
                if hit is None:
                    segs.append(Segment(start, stop, w, change.version, draws.copy()))
                    if span is not None:
                        draws = draws + prefix_counts(w, span)
                    break
                local, src = hit
                if local > 0:
                    segs.append(Segment(start, start + local, w, change.version, draws.copy()))
                    draws = draws + prefix_counts(w, local)
                start += local
                if self.policies[src].policy == "stop":
                    return segs, start
                dropped[src] = True
        return segs, None

    def _first_exhaustion(self, w, draws, limits, span) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        for src, limit in enumerate(limits):
            if limit is None or w[src] <= 0:
                continue
            remaining = limit - int(draws[src])
            hi = span if span is not None else int(math.ceil((remaining + 1) / w[src] + len(w) + 2))
            reach = first_position_reaching(w, src, remaining + 1, hi)
            if reach is None:
                continue
            local = reach - 1
            if best is None or local < best[0]:
                best = (local, src)
        return best

    # ----------------------------------------------------------------------------- planning
    def plan(self, n0: int, n1: int) -> PlanSlice:
        """Items at global positions [n0, n1) (fewer if the stream ends first)."""
        return self.plan_ranges([n0], n1 - n0)

    def plan_ranges(self, starts, length: int) -> PlanSlice:
        """Items at the positions of the ranges [s, s + length) for s in ``starts`` (ascending,
        disjoint), concatenated in that order; planned in one call (a worker's batches).

        Positions at or past the end of the stream are left out and set ``ended``."""
        starts = np.asarray(starts, dtype=np.int64)
        wanted = (starts[:, None] + np.arange(length, dtype=np.int64)[None, :]).ravel()
        self.segments()  # derives self.end
        if self.end is not None:
            wanted = wanted[wanted < self.end]
        if len(wanted) == 0:
            pos = src = draw = ver = np.zeros(0, dtype=np.int64)
        elif int(starts[-1]) + length - int(starts[0]) <= COVER_FACTOR * len(wanted):
            # Nearby ranges (a worker's batches): schedule the span that covers them once and pick.
            whole = self._schedule(int(starts[0]), int(starts[-1]) + length)
            pick = wanted - int(starts[0])
            pos, src, draw, ver = (x[pick] for x in whole)
        else:
            parts = [self._schedule(int(s), int(s) + length) for s in starts if s < (self.end or s + 1)]
            pos, src, draw, ver = (np.concatenate(x) for x in zip(*parts))
        epoch = np.zeros_like(draw)
        shard = np.zeros_like(draw)
        item = np.zeros_like(draw)
        for s in np.unique(src):
            m = src == s
            epoch[m], shard[m], item[m] = self.orders[int(s)].locate(draw[m])
        ended = len(pos) < len(starts) * length
        return PlanSlice(pos, src, draw, epoch, shard, item, ver.astype(np.int64), ended=ended)

    def _schedule(self, n0: int, n1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(positions, sources, draws, versions) of [n0, n1), cut at the end of the stream."""
        segs = self.segments()
        n1 = n1 if self.end is None else min(n1, self.end)
        parts = []
        for seg in segs:
            lo = max(n0, seg.start)
            hi = n1 if seg.end is None else min(n1, seg.end)
            if lo >= hi:
                continue
            src, ordinal = schedule_range(seg.weights, lo - seg.start, hi - seg.start)
            draw = seg.draws_before[src] + ordinal
            parts.append((np.arange(lo, hi, dtype=np.int64), src, draw, np.full(hi - lo, seg.version, dtype=np.int64)))
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, empty
        return tuple(np.concatenate(x) for x in zip(*parts))

    def draws_before(self, position: int) -> np.ndarray:
        """Per-source number of draws at positions < ``position`` (for telemetry and manifests)."""
        total = np.zeros(len(self.names), dtype=np.int64)
        end = self.end
        for seg in self.segments():
            hi = position if seg.end is None else min(position, seg.end)
            if end is not None:
                hi = min(hi, end)
            if hi > seg.start:
                total = seg.draws_before + prefix_counts(seg.weights, hi - seg.start)
        return total


def _shares(w: np.ndarray) -> np.ndarray | None:
    """``w / w.sum()`` (None when the sum is 0), scaled by the maximum first when the sum overflows."""
    with np.errstate(over="ignore"):
        total = w.sum()
    if not total > 0:
        return None
    if not math.isfinite(total):
        w = w / w.max()
        total = w.sum()
    return w / total


def probe_seed(seed: int, probe_id: int) -> int:
    """Seed of probe mixture ``probe_id``: its items are drawn apart from the main stream's."""
    return stable_key(f"probe:{seed}:{probe_id}")
