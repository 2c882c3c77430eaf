"""Aioli: undoing the probe smoothing, the update, probes that leave the main stream intact and are
counted as real training steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from search_corpus import sources, tiny_config, tiny_train, validation, write_tiny_corpus

from fastmix_data.search import load_target, run_method
from fastmix_data.search.config import TrainConfig
from fastmix_data.search.methods.aioli import (
    learn_params,
    normalise_mixing_matrix,
    smoothing_matrix,
    unsmooth,
    update_weights,
)
from fastmix_data.search.proxy.trainer import ProxyTrainer, make_stream
from fastmix_data.search.schedule import AioliSchedule, aioli_schedule


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))


@pytest.mark.parametrize("K,rho", [(2, 0.625), (3, 0.5), (7, 0.75), (4, 0.1)])
def test_unsmooth_is_exact(K, rho):
    g = torch.Generator().manual_seed(K)
    A = torch.randn(5, K, generator=g, dtype=torch.float64)
    Q = smoothing_matrix(K, rho)
    assert torch.allclose(Q.sum(0), torch.ones(K, dtype=torch.float64))  # columns are mixtures
    assert torch.allclose(Q[:, 0], torch.tensor([rho] + [(1 - rho) / (K - 1)] * (K - 1), dtype=torch.float64))
    observed = A @ Q  # drops are linear in the probe mixture
    assert torch.allclose(unsmooth(observed, rho), A, atol=1e-10)


def test_unsmooth_refuses_uniform_probes():
    with pytest.raises(ValueError, match="1/K"):
        unsmooth(torch.ones(2, 4), 0.25)


def test_normalise_and_update():
    A = torch.tensor([[-1.0, 2.0], [0.0, 3.0]], dtype=torch.float64)
    N = normalise_mixing_matrix(A)
    assert N.min() == 0 and N.sum() == pytest.approx(1.0)
    assert torch.allclose(N, torch.tensor([[0.0, 3.0], [1.0, 4.0]], dtype=torch.float64) / 8)
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    new = update_weights(p, N, w, eta=2.0)
    expect = np.array([0.5 * np.exp(2 * 0.5 / 8), 0.5 * np.exp(2 * 3.5 / 8)])
    assert new.numpy() == pytest.approx(expect / expect.sum())


def test_probes_leave_the_main_stream_untouched_and_are_counted(corpus):
    tcfg = TrainConfig.from_dict(tiny_train())
    stream = make_stream(sources(corpus), None, tcfg)
    it = iter(stream)
    for _ in range(3):
        next(it)
    before = stream.state_dict()
    trainer = ProxyTrainer(tcfg, 100)
    val = load_target(validation(corpus), tcfg.seq_len, max_seqs=12)
    sched = AioliSchedule(initial_steps=0, rounds=1, sweeps=2, probe_steps=3, eta=1.0, rho=0.75)
    obs, log = learn_params(trainer, stream, val, sched, np.random.default_rng(0), list(sources(corpus)))
    after = stream.state_dict()
    assert after["next_batch"] == before["next_batch"] == 3
    assert after["history"] == before["history"]
    assert len(stream.probes) == 3 * 2
    assert log["steps"] == trainer.steps == 3 * 2 * 3
    assert trainer.meter.tokens["train"] == 3 * 2 * 3 * tcfg.tokens_per_step
    assert trainer.meter.tokens["eval"] == (3 * 2 + 1) * val.num_tokens  # validation passes counted
    assert obs.shape == (3, 3) and torch.isfinite(obs).all()
    order = [p["source"] for p in log["probes"]]
    assert order[3:] == order[:3][::-1]  # antithetic: the second sweep probes in reverse order
    fresh = make_stream(sources(corpus), None, tcfg)  # the main stream continues exactly where it was
    ref = [b["tokens"] for _, b in zip(range(4), fresh)][3]
    assert torch.equal(next(it)["tokens"], ref)


def test_run_aioli_at_its_defaults_counts_probe_steps_and_drives_a_sink(corpus, tmp_path):
    sink = make_stream(sources(corpus), None, TrainConfig.from_dict(tiny_train()))
    r = run_method(tiny_config("aioli", steps=60), sources=sources(corpus), target=validation(corpus),
                   out_dir=tmp_path, sink=sink)
    sched = aioli_schedule(60, 3, 3)
    assert r.details["schedule"] == sched.to_dict() and sched.sweeps == 2
    assert r.compute["details"]["probe_steps"] == sched.rounds * sched.probe_steps_per_round(3)
    assert r.compute["optimizer_steps"] == 60 and r.compute["tokens"]["train"] == 60 * 6 * 32
    assert sink.history[-1]["version"] == 1 + sched.rounds + 1  # initial, one per round, the exported average
    assert sink.weights == pytest.approx(r.weights) and sum(r.weights.values()) == pytest.approx(1.0)
    rounds = [t for t in r.trajectory if t.get("round", -1) >= 0]
    assert len(rounds) == sched.rounds and all(len(t["A"]) == 3 for t in rounds)


def test_antithetic_sweeps_cancel_a_linear_learning_curve():
    """Drops that fall linearly with time (the learning curve) plus a true per-source effect: with
    paired reversed sweeps the position bias cancels and the recovered A ranks the sources right."""
    K, true = 3, torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    sweeps, rho = 2, 0.6
    Q = smoothing_matrix(K, rho)
    rng = np.random.default_rng(0)
    order, t, obs = [], 0, torch.zeros(K, dtype=torch.float64)
    for r in range(sweeps):  # the schedule learn_params uses
        order = order[::-1] if r % 2 == 1 else rng.permutation(K).tolist()
        for j in order:
            obs[j] += float(true @ Q[:, j]) + 1.0 - 0.1 * t  # effect + steep linear trend
            t += 1
    A = unsmooth((obs / sweeps)[None, :], rho)[0]
    assert torch.allclose(A - A.mean(), true - true.mean(), atol=1e-12)


def test_budget_too_short_for_the_probes(corpus):
    cfg = tiny_config("aioli", steps=8, aioli={"rounds": 2, "probe_steps": 4})
    with pytest.raises(ValueError, match="cannot hold 2 round"):
        run_method(cfg, sources=sources(corpus), target=validation(corpus))
