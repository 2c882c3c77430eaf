"""Canonical partitions: which partition serves a global position, and which slice of a source it owns.

Design problem: with W DataLoader workers on each of R ranks, every process should read and decode
only ~1/(W*R) of the data, while the content of each global position stays independent of W and R
(a pure function of the sources, the seed, the number of partitions P and the weight history).

Solution (pure integer arithmetic, no I/O):

* Global positions are cut into *chunks* of ``chunk`` items (the stream's per-rank ``batch_size``):
  chunk c holds positions [c*chunk, (c+1)*chunk) and is served from partition ``c mod P``. A rank's
  batch is one chunk, so worker w of W on rank r of R serves chunks c = (g0 + w + i*W)*R + r, and
  when W*R divides P those are exactly the partitions p with p = (g0 + w)*R + r (mod W*R): 1/(W*R) of
  them. When W*R does not divide P the content is the same and a process reads the partitions of its
  residue class modulo gcd(W*R, P): 1/gcd(W*R, P) of the data.
* Partition p's items form its own *local* sequence: local position l = (c // P) * chunk + (n mod
  chunk) for global position n in chunk c.
* Each source's items (rows, or packed sequences) are cut into P_k contiguous *slices* of equal size
  (+-1), P_k a divisor of P; partition p reads slice ``reverse_digits(p) // (P // P_k)``. Digit
  reversal (bit reversal when P is a power of two) makes the partitions of one residue class modulo
  any prefix product of P's radices (every power of two, for P a power of two) own *contiguous*
  slices, so a process reads whole row ranges, not every other one. The P // P_k partitions that
  share a slice number their draws apart: partition p's i-th draw is slice index i * (P // P_k) + q
  with q = reverse_digits(p) mod (P // P_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_PARTITIONS = 8  # the default P: W x R processes of 1, 2, 4 or 8 each read 1/(W x R); set it to your W x R
MIN_SLICE_ITEMS = 256  # a source is cut into at most total / MIN_SLICE_ITEMS slices (see slice_count)


def radices(partitions: int) -> list[int]:
    """The prime factors of ``partitions`` in ascending order (the mixed radix of `reverse_digits`)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    out, n, f = [], partitions, 2
    while f * f <= n:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    if n > 1:
        out.append(n)
    return out


def reverse_digits(p: int, partitions: int) -> int:
    """``p`` with its mixed-radix digits (least significant in the smallest radix) reversed.

    Partitions with equal residues modulo r_1 * ... * r_j (a prefix product of the radices) map to
    one contiguous interval of length P / (r_1 * ... * r_j)."""
    out = 0
    for r in radices(partitions):
        p, digit = divmod(p, r)
        out = out * r + digit
    return out


def slice_count(total_items: int, partitions: int, min_items: int = MIN_SLICE_ITEMS) -> int:
    """P_k: the largest divisor of ``partitions`` whose slices keep at least ``min_items`` items each
    (at least 1). Slices differ in size by at most one item, so an item of a small slice is drawn at
    most 1 / min_items more often than one of a large slice."""
    best = 1
    for d in range(1, partitions + 1):
        if partitions % d == 0 and total_items >= d * min_items:
            best = d
    return best


def effective_partitions(totals, partitions: int, min_items: int = MIN_SLICE_ITEMS) -> int:
    """The partitions a mixture actually uses: the largest divisor of ``partitions`` that its largest
    source can fill with ``min_items`` items per partition (at least 1). A mixture of small sources
    gains nothing from more partitions than that, and keeps exact epoch order with fewer; smaller
    sources of a large mixture are cut into fewer slices that partitions share (`slice_count`)."""
    return slice_count(max((int(t) for t in totals), default=0), partitions, min_items)


@dataclass(frozen=True)
class Piece:
    """A contiguous run of one shard's items inside a slice: items [lo, hi) of shard ``shard``."""

    shard: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


def equal_cuts(total: int, parts: int) -> np.ndarray:
    """Cut points 0 = x_0 <= ... <= x_parts = total with x_s = floor(s * total / parts)."""
    return (np.arange(parts + 1, dtype=np.int64) * int(total)) // int(parts)


def slices_from_cuts(items_per_shard: list[int], cuts: np.ndarray) -> list[list[Piece]]:
    """Cut a source's item space (its shards' items, shard by shard) at ``cuts`` into slices of pieces.

    Empty shards belong to the slice whose range contains their position (so every shard is in
    exactly one slice, even when it holds no items)."""
    starts = np.concatenate([[0], np.cumsum(np.asarray(items_per_shard, dtype=np.int64))])
    slices: list[list[Piece]] = [[] for _ in range(len(cuts) - 1)]
    for shard, size in enumerate(items_per_shard):
        a, b = int(starts[shard]), int(starts[shard + 1])
        if size == 0:
            s = min(int(np.searchsorted(cuts, a, side="right")) - 1, len(slices) - 1)
            slices[s].append(Piece(shard, 0, 0))
            continue
        s = int(np.searchsorted(cuts, a, side="right")) - 1
        while a < b:
            end = min(b, int(cuts[s + 1]))
            if end > a:
                slices[s].append(Piece(shard, a - int(starts[shard]), end - int(starts[shard])))
            a = end
            s += 1
    return slices


@dataclass(frozen=True)
class SourceLayout:
    """How one source's items are cut into slices.

    Attributes:
        items_per_shard: items (rows or packed sequences) of each shard.
        slices: per slice, its pieces in shard order; P_k = len(slices) divides the partition count.
    """

    items_per_shard: tuple[int, ...]
    slices: tuple[tuple[Piece, ...], ...]

    @classmethod
    def whole(cls, items_per_shard) -> SourceLayout:
        """One slice holding every shard whole (P_k = 1: the layout without partitions)."""
        sizes = tuple(int(x) for x in items_per_shard)
        return cls(sizes, (tuple(Piece(i, 0, n) for i, n in enumerate(sizes)),))

    @classmethod
    def equal(cls, items_per_shard, slices: int) -> SourceLayout:
        """``slices`` slices of equal item counts (+-1), cut anywhere (sample mode: rows)."""
        sizes = [int(x) for x in items_per_shard]
        if slices == 1:
            return cls.whole(sizes)
        cut = slices_from_cuts(sizes, equal_cuts(sum(sizes), slices))
        return cls(tuple(sizes), tuple(tuple(s) for s in cut))

    @property
    def count(self) -> int:
        return len(self.slices)

    def slice_sizes(self) -> np.ndarray:
        return np.array([sum(p.size for p in s) for s in self.slices], dtype=np.int64)

    def validate(self, source: str) -> None:
        """Every shard's items are covered exactly once, in order, by the pieces."""
        covered = [0] * len(self.items_per_shard)
        for pieces in self.slices:
            for piece in pieces:
                if piece.lo != covered[piece.shard] or piece.hi < piece.lo:
                    raise ValueError(f"source {source!r}: slice pieces do not tile shard {piece.shard} in order")
                covered[piece.shard] = piece.hi
        if tuple(covered) != self.items_per_shard:
            raise ValueError(f"source {source!r}: slice pieces cover {covered}, shards hold {self.items_per_shard}")


@dataclass(frozen=True)
class Partitioning:
    """The map between global positions and partition-local positions.

    Args:
        partitions: P, the number of canonical partitions.
        chunk: items per chunk (the per-rank batch size); with one partition any chunk gives the
            same map, so 1 is used.
    """

    partitions: int = 1
    chunk: int = 1

    def __post_init__(self) -> None:
        if self.partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {self.partitions}")
        if self.chunk < 1:
            raise ValueError(f"the chunk (per-rank batch size) must be >= 1, got {self.chunk}")

    def to_local(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(partition, local position) of each global position (int64 arrays)."""
        positions = np.asarray(positions, dtype=np.int64)
        c, i = np.divmod(positions, self.chunk)
        return c % self.partitions, (c // self.partitions) * self.chunk + i

    def to_global(self, partition: int, local: int) -> int:
        """The global position of partition ``partition``'s local position ``local``."""
        j, i = divmod(int(local), self.chunk)
        return (j * self.partitions + int(partition)) * self.chunk + i

    def local_before(self, partition: int, position: int) -> int:
        """How many of partition ``partition``'s items lie at global positions < ``position``."""
        c, i = divmod(int(position), self.chunk)
        full = max(0, -(-(c - int(partition)) // self.partitions))
        return full * self.chunk + (i if c % self.partitions == partition else 0)

    def segment_offset(self, partition: int, start_chunk: int) -> int:
        """In a weight segment starting at chunk ``start_chunk``, the schedule position of
        partition ``partition``'s first item: round j of the segment serves schedule chunks
        j, j + 1, ..., j + P - 1 from partitions start, start + 1, ... (mod P)."""
        return ((int(partition) - int(start_chunk)) % self.partitions) * self.chunk


def slice_of(partition: int, partitions: int, slices: int) -> tuple[int, int, int]:
    """(slice, sharers m, q): partition ``partition`` reads slice ``slice`` of a source cut into
    ``slices`` slices, shared by m = partitions // slices partitions; its i-th draw of the source is
    slice index i * m + q."""
    m = partitions // slices
    r = reverse_digits(partition, partitions)
    return r // m, m, r % m
