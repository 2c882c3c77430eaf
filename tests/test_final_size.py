"""The final-run size study: its candidates (fixed mixtures only), its noise measure and its rule."""

from __future__ import annotations

import numpy as np
import pytest
from quality_modules import quality_module


@pytest.fixture(scope="module")
def fs():
    with quality_module("final_size.py") as mod:
        yield mod


NAMES = ["a", "b", "c"]


def _judged(held: dict, planted: dict) -> dict:
    return {"E": {"targets": {"heldout": {"oracle": {"weights": held}}, "planted": {"oracle": {"weights": planted}}}}}


def test_candidates_are_uniform_planted_and_grid_neighbourhoods(fs):
    data = {"sources": dict.fromkeys(NAMES, "x"), "planted_tokens": {"a": 0.52, "b": 0.12, "c": 0.36}}
    # judge picks in a corner (a 0.0 b 0.0 c 1.0: 3 points within one step) and at (0.3, 0.4, 0.3) (7 points);
    # the grid point nearest the planted shares is (0.5, 0.1, 0.4) (7 points, none shared)
    c = fs.candidates("E", data, _judged({"a": 0.0, "b": 0.0, "c": 1.0}, {"a": 0.3, "b": 0.4, "c": 0.3}))
    assert c["uniform"] == dict.fromkeys(NAMES, 1 / 3) and c["planted"] == data["planted_tokens"]
    grid = [w for k, w in c.items() if k not in ("uniform", "planted")]
    assert len(grid) == 3 + 7 + 7
    assert {"a": 0.5, "b": 0.1, "c": 0.4} in grid and {"a": 0.6, "b": 0.0, "c": 0.4} in grid
    assert {"a": 0.0, "b": 0.2, "c": 0.8} not in grid  # two steps from the corner
    assert all(abs(sum(w.values()) - 1) < 1e-9 for w in grid)


def _rows(losses: dict[str, list[float]], target: str) -> list[dict]:
    return [{"label": k, "method": "grid-point", "target": target, "seed": s, "weights": {"k": k},
             "final_loss": v} for k, vs in losses.items() for s, v in enumerate(vs)]


def test_noise_is_the_median_paired_std_of_neighbours_over_the_judges_eval_seeds(fs):
    cands = {"uniform": {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, "p": {"a": 0.5, "b": 0.5, "c": 0.0},
             "q": {"a": 0.6, "b": 0.4, "c": 0.0}, "r": {"a": 0.0, "b": 0.0, "c": 1.0}}
    d = [0.0, 0.01, -0.01, 0.02, -0.02]
    losses = {"uniform": [5.0] * 5, "p": [2.0] * 5, "q": [2.0 + x for x in d], "r": [9.0, 1.0, 9.0, 1.0, 9.0]}
    n = fs.noise(_rows(losses, "heldout"), cands, "heldout")
    assert n["pairs"] == 1  # p-q only: r is not one step from either, uniform is not a grid candidate
    assert n["std_median"] == pytest.approx(np.std(d, ddof=1))
    assert n["se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(5))


def _summary(planted: tuple[float, float], effect: float, se: float) -> dict:
    return {"planted": {"planted": {"regret": [planted[0], 0.0], "regret_se": planted[1]}},
            "heldout": {"uniform": {"regret": [effect, 0.0], "regret_se": 0.0}, "noise": {"se": se}}}


def test_rule_planted_within_two_se_and_effect_three_noise(fs):
    assert fs.passes(_summary((0.012, 0.0035), 0.03, 0.01)) == {"planted_ok": True, "ratio": pytest.approx(3.0),
                                                                "ratio_ok": True}
    assert not fs.passes(_summary((0.012, 0.003), 0.03, 0.01))["planted_ok"]  # 0.006 > 0.005
    assert not fs.passes(_summary((0.0, 0.001), 0.029, 0.01))["ratio_ok"]


def test_decide_takes_the_smallest_size_passing_on_both_corpora(fs):
    good, bad = _summary((0.0, 0.001), 0.1, 0.01), _summary((0.04, 0.005), 0.0, 0.01)
    summary = {"262144": {"stdlib-K3": good, "system-K3": bad}, "1048576": {"stdlib-K3": good, "system-K3": good},
               "4194304": {"stdlib-K3": good, "system-K3": good}}
    assert fs.decide(summary) == (1048576, {"262144": "fails", "1048576": "PASSES", "4194304": "PASSES"})
    # a size with one corpus missing is not a choice, and stops the search for the smallest
    summary["1048576"] = {"system-K3": good}
    chosen, verdict = fs.decide(summary)
    assert chosen is None and verdict["1048576"] == "incomplete"
    assert fs.decide({"262144": {"stdlib-K3": good, "system-K3": bad}})[0] is None
