"""Baselines: natural weights with temperature, the simplex grid, the grid oracle."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
from search_corpus import sources, tiny_config, validation, write_tiny_corpus

from fastmix_data.search import run_method
from fastmix_data.search.methods.grid import grid_size, simplex_grid
from fastmix_data.search.methods.natural import natural_weights, source_token_counts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))


def test_natural_weights_and_temperature():
    counts = {"a": 100, "b": 300, "c": 0}
    assert natural_weights(counts) == pytest.approx({"a": 0.25, "b": 0.75, "c": 0.0})
    assert natural_weights(counts, 0.5) == pytest.approx({"a": 0.1, "b": 0.9, "c": 0.0})  # squares
    hot = natural_weights({"a": 1, "b": 1e6}, 1e6)
    assert hot["a"] == pytest.approx(0.5, abs=1e-3)  # T -> inf: uniform
    assert natural_weights({"a": 1e300, "b": 1e299}, 0.05)["a"] == pytest.approx(1.0)  # no overflow
    with pytest.raises(ValueError, match="temperature"):
        natural_weights(counts, 0)
    with pytest.raises(ValueError, match="all zero"):
        natural_weights({"a": 0})


def test_token_counts_come_from_the_index(corpus):
    counts = source_token_counts(sources(corpus))
    rows = pq.read_table(corpus / "train" / "prose" / "part-00000.parquet").column("text").to_pylist()
    assert counts["prose"] == sum(len(t.encode()) + 1 for t in rows)


@pytest.mark.parametrize("K,n", [(1, 1), (2, 11), (3, 66), (4, 286)])
def test_simplex_grid_step_01(K, n):
    pts = simplex_grid(K, 0.1)
    assert len(pts) == n == math.comb(10 + K - 1, K - 1) == grid_size(K)
    assert len(set(pts)) == n
    for p in pts:
        assert sum(p) == pytest.approx(1.0)
        assert all(abs(x * 10 - round(x * 10)) < 1e-9 and x >= 0 for x in p)
    if K == 3:
        assert (1.0, 0.0, 0.0) in pts and (0.3, 0.3, 0.4) in pts


def test_simplex_grid_rejects_bad_steps():
    with pytest.raises(ValueError, match="1/step"):
        simplex_grid(3, 0.3)


def test_grid_oracle_picks_the_best_point(corpus, tmp_path):
    src = {k: v for k, v in sources(corpus).items() if k in ("code", "prose")}
    cfg = tiny_config("grid", steps=6, cache_dir=str(tmp_path / "c"), grid={"step": 0.5})
    r = run_method(cfg, sources=src, target=validation(corpus)["code"], out_dir=tmp_path / "g")
    losses = [g["target_loss"] for g in r.details["grid"]]
    assert len(losses) == 3 and r.details["best_loss"] == min(losses)
    assert r.weights == r.details["grid"][losses.index(min(losses))]["weights"]
    assert r.weights["code"] >= 0.5  # the target is code
    again = run_method(cfg, sources=src, target=validation(corpus)["code"])
    assert all(t["cached"] for t in again.trajectory)


def test_grid_refuses_many_sources(corpus):
    four = {**sources(corpus), "more": sources(corpus)["code"]}
    with pytest.raises(ValueError, match="K <= 3"):
        run_method(tiny_config("grid"), sources=four, target=validation(corpus))
    assert grid_size(8) == 19448
