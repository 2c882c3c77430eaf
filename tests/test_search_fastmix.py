"""The FastMix mixture optimiser: signals, chain rule through floor and softmax, guards, state."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastmix_data.search.fastmix import FastMix

F64 = torch.float64


def test_starts_uniform_and_reports():
    fm = FastMix(4)
    torch.testing.assert_close(fm.alpha(), torch.full((4,), 0.25, dtype=F64))
    assert FastMix.entropy(fm.alpha()) == pytest.approx(math.log(4))
    torch.testing.assert_close(fm.average(), fm.alpha())


def test_aligned_source_rises():
    """A source whose gradient aligns best with the target (largest inner product) gains weight."""
    fm = FastMix(3, lr=0.05)
    for _ in range(50):
        info = fm.step(torch.tensor([3.0, 1.0, 0.5]), proxy_lr=1e-3)
        assert info.updated
    a = fm.alpha()
    assert int(a.argmax()) == 0 and a[0] > 0.9
    assert fm.steps == 50


def test_grad_z_matches_autograd_through_floor_and_softmax():
    fm = FastMix(4, floor=0.1)
    fm.z = torch.tensor([0.3, -0.2, 0.5, -0.6], dtype=F64)
    scores = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=F64)
    info = fm.step(scores, update=False)
    g = fm.hypergradient(scores, 0.0)
    z = fm.z.clone().requires_grad_(True)
    alpha = 0.9 * torch.softmax(z, 0) + 0.1 / 4
    (ref,) = torch.autograd.grad((alpha * g).sum(), z)
    torch.testing.assert_close(torch.tensor(info.grad_z, dtype=F64), ref, rtol=1e-12, atol=1e-14)


def test_kl_term_matches_autograd():
    prior = [0.4, 0.3, 0.2, 0.1]
    fm = FastMix(4, kl_coef=0.7, prior=prior)
    fm.z = torch.tensor([0.3, -0.2, 0.5, -0.6], dtype=F64)
    scores = torch.tensor([1.0, -2.0, 0.5, 0.25], dtype=F64)
    info = fm.step(scores, update=False)
    g = fm.hypergradient(scores, 0.0)
    z = fm.z.clone().requires_grad_(True)
    a = torch.softmax(z, 0)
    p = torch.tensor(prior, dtype=F64)
    (ref,) = torch.autograd.grad((a * g).sum() + 0.7 * (a * (a / p).log()).sum(), z)
    torch.testing.assert_close(torch.tensor(info.grad_z, dtype=F64), ref, rtol=1e-12, atol=1e-14)


def test_normalized_signal_is_scale_and_lr_invariant_literal_is_not():
    s = torch.tensor([0.3, -0.1, 0.2])
    a, b = FastMix(3), FastMix(3)
    for _ in range(5):
        a.step(s, proxy_lr=1e-3)
        b.step(s * 1e-6, proxy_lr=5.0)
    torch.testing.assert_close(a.z, b.z, rtol=1e-9, atol=1e-12)
    lit_a, lit_b = FastMix(3, signal="literal"), FastMix(3, signal="literal")
    lit_a.step(s, proxy_lr=1e-3)
    lit_b.step(s, proxy_lr=1e-9)  # the reference's warm-up problem: the signal vanishes under Adam's eps
    assert (lit_a.z - lit_b.z).abs().max() > 1e-3
    torch.testing.assert_close(lit_a.hypergradient(s, 2e-3), -2e-3 * s.double())
    # normalized keeps the direction of the literal signal (one positive factor per step)
    ga, gl = a.hypergradient(s, 1.0), lit_a.hypergradient(s, 1.0)
    ratio = ga / gl
    torch.testing.assert_close(ratio, ratio[0].expand(3))
    assert ratio[0] > 0


def test_nonfinite_and_zero_signals_are_skipped_and_counted():
    fm = FastMix(3)
    fm.step(torch.tensor([1.0, 0.0, -1.0]))
    z = fm.z.clone()
    for bad in ([math.nan, math.nan, math.nan], [math.inf, 1.0, 0.0], [1.0, -math.inf, 0.0]):
        info = fm.step(torch.tensor(bad))
        assert not info.updated
    assert fm.skipped_nonfinite == 2  # all-NaN without a `present` mask = no source present
    assert fm.step(torch.tensor([1.0, math.nan, 0.0]), present=torch.tensor([True, True, False])).reason == "nonfinite"
    assert fm.skipped_nonfinite == 3
    info = fm.step(torch.zeros(3))
    assert info.reason == "zero" and fm.skipped_zero == 1
    torch.testing.assert_close(fm.z, z)
    # literal signal overflowing to inf is caught as well
    lit = FastMix(2, signal="literal")
    assert lit.step(torch.tensor([1e308, -1e308]), proxy_lr=1e10).reason == "nonfinite"


def test_absent_sources_keep_their_logit_and_moments():
    fm = FastMix(4)
    fm.step(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    m, v, t = fm.m.clone(), fm.v.clone(), fm.t.clone()
    z_rel = fm.z[1] - fm.z[3]
    fm.step(torch.tensor([5.0, math.nan, -1.0, math.nan]))
    assert fm.m[1] == m[1] and fm.v[3] == v[3] and fm.t[1] == t[1] == 1 and fm.t[0] == 2
    torch.testing.assert_close(fm.z[1] - fm.z[3], z_rel)  # untouched up to the softmax-invariant shift


def test_floor_bounds_min_weight():
    fm = FastMix(5, lr=0.5, floor=0.05)
    for _ in range(300):
        fm.step(torch.tensor([10.0, 0.0, 0.0, 0.0, 0.0]))
    assert float(fm.alpha().min()) >= 0.05 / 5 - 1e-15
    assert float(fm.alpha().sum()) == pytest.approx(1.0)


def test_kl_to_prior_prevents_collapse():
    free, kl = FastMix(3, lr=0.2), FastMix(3, lr=0.2, kl_coef=5.0)
    for _ in range(400):
        s = torch.tensor([1.0, 0.0, 0.0])
        free.step(s)
        kl.step(s)
    assert float(free.alpha()[0]) > 0.95
    assert 1 / 3 < float(kl.alpha()[0]) < 0.8
    assert FastMix.entropy(kl.alpha()) > FastMix.entropy(free.alpha())


def test_average_vs_last_and_warmup_excluded():
    fm = FastMix(2, lr=0.1)
    fm.step(torch.tensor([1.0, -1.0]), update=False)  # warm-up: not averaged, no change
    assert fm.alpha_count == 0 and fm.steps == 0
    alphas = []
    for _ in range(10):
        fm.step(torch.tensor([1.0, -1.0]))
        alphas.append(fm.alpha())
    torch.testing.assert_close(fm.final_weights("average"), torch.stack(alphas).mean(0))
    torch.testing.assert_close(fm.final_weights("last"), alphas[-1])
    with pytest.raises(ValueError):
        fm.final_weights("best")


def test_state_dict_roundtrip_is_json_and_continues_identically():
    a = FastMix(3, lr=0.05, floor=0.01, kl_coef=0.1)
    g = torch.Generator().manual_seed(0)
    seq = [torch.randn(3, generator=g) for _ in range(20)]
    for s in seq[:10]:
        a.step(s)
    blob = json.dumps(a.state_dict())
    b = FastMix(3, lr=0.05, floor=0.01, kl_coef=0.1)
    b.load_state_dict(json.loads(blob))
    for s in seq[10:]:
        a.step(s)
        b.step(s)
    assert torch.equal(a.z, b.z) and torch.equal(a.average(), b.average())
    with pytest.raises(ValueError, match="K=3"):
        FastMix(4).load_state_dict(a.state_dict())


def test_init_and_validation():
    fm = FastMix(3, init=[2, 1, 1])
    torch.testing.assert_close(fm.alpha(), torch.tensor([0.5, 0.25, 0.25], dtype=F64))
    for kw in ({"signal": "cosine"}, {"floor": 1.0}, {"init": [1, 0, 1]}, {"init": [1, 2]}, {"prior": [-1, 1, 1]}):
        with pytest.raises(ValueError):
            FastMix(3, **kw)
