"""FastMix's export-rule study (benchmarks/quality/export_rule.py) chooses on targets and seeds the
quality benchmark (run_quality.py, the judge) does not score."""

from __future__ import annotations

import pytest
from quality_modules import quality_module


@pytest.fixture(scope="module")
def mods():
    with quality_module("export_rule.py") as er:
        yield er, er.rq


def test_dev_targets_are_not_the_judges(mods):
    er, rq = mods
    dev, judge = er.target_specs(er.DEV_EXPERIMENTS), er.target_specs(rq.EXPERIMENTS)
    assert len(dev) == 2 * len(er.DEV_EXPERIMENTS)  # a held-out and a planted target each, all distinct
    assert not dev & judge
    # nor a judge's planted proportions on other sources' names, or a judge's held-out domain
    judge_props = {tuple(sorted(s["planted"].values())) for s in rq.EXPERIMENTS.values()}
    assert not {tuple(sorted(s["planted"].values())) for s in er.DEV_EXPERIMENTS.values()} & judge_props
    assert not {s["heldout"] for s in er.DEV_EXPERIMENTS.values()} & {s["heldout"] for s in rq.EXPERIMENTS.values()}


def test_target_specs_sees_a_judge_target_under_another_name(mods):
    er, rq = mods
    spec = dict(rq.EXPERIMENTS["system-K3"])
    spec["sources"] = list(reversed(spec["sources"]))  # same target, sources listed in another order
    assert er.target_specs({"dev-copy": spec}) <= er.target_specs(rq.EXPERIMENTS)
    spec["heldout"] = "licenses"
    assert er.target_specs({"dev-copy": spec}) & er.target_specs(rq.EXPERIMENTS)  # the planted one still is


def test_dev_seeds_and_domains(mods):
    er, rq = mods
    assert not set(er.DEV_SEEDS) & set(rq.build_parser().parse_args([]).seeds)
    for spec in er.DEV_EXPERIMENTS.values():
        for d in [*spec["sources"], spec["heldout"], *spec["planted"]]:
            assert d in rq.STDLIB or d in rq.SYSTEM, d
        assert set(spec["planted"]) <= set(spec["sources"]) and spec["heldout"] not in spec["sources"]


def test_decide_keeps_average_unless_a_candidate_is_better_beyond_noise(mods):
    er, _ = mods

    def units(deltas: dict[str, list[float]]) -> list[dict]:
        n = len(next(iter(deltas.values())))
        return [{"losses": {"average": 2.0, **{c: 2.0 + deltas.get(c, [0.0] * n)[i] for c in er.CANDIDATES
                                              if c != "average"}}} for i in range(n)]

    assert er.decide(units({"last": [-0.01, 0.012, -0.003, 0.004]})) == "average"  # within noise
    assert er.decide(units({"last": [-0.010, -0.012, -0.009, -0.011]})) == "last"
    # tail a little better than last but not beyond noise: the simpler 'last'
    assert er.decide(units({"last": [-0.010, -0.012, -0.009, -0.011],
                            "tail": [-0.013, -0.011, -0.012, -0.012]})) == "last"
    assert er.decide(units({"last": [-0.010, -0.012, -0.009, -0.011],
                            "tail": [-0.030, -0.031, -0.029, -0.030]})) == "tail"
