"""DoReMi: clipped excess per source, the smoothed update, the run-average output."""

from __future__ import annotations

import pytest
import torch
from search_corpus import sources, tiny_config, write_tiny_corpus

from fastmix_data.search import run_method
from fastmix_data.search.methods.doremi import doremi_update, excess_by_source


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))


def test_excess_is_clipped_and_averaged_per_source():
    tl = torch.tensor([[3.0, 1.0], [2.0, 2.0], [5.0, 0.5]], requires_grad=True)
    ref = torch.tensor([[1.0, 2.0], [2.5, 1.0], [1.0, 1.0]])
    source = torch.tensor([0, 1, 0])
    lam, present = excess_by_source(tl, ref, source, K=3)
    # source 0: tokens (2, 0 clipped, 4, 0 clipped) -> 6/4; source 1: (0 clipped, 1) -> 1/2; source 2 absent
    assert lam.tolist() == pytest.approx([1.5, 0.5, 0.0])
    assert present.tolist() == [True, True, False]
    (g,) = torch.autograd.grad(lam.sum(), tl)
    assert (g[tl.detach() < ref] == 0).all()  # clipped tokens give no gradient
    assert g[0, 0] == pytest.approx(0.25)


def test_update_is_smoothed_toward_uniform():
    alpha = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    lam = torch.tensor([10.0, 0.0, 0.0])
    new = doremi_update(alpha, lam, eta=1.0, smoothing=1e-3)
    raw = alpha * torch.exp(lam.double())
    raw = raw / raw.sum()
    assert torch.allclose(new, (1 - 1e-3) * raw + 1e-3 / 3)
    assert new.sum() == pytest.approx(1.0) and new.min() >= 1e-3 / 3
    assert torch.allclose(doremi_update(alpha, torch.zeros(3), smoothing=1.0), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_run_doremi_outputs_the_average_and_reuses_the_reference(corpus, tmp_path):
    cfg = tiny_config("doremi", steps=20, cache_dir=str(tmp_path / "cache"), doremi={"log_every": 5})
    r = run_method(cfg, sources=sources(corpus), out_dir=tmp_path / "a")
    assert r.weights == pytest.approx(r.trajectory[-1]["average"])
    assert r.weights != pytest.approx(r.candidates["last"])
    assert not r.details["reference_cached"]
    # the reference and the proxy share the budget: 10 steps each
    assert r.compute["tokens"]["train"] == 20 * 6 * 32
    assert r.compute["tokens"]["eval"] == 10 * 6 * 32  # the reference's forward on every proxy batch
    again = run_method(cfg, sources=sources(corpus))
    assert again.details["reference_cached"] and again.weights == pytest.approx(r.weights)
    assert again.compute["flops"]["total"] == pytest.approx(r.compute["flops"]["total"])  # reuse is charged
