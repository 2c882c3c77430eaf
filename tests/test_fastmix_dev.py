"""FastMix's defaults study (benchmarks/quality/fastmix_dev.py): its variants are valid configs of
the judge's searches, chosen on the development seeds, by a rule that keeps the defaults within noise."""

from __future__ import annotations

from pathlib import Path

import pytest
from quality_modules import quality_module


@pytest.fixture(scope="module")
def dev():
    with quality_module("fastmix_dev.py") as mod:
        yield mod


def test_variants_are_one_change_each_to_the_judges_config(dev, tmp_path: Path):
    rq = dev.rq
    args = rq.build_parser().parse_args([])
    base = rq.method_config(args, "fastmix", 100, tmp_path)
    assert base.to_dict() == rq.method_config(args, "fastmix", 100, tmp_path, {}).to_dict()
    schedule = {"z_lr": 0.0625, "warmup_steps": 13}
    got = {v: dev.overrides(spec, schedule, 256) for v, spec in dev.VARIANTS.items()}
    assert got == {"travel-x0.5": {"z_lr": 0.03125}, "travel-x2": {"z_lr": 0.125},
                   "residual-off": {"residual": False}, "warmup-0.2": {"warmup_steps": 51},
                   "residual-0.5": {"residual_weight": 0.5}, "residual-0.25": {"residual_weight": 0.25},
                   "adam-precond": {"precondition": True}}
    for ov in got.values():
        cfg = rq.method_config(args, "fastmix", 100, tmp_path, ov).to_dict()
        changed = {k for k in cfg["fastmix"] if cfg["fastmix"][k] != base.to_dict()["fastmix"][k]}
        assert changed == set(ov)
        assert {k: v for k, v in cfg.items() if k != "fastmix"} == {k: v for k, v in base.to_dict().items()
                                                                     if k != "fastmix"}


def test_dev_seeds_are_not_the_judges(dev):
    assert not set(dev.DEV_SEEDS) & set(dev.rq.build_parser().parse_args([]).seeds)
    assert set(dev.DEV_SEEDS) <= set(dev.er.DEV_SEEDS)


def test_decide_keeps_the_defaults_unless_a_variant_is_better_beyond_noise(dev):
    def units(deltas: dict[str, list[float]]) -> list[dict]:
        n = len(next(iter(deltas.values())))
        return [{"losses": {"defaults": 2.0, **{v: 2.0 + d[i] for v, d in deltas.items()}}} for i in range(n)]

    assert dev.decide(units({"a": [-0.01, 0.012, -0.003, 0.004]}), ["a"]) == "defaults"  # within noise
    assert dev.decide(units({"a": [0.010, 0.012, 0.009, 0.011]}), ["a"]) == "defaults"  # worse
    both = units({"a": [-0.010, -0.012, -0.009, -0.011], "b": [-0.020, -0.021, -0.019, -0.020]})
    assert dev.decide(both, ["a", "b"]) == "b"
    assert dev.decide(both, ["a"]) == "a"


def test_the_guarded_rule_also_refuses_a_variant_worse_on_one_target_kind(dev):
    """adam-precond's rule: better pooled by more than 2 SE AND no target kind worse by more than 2 SE."""
    def units(held: list[float], planted: list[float]) -> list[dict]:
        return [{"target": t, "losses": {"defaults": 2.0, "adam-precond": 2.0 + d}}
                for t, ds in (("heldout", held), ("planted", planted)) for d in ds]

    better = units([-0.010, -0.012, -0.009, -0.011], [-0.001, 0.001, -0.002, 0.000])
    assert dev.kind_guard(better, "adam-precond")
    assert dev.decide(better, ["adam-precond"], guarded=dev.GUARDED) == "adam-precond"
    lopsided = units([-0.060, -0.062, -0.059, -0.061] * 2, [0.004, 0.005, 0.006, 0.005] * 2)  # planted worse
    pooled = dev.er.paired(lopsided, "adam-precond", "defaults")
    assert pooled["mean"] + 2 * pooled["se"] < 0
    assert not dev.kind_guard(lopsided, "adam-precond")
    assert dev.decide(lopsided, ["adam-precond"]) == "adam-precond"  # the unguarded rule would take it
    assert dev.decide(lopsided, ["adam-precond"], guarded=dev.GUARDED) == "defaults"
    assert set(dev.by_kind(lopsided, ["adam-precond"])) == {"heldout", "planted"}
