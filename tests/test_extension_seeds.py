"""The extension-seeds study (benchmarks/quality/extension_seeds.py): the judge's three undecided
FastMix regret checks on seeds 10-39, against the grid's pick fixed from the judge's seeds 0-9."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from quality_modules import QUALITY, quality_module


@pytest.fixture(scope="module")
def xs():
    with quality_module("extension_seeds.py") as mod:
        yield mod


def _units(regrets: list[float], cell=("stdlib-K3", "heldout")) -> list[dict]:
    return [{"exp": cell[0], "target": cell[1], "seed": 10 + i, "losses": {"fastmix": 2.0 + r, "pick": 2.0},
             "weights": {"fastmix": {"a": 0.5, "b": 0.5}, "pick": {"a": 0.4, "b": 0.6}}} for i, r in enumerate(regrets)]


def test_the_rules_three_outcomes(xs):
    judge = _units([0.02, 0.03])  # the judge's seeds never enter the verdict
    met = xs.cell_summary(_units([0.000, 0.001, -0.001, 0.002, 0.000, 0.001]), judge)
    missed = xs.cell_summary(_units([0.010, 0.011, 0.009, 0.012, 0.010, 0.011]), judge)
    spans = xs.cell_summary(_units([-0.01, 0.02, 0.0, 0.015, -0.005, 0.01]), judge)
    assert (met["verdict"], missed["verdict"], spans["verdict"]) == ("MET", "MISSED", "undecided")
    assert met["regret"]["n"] == 6 and met["judge_regret"]["n"] == 2 and met["pooled_regret"]["n"] == 8
    assert missed["regret"]["mean"] == pytest.approx(0.0105)
    assert xs.LIMIT == 0.005
    # the boundaries: MET includes mean + 2 SE == LIMIT, MISSED needs mean - 2 SE strictly above it
    assert xs.verdict(0.003, 0.001, 0.005) == "MET" and xs.verdict(0.007, 0.001, 0.005) == "undecided"
    assert xs.verdict(0.0071, 0.001, 0.005) == "MISSED"


def _results(picks: dict, in_sample: dict) -> dict:
    oracle = {"picks": picks, "in_sample": {"weights": in_sample}, "by_seed": {s: 2.0 for s in picks}}
    return {"meta": {"parts": [{"args": {"experiments": ["stdlib-K3"], "work": "/w", "seeds": [0, 1, 2],
                                         "final_tokens": 1048576, "threads": 1}}]},
            "summary": {"stdlib-K3": {"targets": {"heldout": {"oracle": oracle}}}}, "runs": []}


def test_the_pick_is_read_from_results_json(xs, tmp_path: Path):
    w = {"code": 0.3, "markup": 0.0, "prose": 0.7}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results({"1": w, "2": w}, w)))
    results = json.loads(path.read_text())
    assert xs.grid_pick(results, "stdlib-K3", "heldout") == w
    run = xs.judge_args(results, "stdlib-K3")
    assert (run.work, run.seeds, run.final_tokens, run.seq_len) == ("/w", [0, 1, 2], 1048576, 64)
    other = {"code": 0.1, "markup": 0.0, "prose": 0.9}
    with pytest.raises(ValueError, match="held-out oracle picked otherwise on seeds {'2'"):
        xs.grid_pick(_results({"1": w, "2": other}, w), "stdlib-K3", "heldout")
    with pytest.raises(ValueError, match="system-K3"):
        xs.judge_args(results, "system-K3")


def test_the_real_judge_gives_its_regrets_and_one_pick_per_cell(xs):
    results = json.loads((QUALITY / "results.json").read_text())
    for exp, targets in xs.CELLS.items():
        for t in targets:
            assert xs.grid_pick(results, exp, t)
            fm = results["summary"][exp]["targets"][t]["methods"]["fastmix"]
            got = xs.er.paired(xs.judge_units(results, exp, t), "fastmix", "pick")
            assert (got["mean"], got["se"], got["n"]) == pytest.approx((fm["regret"][0], fm["regret_se"], 9))
    assert xs.judge_args(results, "system-K3").system_heldout == "pymeta"


def test_extension_seeds_are_disjoint_from_the_judges(xs):
    results = json.loads((QUALITY / "results.json").read_text())
    judge = set().union(*(xs.judge_args(results, e).seeds for e in xs.CELLS))
    assert judge == set(range(10)) == set(xs.rq.build_parser().parse_args([]).seeds)
    assert xs.EXTENSION_SEEDS == tuple(range(10, 40)) and not judge & set(xs.EXTENSION_SEEDS)
    with pytest.raises(SystemExit, match="only with --check-cache"):
        xs.main(["--seeds", "9", "10"])  # refused before anything runs
    with pytest.raises(SystemExit, match="only with --check-cache"):
        xs.main(["--seeds", "12", "--check-cache"])


def test_merge_refuses_a_seed_twice(xs, tmp_path: Path):
    saved = {"meta": {"date": "d"}, "units": _units([0.0])}
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="appears twice"):
        xs.merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")])


def test_stage_two_is_one_undecided_cell_on_fresh_seeds(xs):
    s1, s2 = xs.STAGES[1], xs.STAGES[2]
    assert (s1.cells, s1.seeds, s1.name) == (xs.CELLS, xs.EXTENSION_SEEDS, xs.NAME)
    assert s2.cells == {"system-K3": ("planted",)} and s2.seeds == tuple(range(40, 70))
    assert not set(s2.seeds) & (set(s1.seeds) | set(range(10))) and s2.name != s1.name
    stage1 = json.loads((QUALITY / "extension_seeds.json").read_text())["summary"]
    assert stage1["system-K3/planted"]["verdict"] == "undecided"  # why stage 2 exists
    with pytest.raises(SystemExit, match="stage 2 runs seeds 40-69 only"):
        xs.main(["--stage", "2", "--seeds", "39"])  # refused before anything runs
    before = xs.earlier_units(s2)
    assert {u["seed"] for u in before} == set(s1.seeds) and xs.earlier_units(s1) == []


def test_stage_two_decides_on_its_own_seeds_and_pools_for_reference(xs):
    results = json.loads((QUALITY / "results.json").read_text())
    pick = xs.grid_pick(results, "system-K3", "planted")
    units = [{"exp": "system-K3", "target": "planted", "seed": s, "weights": {"fastmix": pick, "pick": pick},
              "losses": {"fastmix": 2.3 + 0.001 * (s % 3), "pick": 2.3, "planted": 2.31}, "l1": 0.1}
             for s in xs.STAGES[2].seeds]
    s = xs.summarise(units, results, xs.STAGES[2].cells, xs.earlier_units(xs.STAGES[2]))
    d = s["system-K3/planted"]
    assert list(s) == ["system-K3/planted"] and d["regret"]["n"] == 30 and d["verdict"] == "MET"
    assert d["stages_pooled_regret"]["n"] == 60 and d["stages_pooled_regret"]["mean"] > d["regret"]["mean"]
