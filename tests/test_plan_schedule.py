"""Property tests of the low-discrepancy schedule: the bound stated in fastmix_data/plan/schedule.py."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fastmix_data.plan.schedule import first_position_reaching, prefix_counts, schedule_range

weights_st = st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=12).filter(
    lambda ws: sum(ws) > 1e-6 and all(w == 0 or w > 1e-4 for w in ws)
)


def _norm(ws):
    w = np.asarray(ws, dtype=np.float64)
    return w / w.sum()


@settings(max_examples=200, deadline=None)
@given(weights_st, st.integers(0, 10_000), st.integers(1, 400))
def test_window_bound_holds(ws, start, n):
    w = _norm(ws)
    k = int((w > 0).sum())
    src, _ = schedule_range(w, start, start + n)
    counts = np.bincount(src, minlength=len(w))
    bound = 1 + w * k
    assert np.all(np.abs(counts - w * n) <= bound + 1e-9), (counts, w * n, bound)


@settings(max_examples=200, deadline=None)
@given(weights_st, st.integers(0, 1_000_000))
def test_prefix_counts_sum_and_bound(ws, m):
    w = _norm(ws)
    k = int((w > 0).sum())
    c = prefix_counts(w, m)
    assert c.sum() == m
    assert np.all(c[w == 0] == 0)
    assert np.all(np.abs(c - w * m) <= (1 + w * k) / 2 + 1e-9)


@settings(max_examples=100, deadline=None)
@given(weights_st, st.integers(0, 5_000), st.integers(0, 300), st.integers(0, 300))
def test_ranges_compose(ws, a, b, c):
    """Generating [a, a+b+c) at once equals generating [a, a+b) then [a+b, a+b+c)."""
    w = _norm(ws)
    whole_s, whole_o = schedule_range(w, a, a + b + c)
    s1, o1 = schedule_range(w, a, a + b)
    s2, o2 = schedule_range(w, a + b, a + b + c)
    assert np.array_equal(whole_s, np.concatenate([s1, s2]))
    assert np.array_equal(whole_o, np.concatenate([o1, o2]))


@settings(max_examples=100, deadline=None)
@given(weights_st, st.integers(1, 2_000))
def test_ordinals_count_up_per_source(ws, n):
    w = _norm(ws)
    src, ordinal = schedule_range(w, 0, n)
    for k in range(len(w)):
        assert np.array_equal(ordinal[src == k], np.arange((src == k).sum()))


def test_tiny_weight_is_never_rounded_away():
    w = _norm([1e-4, 1.0 - 1e-4])
    src, _ = schedule_range(w, 0, 100_000)
    got = int((src == 0).sum())
    assert abs(got - 10) <= 1
    first = int(np.nonzero(src == 0)[0][0])
    assert first <= 1 / 2 + 1 / (2 * 1e-4)


def test_first_position_reaching_matches_linear_scan():
    w = _norm([0.2, 0.5, 0.3])
    for count in range(1, 40):
        m = first_position_reaching(w, 0, count, 1_000)
        assert prefix_counts(w, m)[0] >= count and prefix_counts(w, m - 1)[0] < count
