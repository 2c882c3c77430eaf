"""Canonical partitions in the pure plan: the position map, slices, epochs per slice, exhaustion per
partition, closed-form counts against planning every position, and the restated proportion bound."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmix_data.plan.partition import (
    Partitioning,
    SourceLayout,
    effective_partitions,
    reverse_digits,
    slice_count,
    slice_of,
)
from fastmix_data.plan.planner import Exhaustion, MixturePlan, WeightChange


def _plan(sizes, weights, P, chunk, policies=None, seed=0, history=None, min_items=8):
    names = [f"s{i}" for i in range(len(sizes))]
    hist = history or [WeightChange(0, 0, tuple(weights))]
    layouts = [SourceLayout.equal(s, slice_count(sum(s), P, min_items)) for s in sizes]
    pols = [Exhaustion(*p) if isinstance(p, tuple) else Exhaustion(p) for p in (policies or ["repeat"] * len(sizes))]
    return MixturePlan(names, sizes, seed, hist, pols, partitions=P, chunk=chunk, layouts=layouts)


def test_position_map_round_trips_and_serves_chunks_round_robin():
    part = Partitioning(8, 5)
    n = np.arange(2000)
    p, local = part.to_local(n)
    assert np.array_equal(p, (n // 5) % 8)
    assert all(part.to_global(int(a), int(b)) == int(x) for a, b, x in zip(p, local, n))
    for q in range(8):  # local positions of a partition are 0, 1, 2, ... in global order
        assert np.array_equal(local[p == q], np.arange((p == q).sum()))
        assert all(part.local_before(q, int(x)) == int(((p == q) & (n < x)).sum()) for x in (0, 7, 40, 41, 1999))


def test_digit_reversal_gives_each_residue_class_contiguous_slices():
    for P in (8, 12, 64):
        assert sorted(reverse_digits(p, P) for p in range(P)) == list(range(P))
    for D in (1, 2, 4, 8, 16, 32, 64):  # W * R processes, each with the partitions p = x (mod D)
        for x in range(D):
            mine = sorted(slice_of(p, 64, 64)[0] for p in range(x, 64, D))
            assert mine == list(range(mine[0], mine[0] + 64 // D))


def test_slices_are_equal_within_one_item_and_tile_the_shards():
    lay = SourceLayout.equal([10, 0, 7, 33, 1], 4)
    lay.validate("x")
    assert lay.slice_sizes().tolist() == [12, 13, 13, 13]
    assert slice_count(1000, 64, 256) == 2 and slice_count(100, 64, 256) == 1 and slice_count(16384, 64, 256) == 64
    assert effective_partitions([100, 5000], 64, 256) == 16


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=4), min_size=1, max_size=3).filter(
        lambda s: all(sum(x) > 0 for x in s)
    ),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(1, 6),
    st.integers(0, 2**31),
)
def test_each_slice_epoch_visits_every_item_once(sizes, P, chunk, seed):
    k = len(sizes)
    p = _plan(sizes, [1.0 / k] * k, P, chunk, seed=seed, min_items=4)
    n = 6 * sum(sum(s) for s in sizes) + 10
    sl = p.plan(0, n)
    for src in range(k):
        slice_ids, m, qs = p._slices[src]
        index = sl.draw * m + qs[sl.partition]
        got = Counter()
        for s, order in enumerate(p.slice_orders[src]):
            sel = (sl.source == src) & (slice_ids[sl.partition] == s)
            pairs = list(zip(sl.epoch[sel].tolist(), sl.shard[sel].tolist(), sl.item[sel].tolist(), index[sel].tolist()))
            assert len(set(pairs)) == len(pairs)  # an index is served once
            for e, shard, item, x in pairs:
                assert e == x // order.total
                got[(shard, item)] += 1
            sharers = np.flatnonzero(slice_ids == s)
            drawn = np.array([((sl.source == src) & (sl.partition == q)).sum() for q in sharers])
            full = int(((drawn * m + qs[sharers]) // order.total).min())
            for e in range(full):  # epochs every sharer has passed: every item of the slice once
                items = {(sh, it) for ee, sh, it, _ in pairs if ee == e}
                assert items == {(pc.shard, i) for pc in p.layouts[src].slices[s] for i in range(pc.lo, pc.hi)}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 30), st.integers(0, 400), st.sampled_from([1, 4, 8]), st.integers(0, 2**31))
def test_plan_ranges_counts_and_takes_agree_with_planning_every_position(count, chunk, first, P, seed):
    hist = [WeightChange(0, 0, (0.2, 0.5, 0.3)), WeightChange(1, 30 * chunk, (0.6, 0.0, 0.4))]
    p = _plan([[37, 41], [90], [25]], None, P, chunk, ["repeat", ("cap", 2), "drop"], seed, hist)
    whole = p.plan(0, 3000)
    starts = [(first // chunk + i * 3) * chunk for i in range(count)]
    got = p.plan_ranges(starts, chunk)
    want = np.concatenate([np.arange(s, s + chunk) for s in starts])
    want = want[want < len(whole.position)]
    for field in ("source", "draw", "epoch", "shard", "item", "version", "partition"):
        assert np.array_equal(getattr(got, field), getattr(whole, field)[want]), field
    for n in (0, 1, chunk * 7 + 1, 999, len(whole.position)):
        assert np.array_equal(p.draws_before(n), np.bincount(whole.source[:n], minlength=3))
    for k, (take, _) in enumerate(p.shard_takes(len(whole.position))):
        sel = whole.source == k
        assert np.array_equal(take, np.bincount(whole.shard[sel], minlength=len(take)))


@pytest.mark.parametrize("policy", ["drop", ("cap", 3), "stop"])
def test_exhaustion_serves_each_item_its_epochs_exactly_once_each(policy):
    p = _plan([[300, 500, 200], [5000], [60, 40]], [0.5, 0.3, 0.2], 8, 4, [policy, "repeat", "drop"], seed=3)
    sl = p.plan(0, 20000)
    served = Counter(zip(sl.shard[sl.source == 0].tolist(), sl.item[sl.source == 0].tolist()))
    small = Counter(zip(sl.shard[sl.source == 2].tolist(), sl.item[sl.source == 2].tolist()))
    assert len(small) == 100 and set(small.values()) == {1}  # drop: one epoch, shared slices included
    if policy == "stop":  # the stream ends when the first partition would exceed its share
        assert p.end is not None and len(sl.position) == p.end
        assert set(served.values()) == {1} and 1000 - 8 * 2 <= len(served) <= 1000
    else:
        epochs = 1 if policy == "drop" else 3
        assert len(served) == 1000 and set(served.values()) == {epochs}


def test_weight_changes_must_fall_on_chunk_boundaries():
    with pytest.raises(ValueError, match="not at a chunk boundary"):
        _plan([[100]], None, 4, 8, history=[WeightChange(0, 0, (1.0,)), WeightChange(1, 12, (1.0,))]).plan(0, 10)


def test_one_partition_is_the_plan_without_partitions():
    hist = [WeightChange(0, 0, (0.3, 0.7)), WeightChange(1, 57, (0.9, 0.1))]
    a = MixturePlan(["s0", "s1"], [[7, 9], [11]], 5, hist, [Exhaustion("cap", 2), Exhaustion()]).plan(0, 300)
    b = _plan([[7, 9], [11]], None, 1, 16, [("cap", 2), "repeat"], seed=5, history=hist).plan(0, 300)
    for field in ("source", "draw", "epoch", "shard", "item", "version"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


weights_st = st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=8).filter(
    lambda ws: sum(ws) > 1e-6 and all(w == 0 or w > 1e-3 for w in ws)
)


@settings(max_examples=150, deadline=None)
@given(weights_st, st.sampled_from([1, 2, 4, 8, 16, 64]), st.integers(1, 40), st.integers(0, 20_000), st.integers(1, 3000))
def test_window_bound_with_partitions(ws, P, chunk, start, n):
    """docs/plan.md: over any window of N consecutive positions, |count_k - w_k N| <= (1 + w_k K) * m,
    m = min(rounds touched, partitions touched): each round (P chunks) and each partition's part of the
    window is a contiguous window of the schedule, where the bound without partitions holds."""
    w = np.asarray(ws, dtype=np.float64)
    w = w / w.sum()
    k = int((w > 0).sum())
    p = MixturePlan([f"s{i}" for i in range(len(w))], [[10**5]] * len(w), 0, [WeightChange(0, 0, tuple(w))],
                    partitions=P, chunk=chunk)  # fmt: skip
    src = p.plan(start, start + n).source
    first_chunk, last_chunk = start // chunk, (start + n - 1) // chunk
    rounds = last_chunk // P - first_chunk // P + 1
    parts = min(P, last_chunk - first_chunk + 1)
    bound = (1 + w * k) * min(rounds, parts)
    assert np.all(np.abs(np.bincount(src, minlength=len(w)) - w * n) <= bound + 1e-9)


def test_a_global_batch_within_a_round_is_a_schedule_window():
    """With R ranks dividing P, the R chunks of a global batch are consecutive schedule chunks, so a
    global batch keeps the bound without partitions, 1 + w_k K."""
    w = np.array([0.37, 0.21, 0.42])
    p = MixturePlan(["a", "b", "c"], [[10**5]] * 3, 0, [WeightChange(0, 0, tuple(w))], partitions=16, chunk=5)
    src = p.plan(0, 16 * 5 * 40).source.reshape(-1, 4 * 5)  # global batches of R = 4 ranks
    dev = np.abs(np.stack([np.bincount(b, minlength=3) for b in src]) - w * 20)
    assert np.all(dev <= 1 + w * 3 + 1e-9)
