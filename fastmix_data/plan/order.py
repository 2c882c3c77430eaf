"""Per-source item order: which (shard, item) is a source's d-th draw (pure, seeded).

A source's draws run through epochs. Epoch e visits every shard once, in an order shuffled with
seed (seed, source key, e), and within a shard every item once, in an order shuffled with seed
(seed, source key, e, shard). An *item* is a row in sample mode and a packed sequence in packing
mode. Random access: draw d -> epoch d // N, offset d % N -> shard by binary search over the
epoch's cumulative shard sizes -> item by the shard's permutation. Permutations are cached.
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


@lru_cache(maxsize=4096)
def _permutation(n: int, *entropy: int) -> np.ndarray:
    perm = _rng(*entropy).permutation(n)
    perm.setflags(write=False)
    return perm


class SourceOrder:
    """Maps a source's draw indices to (epoch, shard, item).

    Args:
        name: the source's name (its key seeds the shuffles, so adding sources changes nothing else).
        items_per_shard: items in each shard (rows, or packed sequences), int, shard order as listed.
        seed: the stream's seed.
        shuffle: shuffle shard order per epoch and items within shards; False keeps file order.
    """

    def __init__(self, name: str, items_per_shard: list[int], seed: int, shuffle: bool = True):
        self.key = stable_key(name)
        self.sizes = np.asarray(items_per_shard, dtype=np.int64)
        self.total = int(self.sizes.sum())
        self.seed = int(seed)
        self.shuffle = shuffle
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return np.arange(len(self.sizes))
        return _permutation(len(self.sizes), self.seed, self.key, epoch)

    def item_order(self, epoch: int, shard: int) -> np.ndarray:
        """Item indices of ``shard`` in the order epoch ``epoch`` visits them."""
        n = int(self.sizes[shard])
        if not self.shuffle:
            return np.arange(n)
        return _permutation(n, self.seed, self.key, epoch, int(shard) + 1)

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
        """(epoch, shard, item) arrays for an int64 array of draw indices."""
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
            within = offs - (ends[pos] - self.sizes[order[pos]])
            shard_ids = order[pos]
            shards[sel] = shard_ids
            out = np.empty(len(shard_ids), dtype=np.int64)
            if len(offs) and bool(np.all(offs[1:] >= offs[:-1])):
                # Ascending draws (the planner's case): each shard is one run of positions.
                cuts = [0, *(np.flatnonzero(pos[1:] != pos[:-1]) + 1).tolist(), len(pos)]
                for lo, hi in zip(cuts[:-1], cuts[1:]):
                    out[lo:hi] = self.item_order(int(e), int(shard_ids[lo]))[within[lo:hi]]
            else:
                for s in np.unique(shard_ids):
                    m = shard_ids == s
                    out[m] = self.item_order(int(e), int(s))[within[m]]
            items[sel] = out
        return epochs, shards, items
