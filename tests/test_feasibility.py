"""The feasibility study (benchmarks/quality/feasibility.py): the 12 points on the boundary of the L1
ball around the planted shares, the decision rule's three outcomes, and the supplementary quadratic fit."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from quality_modules import quality_module


@pytest.fixture(scope="module")
def fs():
    with quality_module("feasibility.py") as mod:
        yield mod


P = {"code": 0.587, "markup": 0.279, "prose": 0.134}


def test_twelve_points_in_the_simplex_at_l1_radius_and_distinct(fs):
    pts = fs.ball_points(P)
    assert len(pts) == 12
    assert len({json.dumps(w, sort_keys=True) for w in pts.values()}) == 12
    for w in pts.values():
        assert set(w) == set(P) and min(w.values()) >= 0 and sum(w.values()) == pytest.approx(1.0)
        assert fs.rq.l1(w, P) == pytest.approx(0.1)
    assert pts["+markup-code"] == pytest.approx({"code": 0.537, "markup": 0.329, "prose": 0.134})  # a vertex
    assert pts["+code-markup/prose"] == pytest.approx({"code": 0.637, "markup": 0.254, "prose": 0.109})
    assert pts["-prose+code/markup"] == pytest.approx({"code": 0.612, "markup": 0.304, "prose": 0.084})
    # 6 vertices (two coordinates move) and 6 edge midpoints (all three move)
    moved = [sum(not np.isclose(w[n], P[n]) for n in P) for w in pts.values()]
    assert sorted(moved) == [2] * 6 + [3] * 6


def test_points_outside_the_simplex_or_other_k_are_errors(fs):
    with pytest.raises(ValueError, match="not in the simplex"):
        fs.ball_points({"a": 0.96, "b": 0.03, "c": 0.01})
    with pytest.raises(ValueError, match="K = 3"):
        fs.ball_points({"a": 0.5, "b": 0.5})


def _reg(mean: float, se: float) -> dict:
    return {"regret": [mean, se * 3.0], "regret_se": se, "regret_seeds": 9}


def test_rule_three_outcomes(fs):
    # one point within the target beyond 2 SE, confirmed on fresh seeds: feasible
    stage1 = {"planted": _reg(0.013, 0.006), "+a-b": _reg(0.001, 0.001), "+b-a": _reg(0.0015, 0.0005)}
    assert fs.select(stage1) == "+b-a"  # lowest mean + 2 SE among the passing points
    assert fs.verdict(stage1, _reg(0.0, 0.002)) == fs.FEASIBLE
    # the same point fails its confirmation: undecided, not feasible
    assert fs.verdict(stage1, _reg(0.004, 0.002)) == fs.UNDECIDED
    assert fs.verdict(stage1, None) == fs.UNDECIDED
    # every point above the target beyond 2 SE: not feasible at the points tried (confirmation irrelevant)
    far = {"planted": _reg(0.03, 0.005), "+a-b": _reg(0.02, 0.007)}
    assert fs.verdict(far, _reg(0.0, 0.001)) == fs.NOT_FEASIBLE
    # one point spans the target: undecided
    near = {"planted": _reg(0.03, 0.005), "+a-b": _reg(0.008, 0.003)}
    assert fs.select(near) == "+a-b"
    assert fs.verdict(near, _reg(0.0, 0.001)) == fs.UNDECIDED


def test_quadratic_fit_recovers_a_quadratic(fs):
    names = sorted(P)
    grid = [dict(zip(names, (a / 10, b / 10, (10 - a - b) / 10))) for a in range(11) for b in range(11 - a)]
    opt = np.array([0.4, 0.4, 0.2])
    loss = [2.0 + float(np.sum((np.array([w[n] for n in names]) - opt) ** 2)) for w in grid]
    fit = fs.quadratic_fit(grid, loss, P, {"code": 0.4, "markup": 0.4, "prose": 0.2})
    assert fit["n"] == 66 and fit["residual_std"] < 1e-9
    assert [fit["min_simplex"][n] for n in names] == pytest.approx(opt, abs=0.003)
    assert fit["min_ball_l1"] == pytest.approx(0.1, abs=0.006)  # the optimum is outside: the ball's minimum is on its rim
    assert fit["regret_planted_vs_pick"] == pytest.approx(sum((P[n] - o) ** 2 for n, o in zip(names, opt)), abs=1e-9)
    assert 0 < fit["regret_ball_vs_pick"] < fit["regret_planted_vs_pick"]


def test_no_judge_is_a_clear_error(fs):
    with pytest.raises(SystemExit, match="EXP=WORK"):
        fs.main(["--judge", "K8=/nowhere"])
    with pytest.raises(SystemExit, match="EXP=WORK"):
        fs.main([])


def test_points_cover_every_direction(fs):
    """Each ordered pair of sources has a vertex: weight moved from i to j."""
    pts = fs.ball_points(P)
    for i, j in itertools.permutations(P, 2):
        w = pts[f"+{j}-{i}"]
        assert w[j] - P[j] == pytest.approx(0.05) and P[i] - w[i] == pytest.approx(0.05)


def test_report_states_each_point_and_the_verdict(fs, tmp_path):
    pts = {"planted": P, **fs.ball_points(P)}
    stage1 = {k: {**_reg(0.02, 0.004), "l1": fs.rq.l1(w, P), "weights": w, "wins": 1} for k, w in pts.items()}
    fit = fs.quadratic_fit(list(pts.values()), [2.0 + 0.001 * i for i in range(13)], P, P)
    corpus = {"planted_tokens": P, "cache_check": {"seed": 1, "loss": 1.96, "cached": True}, "stage1": stage1,
              "selected": "planted", "confirmation": {**_reg(0.02, 0.003), "point": "planted", "pick": P, "wins": 0},
              "verdict": fs.verdict(stage1, None), "quadratic_fit": fit, "rows": [{"cached": True}, {"cached": False}],
              "settings": {"final_tokens": 1048576}}
    meta = fs.rq.run_meta(0.0, "1 1 1", nice=15, threads=1, used=["stdlib-K3"])
    fs.render({"meta": {"parts": [meta]}, "corpora": {"stdlib-K3": corpus}}, tmp_path)
    md = (tmp_path / "feasibility.md").read_text()
    assert corpus["verdict"] == fs.NOT_FEASIBLE and f"**Verdict: {fs.NOT_FEASIBLE}.**" in md
    assert sum(line.startswith("| `") for line in md.splitlines()) == 13
    assert "final runs trained here: 1 of 2" in md and "Model estimate (not a measurement)" in md
