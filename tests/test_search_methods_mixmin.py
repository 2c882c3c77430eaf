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


def test_examples_group_a_documents_sequences_and_keep_token_shares():
    """A document's consecutive sequences form examples of up to example_tokens tokens; the EG on the
    examples estimates TOKEN shares (long documents of source 0, short ones of source 1: half the
    documents each, 10/11 of the tokens from source 0: the example shares are not token shares)."""
    from fastmix_data.search.methods.mixmin import example_columns, example_ids
    from fastmix_data.search.targets import TargetSet

    rng = np.random.default_rng(0)
    L, V = 8, 6
    P = np.array([[0.3, 0.25, 0.2, 0.1, 0.08, 0.07], [0.07, 0.08, 0.1, 0.2, 0.25, 0.3]])
    docs = [(k, 20 if k == 0 else 2) for k in rng.permutation([0] * 60 + [1] * 60)]
    src = np.concatenate([[k] * n for k, n in docs])
    doc = torch.from_numpy(np.concatenate([[i] * n for i, (_, n) in enumerate(docs)]))
    x = np.stack([rng.choice(V, size=L + 1, p=P[k]) for k in src])
    t = TargetSet(torch.from_numpy(x), torch.zeros(len(x), dtype=torch.int64), ["t"], doc=doc)
    ex = example_ids(t, 8 * L)  # blocks of 8 sequences of one document
    assert int(ex.max()) + 1 == sum(-(-n // 8) for _, n in docs)
    for e in range(int(ex.max()) + 1):
        assert len(set(doc[ex == e].tolist())) == 1 and int((ex == e).sum()) <= 8
    logq = torch.from_numpy(np.log(P)[:, x[:, 1:]].sum(2))  # [K, N]
    coef = t.example_weights() / t.scored()
    token_share = np.array([1 - src.mean(), src.mean()])  # 1,200 of 1,320 sequences from source 0
    e = example_columns(logq, t, ex)
    by_doc = e.token_shares(exponentiated_gradient(e.logq, e.coef(), max_steps=2000, tol=1e-8).alpha).numpy()
    by_seq = exponentiated_gradient(logq, coef, max_steps=2000, tol=1e-8).alpha.numpy()
    assert np.abs(by_doc - token_share).sum() < 0.05, (by_doc, token_share)
    assert np.abs(by_seq - token_share).sum() < 0.05, (by_seq, token_share)  # one sequence each: the same target
    beta = exponentiated_gradient(e.logq, e.coef(), max_steps=2000, tol=1e-8).alpha.numpy()
    assert abs(beta[0] - 0.75) < 0.05  # the examples' own shares: 60 x 3 blocks against 60 x 1
    assert example_ids(t, 0).tolist() == list(range(len(x)))  # 0: one sequence per example
