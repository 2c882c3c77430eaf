"""System-K3's held-out pilot (benchmarks/quality/heldout_pilot.py): its noise pairs and its rule."""

from __future__ import annotations

import pytest
from quality_modules import quality_module


@pytest.fixture(scope="module")
def hp():
    with quality_module("heldout_pilot.py") as mod:
        yield mod


def _grid(*points: tuple[float, float, float]) -> dict:
    return {f"p{i}": dict(zip("abc", p)) for i, p in enumerate(points)}


def test_noise_pairs_are_neighbours_or_all_grid_pairs_when_fewer_than_three(hp):
    near = _grid((0.5, 0.5, 0.0), (0.6, 0.4, 0.0), (0.4, 0.6, 0.0), (0.4, 0.5, 0.1))
    pairs, kind = hp.pairs(near | {"uniform": dict.fromkeys("abc", 1 / 3)})
    assert kind == "neighbouring" and sorted(pairs) == [("p0", "p1"), ("p0", "p2"), ("p0", "p3"), ("p2", "p3")]
    far = _grid((0.5, 0.5, 0.0), (0.6, 0.4, 0.0), (0.0, 0.0, 1.0))  # one neighbouring pair only
    pairs, kind = hp.pairs(far | {"planted": {"a": 0.52, "b": 0.12, "c": 0.36}})
    assert kind == "all" and sorted(pairs) == [("p0", "p1"), ("p0", "p2"), ("p1", "p2")]


def test_licenses_replaces_pymeta_only_at_three_noise_se(hp):
    def summary(effect: float, se: float) -> dict:
        return {"heldout": {"ratio": effect / se}}

    assert hp.decide(summary(0.03, 0.01)) == "licenses"
    assert hp.decide(summary(0.0299, 0.01)) == "pymeta"
    assert hp.decide(summary(-0.05, 0.01)) == "pymeta"
