"""Schedules derived from the budget are sane at 100k and at 10B proxy tokens (pure functions)."""

from __future__ import annotations

import math

import pytest

from fastmix_data.search import schedule as S
from fastmix_data.search.config import SearchConfig

SMALL, LARGE = 100_000, 10_000_000_000
SHAPES = [(16, 128), (8, 2048), (32, 64)]


@pytest.mark.parametrize("tokens", [SMALL, LARGE])
@pytest.mark.parametrize("batch,seq", SHAPES)
def test_fastmix_schedule_converges_within_the_budget(tokens, batch, seq):
    b = S.Budget(tokens, batch * seq)
    s = S.fastmix_schedule(b.steps)
    assert 0 <= s.warmup_steps < b.steps and s.outer_every >= 1
    assert s.updates >= min(S.FASTMIX_UPDATES, (b.steps - s.warmup_steps)) * 0.9  # enough updates to converge
    assert s.updates <= 1.1 * S.FASTMIX_UPDATES or s.outer_every == 1  # ... and no more than planned
    # the steps add up to FASTMIX_TRAVEL logit units (unless capped by the largest default step),
    # decaying along a cosine to z_min_lr_ratio of the peak at the last update
    travel = sum(s.z_lr_at(u) for u in range(s.updates))
    assert travel == pytest.approx(S.FASTMIX_TRAVEL, rel=0.05) or s.z_lr == S.FASTMIX_MAX_Z_LR
    assert s.z_lr_at(s.updates - 1) == pytest.approx(S.FASTMIX_Z_MIN_LR_RATIO * s.z_lr)
    assert s.z_lr_schedule == "cosine" and s.z_lr_at(0) == s.z_lr
    # the warm-up is the same share of the run at any budget
    assert s.warmup_steps == round(S.FASTMIX_WARMUP_FRACTION * b.steps)


def test_fastmix_schedule_counts_updates_exactly():
    for steps, warm, every in [(100, 0, 1), (100, 10, 5), (101, 7, 4), (5, 10, 1)]:
        s = S.fastmix_schedule(steps, warmup_steps=warm, outer_every=every)
        brute = sum(1 for i in range(1, steps + 1) if i % every == 0 and i >= warm)
        assert s.updates == brute, (steps, warm, every)
    assert S.fastmix_schedule(100, z_lr=0.3).z_lr == 0.3  # given values are kept


@pytest.mark.parametrize("tokens", [SMALL, 20_000_000, LARGE])
@pytest.mark.parametrize("K,groups", [(2, 1), (3, 3), (8, 1)])
def test_aioli_schedule_fits_the_budget(tokens, K, groups):
    steps = S.Budget(tokens, 16 * 128).steps
    a = S.aioli_schedule(steps, K, groups)
    assert a.sweeps % 2 == 0  # antithetic pairs cancel a linear trend along the sweep
    assert 0 < a.initial_steps < steps
    probes = a.rounds * a.probe_steps_per_round(K)
    assert probes <= steps - a.initial_steps
    assert probes <= 0.3 * steps or a.probe_steps == 1  # most of the budget trains on the mixture
    assert 1 <= a.probe_steps <= S.AIOLI_MAX_PROBE_STEPS and a.rounds >= 1
    assert a.rho != pytest.approx(1 / K) and 0 < a.rho < 1
    assert a.eta * a.rounds == pytest.approx(S.AIOLI_TRAVEL * K * groups)


def test_aioli_schedule_names_what_does_not_fit():
    with pytest.raises(ValueError, match="cannot hold 3 round"):
        S.aioli_schedule(20, 3, 3, rounds=3, probe_steps=4)


@pytest.mark.parametrize("tokens", [SMALL, LARGE])
def test_other_schedules(tokens):
    b = S.Budget(tokens, 2048, grad_accum=4)
    assert b.steps % 4 == 0 and b.optimizer_steps * 4 == b.steps and b.steps * 2048 >= tokens
    w = S.lr_warmup_steps(b.optimizer_steps)
    assert 1 <= w <= S.LR_WARMUP_MAX and w <= max(1, b.optimizer_steps // 10)
    ref, proxy = S.doremi_split(tokens, 0.5)
    assert ref + proxy == tokens and abs(ref - proxy) <= 1
    assert S.mixmin_proxy_tokens(tokens, 4) * 4 <= tokens
    every = S.checkpoint_every(b.steps, 4)
    assert every % 4 == 0 and math.ceil(b.steps / every) <= 11
    assert 1 <= S.doremi_log_every(b.steps) and b.steps // S.doremi_log_every(b.steps) <= 101


def test_more_budget_never_means_fewer_updates():
    prev = 0
    for tokens in (10**5, 10**6, 10**7, 10**8, 10**9, 10**10):
        u = S.fastmix_schedule(S.Budget(tokens, 2048).steps).updates
        assert u >= min(prev, S.FASTMIX_UPDATES)
        prev = u


def test_auto_fields_resolve_the_same_from_any_front_end():
    """None = derived: the config keeps None, so the schedule is a function of the budget only."""
    c = SearchConfig.from_dict({"max_tokens": "10B"})
    assert (c.fastmix.warmup_steps, c.fastmix.outer_every, c.fastmix.z_lr) == (None, None, None)
    assert (c.aioli.rounds, c.aioli.sweeps, c.aioli.probe_steps, c.aioli.eta) == (None,) * 4
