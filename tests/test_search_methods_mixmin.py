"""MixMin: the convex objective, its gradient, EG recovering a planted mixture, proxy caching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from search_corpus import sources, tiny_config, validation, write_tiny_corpus

from fastmix_data.errors import ConfigError
from fastmix_data.search import SearchConfig, run_method
from fastmix_data.search.methods.mixmin import exponentiated_gradient, mixture_gradient, mixture_objective


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))


def planted_scores(alpha, n=3000, length=16, V=12, K=3, seed=0, per_token=False):
    """Sequences drawn from a planted mixture of K categorical 'proxies'; exact log-likelihoods."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(V, 0.3), size=K)  # distinct per-source token distributions
    if per_token:  # every token from the mixture independently
        comp = rng.choice(K, size=(n, length), p=alpha)
    else:  # every sequence from one source
        comp = np.repeat(rng.choice(K, size=n, p=alpha)[:, None], length, axis=1)
    x = np.zeros((n, length), dtype=np.int64)
    for k in range(K):
        m = comp == k
        x[m] = rng.choice(V, size=int(m.sum()), p=P[k])
    logp = np.log(P)[:, x]  # [K, n, length]
    if per_token:
        return torch.from_numpy(logp.reshape(K, -1)), torch.full((n * length,), 1.0 / (n * length), dtype=torch.float64)
    return torch.from_numpy(logp.sum(2)), torch.full((n,), 1.0 / (n * length), dtype=torch.float64)


def test_gradient_matches_autograd():
    logq, coef = planted_scores([0.5, 0.3, 0.2], n=50)
    a = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    M = -(coef * torch.logsumexp(torch.log(a)[:, None] + logq, 0)).sum()
    (g,) = torch.autograd.grad(M, a)
    assert torch.allclose(mixture_gradient(a.detach(), logq, coef), g, atol=1e-12)
    assert mixture_objective(a.detach(), logq, coef) == pytest.approx(float(M.detach()))


@pytest.mark.parametrize("planted", [[0.6, 0.3, 0.1], [0.2, 0.0, 0.8]])
def test_eg_recovers_planted_mixture_and_objective_decreases(planted):
    logq, coef = planted_scores(planted)
    r = exponentiated_gradient(logq, coef)
    assert r.converged and r.steps <= 100
    assert np.abs(r.alpha.numpy() - planted).sum() < 0.05
    obj = [h["objective"] for h in r.history]
    assert obj[-1] < obj[0]
    assert all(b <= a + 1e-9 for a, b in zip(obj[1:], obj[2:]))  # monotone after the first jump
    assert r.history[-1]["movement"] < 1e-4


def test_literal_step_is_monotone_but_slow():
    """eta_scale='none' (the reference update) decreases the objective at every step but, with the
    1/len factor, does not get there in 100 steps on 128-token sequences -- the reason for the default
    'length' scaling."""
    logq, coef = planted_scores([0.6, 0.3, 0.1], n=1000, length=128)
    r = exponentiated_gradient(logq, coef, eta_scale="none")
    obj = [h["objective"] for h in r.history]
    assert all(b <= a + 1e-12 for a, b in zip(obj, obj[1:]))
    assert not r.converged
    assert np.abs(r.alpha.numpy() - [0.6, 0.3, 0.1]).sum() > 0.1


def test_per_token_mixture_recovers_token_level_planting():
    logq, coef = planted_scores([0.5, 0.25, 0.25], n=400, per_token=True)
    r = exponentiated_gradient(logq, coef)
    assert np.abs(r.alpha.numpy() - [0.5, 0.25, 0.25]).sum() < 0.08


def test_eg_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        exponentiated_gradient(torch.tensor([[0.0, float("nan")]]), torch.ones(2))
    with pytest.raises(ValueError, match=r"\[K, M\]"):
        exponentiated_gradient(torch.zeros(2, 3), torch.ones(2))


def test_proxies_share_the_budget_are_cached_and_reused_for_a_new_target(corpus, tmp_path):
    cfg = tiny_config("mixmin", steps=9, cache_dir=str(tmp_path / "cache"), output={"plot": False})
    a = run_method(cfg, sources=sources(corpus), target=validation(corpus), out_dir=tmp_path / "a")
    assert a.details["proxies_cached"] == []
    assert a.compute["tokens"]["train"] == 3 * 3 * 6 * 32  # the budget split evenly: 3 proxies of 3 steps
    b = run_method(cfg, sources=sources(corpus), target=str(corpus / "planted"), out_dir=tmp_path / "b")
    assert sorted(b.details["proxies_cached"]) == sorted(sources(corpus))
    assert b.compute["flops"]["cached"] > 0 and b.compute["flops"]["train"] == a.compute["flops"]["train"]
    c = run_method(cfg, sources=sources(corpus), target=validation(corpus))
    assert c.weights == pytest.approx(a.weights, abs=1e-9)
    w = json.loads((tmp_path / "a" / "weights.json").read_text())
    assert w["method"] == "mixmin" and sum(w["weights"].values()) == pytest.approx(1.0)
    assert set(w["details"]["report"]) >= {"objective", "uniform_objective", "single_source"}
    # a different budget is a different proxy
    d = run_method(tiny_config("mixmin", steps=18, cache_dir=str(tmp_path / "cache")), sources=sources(corpus),
                   target=validation(corpus))
    assert d.details["proxies_cached"] == []


def test_config_validation():
    with pytest.raises(ConfigError, match="mixmin.eta_scale"):
        SearchConfig.from_dict({"max_tokens": 1, "mixmin": {"eta_scale": "auto"}}).validate()
    with pytest.raises(ConfigError, match="mixmin.fit_fraction"):
        SearchConfig.from_dict({"max_tokens": 1, "mixmin": {"fit_fraction": 0}}).validate()
