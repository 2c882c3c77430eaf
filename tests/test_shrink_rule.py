"""The shrink study (benchmarks/quality/shrink_rule.py): FastMix's average export pulled toward the
search's start, chosen on the development targets and seeds, by a rule that keeps ``average`` within noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from quality_modules import quality_module

from fastmix_data.search.outputs import CONFIG_FILE, TRAJECTORY_FILE


@pytest.fixture(scope="module")
def sr():
    with quality_module("shrink_rule.py") as mod:
        yield mod


def test_dev_targets_and_seeds_are_not_the_judges(sr):
    er, rq = sr.er, sr.rq
    assert not er.target_specs(er.DEV_EXPERIMENTS) & er.target_specs(rq.EXPERIMENTS)
    assert not set(er.DEV_SEEDS) & set(rq.build_parser().parse_args([]).seeds)
    args = er.dev_parser(sr.__doc__, "shrink_rule", er.DEV_SEEDS).parse_args([])
    assert args.seeds == list(range(100, 110))
    # the development studies' 262k-token runs, not the judge's 1M default (their caches are keyed by it)
    assert args.final_tokens == 262_144 != rq.build_parser().parse_args([]).final_tokens


def test_shrink_arithmetic(sr):
    avg, start = {"a": 0.06, "b": 0.90, "c": 0.04}, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    got = sr.shrink(avg, start, 0.25)
    assert got == pytest.approx({"a": 0.75 * 0.06 + 0.25 / 3, "b": 0.75 * 0.90 + 0.25 / 3, "c": 0.75 * 0.04 + 0.25 / 3})
    assert sum(got.values()) == pytest.approx(1.0)
    assert sr.shrink(avg, start, 0.5)["b"] == pytest.approx(0.45 + 1 / 6)
    assert sr.shrink(avg, start, 0.0) == avg and sr.shrink(avg, start, 1.0) == pytest.approx(start)
    with pytest.raises(ValueError, match="lambda"):
        sr.shrink(avg, start, 1.5)
    with pytest.raises(ValueError, match="sources"):
        sr.shrink(avg, {"a": 0.5, "b": 0.5}, 0.25)
    assert sr.SHRINK == {"shrink-0.25": 0.25, "shrink-0.5": 0.5}


def _run_dir(tmp_path: Path, init, first: dict, updated: bool = False) -> Path:
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"config": {"fastmix": {"init_weights": init}}, "resolved": {},
                                                    "source_names": ["a", "b", "c"]}))
    recs = [{"step": 0, "updated": updated, "weights": first}, {"step": 2, "updated": True,
                                                                "weights": {"a": 0.2, "b": 0.5, "c": 0.3}}]
    (tmp_path / TRAJECTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path


def test_start_is_the_configs_and_must_be_the_first_record(sr, tmp_path: Path):
    u = {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    assert sr.start_mixture(_run_dir(tmp_path, None, u)) == pytest.approx(u)
    init = {"a": 0.5, "b": 0.25, "c": 0.25}
    assert sr.start_mixture(_run_dir(tmp_path, init, init)) == init
    with pytest.raises(RuntimeError, match="first record"):
        sr.start_mixture(_run_dir(tmp_path, None, init))  # the trajectory did not start from the config's mixture
    with pytest.raises(RuntimeError, match="first record"):
        sr.start_mixture(_run_dir(tmp_path, None, u, updated=True))


def test_rule_keeps_average_unless_a_shrink_is_better_beyond_noise(sr):
    def units(deltas: dict[str, list[float]]) -> list[dict]:
        n = len(next(iter(deltas.values())))
        return [{"exp": "e", "target": "heldout", "losses": {"average": 2.0, **{c: 2.0 + deltas.get(c, [0.0] * n)[i]
                                                                              for c in sr.SHRINK}}} for i in range(n)]

    assert sr.summarise(units({"shrink-0.25": [-0.01, 0.012, -0.003, 0.004]}))["chosen"] == "average"  # noise
    assert sr.summarise(units({"shrink-0.25": [0.010, 0.012, 0.009, 0.011]}))["chosen"] == "average"  # worse
    assert sr.summarise(units({"shrink-0.5": [-0.010, -0.012, -0.009, -0.011]}))["chosen"] == "shrink-0.5"
    both = units({"shrink-0.25": [-0.010, -0.012, -0.009, -0.011], "shrink-0.5": [-0.020, -0.021, -0.019, -0.02]})
    assert sr.summarise(both)["chosen"] == "shrink-0.5"  # of several beyond noise, the lowest mean


def test_a_judge_look_never_runs_a_search(sr, tmp_path: Path):
    """``--judge`` reads the judge's cached FastMix searches; one that is not cached is an error, not a run."""
    rq = sr.rq
    args = rq.build_parser().parse_args([])
    data = {"search": {"heldout": str(tmp_path / "target")}, "sources": {"code": str(tmp_path / "code")}}
    with pytest.raises(FileNotFoundError, match="not cached"):
        rq.run_search_cached(tmp_path, "stdlib-K3", "fastmix", "heldout", 0, data, args, cached_only=True)
    assert not (tmp_path / "methods").exists() and not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit, match="EXP=WORK"):
        sr.main(["--judge", "K8=/nowhere"])
