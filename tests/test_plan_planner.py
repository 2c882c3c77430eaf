"""The pure planner: item coverage per epoch, exhaustion policies, weight history."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmix_data.plan.planner import Exhaustion, MixturePlan, WeightChange


def _plan(sizes, weights, policies=None, seed=0, history=None):
    names = [f"s{i}" for i in range(len(sizes))]
    hist = history or [WeightChange(0, 0, tuple(weights))]
    pols = [Exhaustion(*p) if isinstance(p, tuple) else Exhaustion(p) for p in (policies or ["repeat"] * len(sizes))]
    return MixturePlan(names, sizes, seed, hist, pols)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 30), min_size=1, max_size=5), min_size=1, max_size=4), st.integers(0, 2**31))
def test_each_epoch_visits_every_item_once(sizes, seed):
    k = len(sizes)
    p = _plan(sizes, [1.0 / k] * k, seed=seed)
    totals = [sum(s) for s in sizes]
    sl = p.plan(0, 3 * sum(totals) + 10)
    for src in range(k):
        m = sl.source == src
        for e in range(2):
            sel = m & (sl.epoch == e)
            pairs = set(zip(sl.shard[sel].tolist(), sl.item[sel].tolist()))
            if (sl.epoch[m] > e).any():  # epoch complete
                assert len(pairs) == totals[src] == sel.sum()
                assert pairs == {(s, i) for s, n in enumerate(sizes[src]) for i in range(n)}


def test_drop_policy_removes_source_and_renormalises():
    p = _plan([[5, 5], [1000]], [0.5, 0.5], policies=["drop", "repeat"])
    sl = p.plan(0, 200)
    assert (sl.source == 0).sum() == 10
    last_a = int(np.nonzero(sl.source == 0)[0][-1])
    assert (sl.source[last_a + 1 :] == 1).all()
    assert len({(s, i) for s, i in zip(sl.shard[sl.source == 0], sl.item[sl.source == 0])}) == 10


def test_cap_policy_allows_max_epochs():
    p = _plan([[3], [1000]], [0.5, 0.5], policies=[("cap", 3), "repeat"])
    sl = p.plan(0, 500)
    a = sl.source == 0
    assert a.sum() == 9
    assert sorted(sl.epoch[a].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_stop_policy_ends_stream():
    p = _plan([[4], [1000]], [0.5, 0.5], policies=["stop", "repeat"])
    sl = p.plan(0, 100)
    assert sl.ended
    assert (sl.source == 0).sum() == 4
    assert p.end == len(sl.position)
    assert len(p.plan(p.end, p.end + 5).position) == 0


def test_all_sources_dropped_ends_stream():
    p = _plan([[2], [3]], [0.5, 0.5], policies=["drop", "drop"])
    sl = p.plan(0, 100)
    assert len(sl.position) == 5 and sl.ended


def test_weight_history_switches_at_position():
    hist = [WeightChange(0, 0, (1.0, 0.0)), WeightChange(1, 100, (0.0, 1.0))]
    p = _plan([[1000], [1000]], None, history=hist)
    sl = p.plan(0, 200)
    assert (sl.source[:100] == 0).all() and (sl.source[100:] == 1).all()
    assert (sl.version[:100] == 0).all() and (sl.version[100:] == 1).all()
    # draws continue across the change: source 1 starts at its draw 0, source 0 stopped at 100
    assert sl.draw[99] == 99 and sl.draw[100] == 0


def test_plan_is_a_pure_function_of_seed_and_history():
    a = _plan([[7, 9], [11]], [0.3, 0.7], seed=5).plan(50, 150)
    b = _plan([[7, 9], [11]], [0.3, 0.7], seed=5).plan(50, 150)
    c = _plan([[7, 9], [11]], [0.3, 0.7], seed=6).plan(50, 150)
    assert np.array_equal(a.item, b.item) and np.array_equal(a.shard, b.shard)
    assert not (np.array_equal(a.item, c.item) and np.array_equal(a.shard, c.shard))


def test_draws_before_matches_plan():
    p = _plan([[7, 9], [11], [5]], [0.2, 0.5, 0.3], policies=["repeat", "drop", "repeat"])
    sl = p.plan(0, 300)
    for n in (0, 1, 17, 100, 300):
        assert np.array_equal(p.draws_before(n), np.bincount(sl.source[:n], minlength=3))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown exhaustion policy 'forever'"):
        _plan([[1]], [1.0], policies=["forever"])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.integers(0, 300), st.integers(0, 2**31))
def test_plan_ranges_equals_the_ranges_planned_one_by_one(count, length, first, seed):
    """A worker plans its batches in one call; the items are those of the whole sequence."""
    hist = [WeightChange(0, 0, (0.2, 0.5, 0.3)), WeightChange(1, 150, (0.6, 0.0, 0.4))]
    p = _plan([[7, 9], [11], [5]], None, policies=["repeat", "cap", "repeat"], seed=seed, history=hist)
    starts = [first + i * 3 * length for i in range(count)]
    whole = p.plan(0, starts[-1] + length)
    got = p.plan_ranges(starts, length)
    want = np.concatenate([np.arange(s, s + length) for s in starts])
    want = want[want < len(whole.position)]
    assert np.array_equal(got.position, want)
    for field in ("source", "draw", "epoch", "shard", "item", "version"):
        assert np.array_equal(getattr(got, field), getattr(whole, field)[want]), field
    assert got.ended == (len(want) < count * length)


def test_plan_ranges_marks_the_end_of_a_stopping_stream():
    p = _plan([[2], [3]], [0.5, 0.5], policies=["stop", "repeat"])
    end = len(p.plan(0, 100).position)
    sl = p.plan_ranges([0, end - 1, end + 5], 2)
    assert sl.ended and list(sl.position) == [0, 1, end - 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**64]), st.integers(0, 2**70)), max_size=6))
def test_entropy_words_seed_numpy_exactly_as_the_int_list(entropy):
    """Shuffles are seeded from precomputed uint32 words; they must give the SeedSequence (and so the
    permutations) that numpy makes of the list of ints itself, or every stream's content would change."""
    from fastmix_data.plan.order import _entropy_words

    ref = np.random.SeedSequence(list(entropy)) if entropy else np.random.SeedSequence([])
    got = np.random.SeedSequence(_entropy_words(tuple(entropy)))
    assert np.array_equal(got.generate_state(8), ref.generate_state(8))
    assert np.array_equal(
        np.random.Generator(np.random.PCG64(got)).permutation(50),
        np.random.Generator(np.random.PCG64(ref)).permutation(50),
    )
