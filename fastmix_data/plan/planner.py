"""The mixture plan: (seed, sources, P, weight history, exhaustion policies, position) -> item.

This is the single function behind online serving, offline resampling and offline manifest
generation. It does no I/O and knows nothing of torch: sources are given as item counts per shard
(and, with canonical partitions, as slices of those items).

Global position n lies in chunk n // chunk, served by partition (n // chunk) mod P
(:mod:`fastmix_data.plan.partition`). Each partition runs the low-discrepancy schedule of the weight
history over its own local positions, from a sliding offset that makes the P chunks of one round
a contiguous window of the schedule (:mod:`fastmix_data.plan.segments`), and draws its items from
its slice of each source in that slice's seeded epoch order (:mod:`fastmix_data.plan.order`). With
P = 1 this is the plain global schedule over whole sources.

The weight history is a list of :class:`WeightChange` (global item position where the change takes
effect, and weights in item units). Exhaustion policies turn into further, derived changes per
partition; derived segments depend only on the history before them, so they are recomputed, not
stored (O(#changes * K log N) per partition).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fastmix_data.plan.order import SourceOrder, stable_key
from fastmix_data.plan.partition import Partitioning, SourceLayout, slice_of
from fastmix_data.plan.schedule import schedule_range
from fastmix_data.plan.segments import GlobalSegment, Segment, derive_segments, locate_segments
from fastmix_data.plan.takes import slice_takes

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


@dataclass
class PlanSlice:
    """Planned items for a range of positions. All arrays int64 of equal length.

    ``draw`` is the partition's draw index of the item's source (the source's draw index when P = 1);
    ``epoch`` is the epoch of the item's slice; ``item`` indexes the shard's items."""

    position: np.ndarray
    source: np.ndarray
    draw: np.ndarray
    epoch: np.ndarray
    shard: np.ndarray
    item: np.ndarray
    version: np.ndarray
    ended: bool = False  # the stream ends inside (or at the start of) the requested range
    partition: np.ndarray | None = None


@dataclass
class MixturePlan:
    """Pure planner over K sources.

    Args:
        names: source names, in the stream's source order.
        items_per_shard: per source, items (rows or packed sequences) in each shard.
        seed: the stream seed.
        history: weight changes sorted by position; the first at position 0. With P > 1 every
            position must be a multiple of ``chunk`` (a batch boundary).
        policies: per source exhaustion policy (default repeat).
        shuffle: shuffle pieces and items (False: file order, for debugging and manifests).
        limit: total items the stream serves (a budget), None = unbounded.
        partitions: P, the number of canonical partitions (default 1: no partitions).
        chunk: items per chunk, the unit served by one partition (the per-rank batch size).
        layouts: per source, its slices (`SourceLayout`); default one slice of whole shards. The
            number of slices of each source must divide P.
    """

    names: list[str]
    items_per_shard: list[list[int]]
    seed: int
    history: list[WeightChange]
    policies: list[Exhaustion] = field(default_factory=list)
    shuffle: bool = True
    limit: int | None = None
    partitions: int = 1
    chunk: int = 1
    layouts: list[SourceLayout] | None = None

    def __post_init__(self) -> None:
        k = len(self.names)
        if not self.policies:
            self.policies = [Exhaustion() for _ in range(k)]
        for name, pol in zip(self.names, self.policies):
            pol.validate(name)
        self.part = Partitioning(self.partitions, self.chunk if self.partitions > 1 else 1)
        if self.layouts is None:
            self.layouts = [SourceLayout.whole(s) for s in self.items_per_shard]
        self.slice_orders: list[list[SourceOrder]] = []
        for name, sizes, layout in zip(self.names, self.items_per_shard, self.layouts):
            layout.validate(name)
            if tuple(int(x) for x in sizes) != layout.items_per_shard:
                raise ValueError(f"source {name!r}: the layout's items per shard differ from {list(sizes)[:5]}...")
            if self.partitions % layout.count:
                raise ValueError(f"source {name!r} has {layout.count} slices, which do not divide {self.partitions} partitions")
            self.slice_orders.append(
                [
                    SourceOrder(name, sizes, self.seed, self.shuffle, [(p.shard, p.lo, p.hi) for p in pieces], (s, layout.count))
                    for s, pieces in enumerate(layout.slices)
                ]
            )
        self.orders = [orders[0] if len(orders) == 1 else None for orders in self.slice_orders]
        self.totals = np.array([sum(o.total for o in orders) for orders in self.slice_orders], dtype=np.int64)
        # per source and partition: the slice it reads, its sharers m and its offset q among them
        self._slices = [self._slice_map(layout.count) for layout in self.layouts]
        self._reset()

    def _slice_map(self, count: int) -> tuple[np.ndarray, int, np.ndarray]:
        info = [slice_of(p, self.partitions, count) for p in range(self.partitions)]
        return (np.array([i[0] for i in info], dtype=np.int64), self.partitions // count,
                np.array([i[2] for i in info], dtype=np.int64))  # fmt: skip

    def _reset(self) -> None:
        self._local: dict[int, tuple[list[Segment], int | None]] = {}
        self._global: list[GlobalSegment] | None = None
        self.end: int | None = None
        self._end_known = False

    # ----------------------------------------------------------------------------- segments
    def with_history(self, history: list[WeightChange]) -> None:
        """Replace the weight history (derived segments are recomputed lazily)."""
        self.history = list(history)
        self._reset()

    def global_segments(self) -> list[GlobalSegment]:
        """The weight history as runs of global positions (before any exhaustion)."""
        if self._global is None:
            hist = sorted(self.history, key=lambda c: (c.position, c.version))
            segs = []
            for i, change in enumerate(hist):
                if self.partitions > 1 and change.position % self.chunk:
                    raise ValueError(
                        f"weight change {change.version} at position {change.position} is not at a chunk boundary "
                        f"(a multiple of {self.chunk}); with partitions, changes apply at batch boundaries"
                    )
                stop = hist[i + 1].position if i + 1 < len(hist) else None
                if stop is None or stop > change.position:
                    segs.append(GlobalSegment(change.position, stop, tuple(change.weights), change.version))
            self._global = segs
        return self._global

    def local_segments(self, partition: int) -> tuple[list[Segment], int | None]:
        """Partition ``partition``'s segments and the local position where it ends (None: never)."""
        hit = self._local.get(partition)
        if hit is None:
            spans = []
            for g in self.global_segments():
                lo = self.part.local_before(partition, g.start)
                hi = None if g.end is None else self.part.local_before(partition, g.end)
                if hi is None or hi > lo:
                    spans.append((lo, hi, self.part.segment_offset(partition, g.start // self.part.chunk), g))
            caps, totals = self._caps(partition)
            stop = [p.policy == "stop" for p in self.policies]
            hit = self._local[partition] = derive_segments(spans, caps, stop, totals)
        return hit

    def _caps(self, partition: int) -> tuple[list[int | None], np.ndarray]:
        """Per source, the partition's allowance of draws (None: unlimited) and its slice's items."""
        caps, totals = [], []
        for pol, orders, (slice_ids, m, qs) in zip(self.policies, self.slice_orders, self._slices):
            size = orders[int(slice_ids[partition])].total
            totals.append(size)
            epochs = pol.limit_epochs()
            # indices i*m + q < epochs*size: ceil((epochs*size - q) / m) draws
            caps.append(None if epochs is None else max(0, -(-(epochs * size - int(qs[partition])) // m)))
        return caps, np.array(totals, dtype=np.int64)

    def segments(self, partition: int = 0) -> list[Segment]:
        """Partition ``partition``'s segments (with P = 1, the plan's segments); also sets `end`."""
        self._ensure_end()
        return self.local_segments(partition)[0]

    def _ensure_end(self) -> None:
        """Derive `end`: the first global position not served (None: unbounded)."""
        if self._end_known:
            return
        ends = []
        if self.partitions == 1 or any(p.policy != "repeat" for p in self.policies):
            for p in range(self.partitions):
                local_end = self.local_segments(p)[1]
                if local_end is not None:
                    ends.append(self.part.to_global(p, local_end))
        if self.limit is not None:
            ends.append(int(self.limit))
        self.end = min(ends) if ends else None
        self._end_known = True

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
        self._ensure_end()
        if self.end is not None:
            wanted = wanted[wanted < self.end]
        part, local = self.part.to_local(wanted)
        src, draw, ver = self._schedule(part, local)
        epoch, shard, item = self._locate(part, src, draw)
        ended = len(wanted) < len(starts) * length
        return PlanSlice(wanted, src, draw, epoch, shard, item, ver, ended=ended, partition=part)

    def _schedule(self, part: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, partition draw, version) of each (partition, local position); positions in
        segments with equal weights share one schedule call."""
        n = len(part)
        src, draw, ver = (np.zeros(n, dtype=np.int64) for _ in range(3))
        groups: dict[bytes, list] = {}
        for p in np.unique(part).tolist():
            at = np.flatnonzero(part == p)
            segs = self.local_segments(p)[0]
            which = locate_segments(segs, local[at])
            for si in np.unique(which).tolist():
                sel = at[which == si]
                seg = segs[si]
                groups.setdefault(seg.weights.tobytes(), []).append((sel, seg))
        for members in groups.values():
            w = members[0][1].weights
            bases = [seg.base + local[sel] - seg.start for sel, seg in members]
            s, ordinal = _schedule_positions(w, np.concatenate(bases))
            at = 0
            for (sel, seg), b in zip(members, bases):
                k, o = s[at : at + len(b)], ordinal[at : at + len(b)]
                src[sel], draw[sel], ver[sel] = k, seg.draws_before[k] + o - seg.counts0[k], seg.version
                at += len(b)
        return src, draw, ver

    def _locate(self, part: np.ndarray, src: np.ndarray, draw: np.ndarray):
        """(epoch, shard, item) of each partition draw: slice index = draw * m + q, then the slice's order."""
        epoch, shard, item = (np.zeros(len(part), dtype=np.int64) for _ in range(3))
        for k in np.unique(src).tolist():
            at = np.flatnonzero(src == k)
            slice_ids, m, qs = self._slices[k]
            sl = slice_ids[part[at]]
            index = draw[at] * m + qs[part[at]]
            for s in np.unique(sl).tolist():
                sel = sl == s
                epoch[at[sel]], shard[at[sel]], item[at[sel]] = self.slice_orders[k][s].locate(index[sel])
        return epoch, shard, item

    # ----------------------------------------------------------------------------- counting
    def partition_draws(self, position: int) -> np.ndarray:
        """int64 (P, K): each partition's draws per source at global positions < ``position``."""
        self._ensure_end()
        if self.end is not None:
            position = min(position, self.end)
        out = np.zeros((self.partitions, len(self.names)), dtype=np.int64)
        for p in range(self.partitions):
            local = self.part.local_before(p, position)
            segs, _ = self.local_segments(p)
            if local <= 0 or not segs:
                continue
            seg = segs[int(locate_segments(segs, np.array([local]))[0])]
            out[p] = seg.draws_at(min(local, seg.end) if seg.end is not None else local)
        return out

    def draws_before(self, position: int) -> np.ndarray:
        """Per-source number of draws at positions < ``position`` (for telemetry and manifests)."""
        return self.partition_draws(position).sum(axis=0)

    def expected_before(self, position: int) -> np.ndarray:
        """Per source, the items the weights asked for at positions < ``position`` (float64): the
        sum over segments of weight times length, in each partition."""
        self._ensure_end()
        if self.end is not None:
            position = min(position, self.end)
        total = np.zeros(len(self.names))
        for p in range(self.partitions):
            local = self.part.local_before(p, position)
            for seg in self.local_segments(p)[0]:
                hi = local if seg.end is None else min(local, seg.end)
                if hi > seg.start:
                    total += seg.weights * (hi - seg.start)
        return total

    def shard_takes(self, position: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per source, (items taken from each shard, epochs touching each shard) at positions <
        ``position``, in O(#partitions * #changes + #pieces) (see `plan.takes`)."""
        draws = self.partition_draws(position)
        out = []
        for k, layout in enumerate(self.layouts):
            slice_ids, m, qs = self._slices[k]
            take = np.zeros(len(layout.items_per_shard), dtype=np.int64)
            epochs = np.zeros(len(layout.items_per_shard), dtype=np.int64)
            for s, order in enumerate(self.slice_orders[k]):
                sharers = np.flatnonzero(slice_ids == s)
                t, e = slice_takes(order, m, qs[sharers], draws[sharers, k])
                np.add.at(take, order.piece_shard, t)
                np.maximum.at(epochs, order.piece_shard, e)
            out.append((take, epochs))
        return out


def _schedule_positions(w: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sources, ordinals) at schedule positions ``positions`` (any order, repeats allowed): the span
    that covers them is scheduled once when it is at most ``COVER_FACTOR`` times their number,
    otherwise each run of consecutive positions separately."""
    lo, hi = int(positions.min()), int(positions.max()) + 1
    if hi - lo <= COVER_FACTOR * len(positions):
        s, o = schedule_range(w, lo, hi)
        return s[positions - lo], o[positions - lo]
    order = np.argsort(positions, kind="stable")
    sorted_pos = positions[order]
    cuts = np.flatnonzero(np.diff(sorted_pos) > 1) + 1
    src, ordinal = np.empty(len(positions), dtype=np.int64), np.empty(len(positions), dtype=np.int64)
    for run in np.split(np.arange(len(positions)), cuts):
        a, b = int(sorted_pos[run[0]]), int(sorted_pos[run[-1]]) + 1
        s, o = schedule_range(w, a, b)
        src[order[run]], ordinal[order[run]] = s[sorted_pos[run] - a], o[sorted_pos[run] - a]
    return src, ordinal


def probe_seed(seed: int, probe_id: int) -> int:
    """Seed of probe mixture ``probe_id``: its items are drawn apart from the main stream's."""
    return stable_key(f"probe:{seed}:{probe_id}")
