"""Per-source item order: which (shard, item) is a source's (or a slice's) d-th draw (pure, seeded).

A source's draws run through epochs. Epoch e visits every shard once, in an order shuffled with
seed (seed, source key, e), and within a shard every item once, in an order shuffled with seed
(seed, source key, e, shard). An *item* is a row in sample mode and a packed sequence in packing
mode. Random access: draw d -> epoch d // N, offset d % N -> shard by binary search over the
epoch's cumulative shard sizes -> item by the shard's permutation. Permutations are cached.

With canonical partitions (:mod:`fastmix_data.plan.partition`) the same holds per *slice* of a
source: its pieces (whole shards, or runs of a shard's items at the slice's ends) take the place of
shards, with seeds that name the slice.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np


def stable_key(name: str) -> int:
    """A 63-bit integer derived from a source name, independent of source order and process."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little") >> 1


def _entropy_words(entropy: tuple[int, ...]) -> np.ndarray:
    """The uint32 words numpy's ``SeedSequence`` makes of a list of non-negative ints (each int
    little-endian, at least one word): ``SeedSequence(words)`` equals ``SeedSequence(list(entropy))``
    and skips numpy's per-int array conversion (a third of the cost of a shard's permutation)."""
    words = []
    for value in entropy:
        value = int(value)
        if value < 0:
            raise ValueError(f"entropy must be non-negative, got {value}")
        words.append(value & 0xFFFFFFFF)
        value >>= 32
        while value:
            words.append(value & 0xFFFFFFFF)
            value >>= 32
    return np.array(words, dtype=np.uint32)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_entropy_words(entropy))))


SLICE_TAG = 0x5117CE  # seeds of a slice's piece order (see SourceOrder)


@lru_cache(maxsize=4096)
def _permutation(n: int, *entropy: int) -> np.ndarray:
    perm = _rng(*entropy).permutation(n)
    perm.setflags(write=False)
    return perm


class SourceOrder:
    """Maps the draw indices of a source, or of one slice of it, to (epoch, shard, item).

    Args:
        name: the source's name (its key seeds the shuffles, so adding sources changes nothing else).
        items_per_shard: items in each shard (rows, or packed sequences), int, shard order as listed.
        seed: the stream's seed.
        shuffle: shuffle piece order per epoch and items within pieces; False keeps file order.
        pieces: the runs of shard items this order visits (a slice, see `plan.partition`); default
            every shard whole. Epoch e visits the pieces in an order shuffled with seed (seed, source
            key, e) for the whole source, or (seed, key, e, SLICE_TAG, slices, slice) for a slice;
            a whole shard's items in an order shuffled with (seed, key, e, shard + 1), a part
            [lo, hi) of a shard's with (seed, key, e, shard + 1, lo + 1).
        slice_id: (slice, number of slices) when ``pieces`` is one slice of several.
    """

    def __init__(
        self,
        name: str,
        items_per_shard: list[int],
        seed: int,
        shuffle: bool = True,
        pieces=None,
        slice_id: tuple[int, int] | None = None,
    ):
        self.key = stable_key(name)
        shard_sizes = np.asarray(items_per_shard, dtype=np.int64)
        if pieces is None:
            pieces = [(i, 0, int(n)) for i, n in enumerate(shard_sizes)]
        self.piece_shard = np.array([p[0] for p in pieces], dtype=np.int64)
        self.piece_lo = np.array([p[1] for p in pieces], dtype=np.int64)
        self.sizes = np.array([p[2] - p[1] for p in pieces], dtype=np.int64)  # items per piece
        self.whole = (self.piece_lo == 0) & (self.sizes == shard_sizes[self.piece_shard]) if len(pieces) else self.sizes > 0
        self.total = int(self.sizes.sum())
        self.seed = int(seed)
        self.shuffle = shuffle
        self.slice_id = None if slice_id is None or slice_id[1] == 1 else (int(slice_id[0]), int(slice_id[1]))
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def shard_order(self, epoch: int) -> np.ndarray:
        """Piece indices in the order epoch ``epoch`` visits them (shard indices without slices)."""
        if not self.shuffle:
            return np.arange(len(self.sizes))
        if self.slice_id is None:
            return _permutation(len(self.sizes), self.seed, self.key, epoch)
        return _permutation(len(self.sizes), self.seed, self.key, epoch, SLICE_TAG, self.slice_id[1], self.slice_id[0])

    def item_order(self, epoch: int, piece: int) -> np.ndarray:
        """Items of the shard of ``piece``, in the order epoch ``epoch`` visits them."""
        n, lo = int(self.sizes[piece]), int(self.piece_lo[piece])
        if not self.shuffle:
            return np.arange(lo, lo + n)
        shard = int(self.piece_shard[piece])
        if self.whole[piece]:
            return _permutation(n, self.seed, self.key, epoch, shard + 1)
        return _permutation(n, self.seed, self.key, epoch, shard + 1, lo + 1) + lo

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        hit = self._epoch_cache.get(epoch)
        if hit is None:
            order = self.shard_order(epoch)
            ends = np.cumsum(self.sizes[order])
            if len(self._epoch_cache) > 8:
                self._epoch_cache.clear()
            hit = self._epoch_cache[epoch] = (order, ends)
        return hit

    def locate(self, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, shard, item within the shard) arrays for an int64 array of draw indices."""
        draws = np.asarray(draws, dtype=np.int64)
        if self.total == 0:
            raise ValueError("a source with zero items cannot be drawn from")
        epochs = draws // self.total
        offsets = draws % self.total
        shards = np.empty_like(draws)
        items = np.empty_like(draws)
        for e in np.unique(epochs):
            sel = epochs == e
            order, ends = self._epoch_layout(int(e))
            offs = offsets[sel]
            pos = np.searchsorted(ends, offs, side="right")
            pieces = order[pos]
            within = offs - (ends[pos] - self.sizes[pieces])
            shards[sel] = self.piece_shard[pieces]
            out = np.empty(len(pieces), dtype=np.int64)
            if len(offs) and bool(np.all(offs[1:] >= offs[:-1])):
                # Ascending draws (the planner's case): each piece is one run of positions.
                cuts = [0, *(np.flatnonzero(pos[1:] != pos[:-1]) + 1).tolist(), len(pos)]
                for lo, hi in zip(cuts[:-1], cuts[1:]):
                    out[lo:hi] = self.item_order(int(e), int(pieces[lo]))[within[lo:hi]]
            else:
                for piece in np.unique(pieces):
                    m = pieces == piece
                    out[m] = self.item_order(int(e), int(piece))[within[m]]
            items[sel] = out
        return epochs, shards, items
