"""Every registered method end to end on a tiny Parquet corpus: same entry point, same outputs, a
live MixtureStream as the sink, compute counted."""

from __future__ import annotations

import json

import pytest
from test_search_methods_fixtures import corpus, sources, tiny_train, validation  # noqa: F401

from fastmix_data.search.methods import METHODS, build_config, run_method
from fastmix_data.search.train_static import TrainConfig, make_stream
from fastmix_data.search.trainer import read_trajectory

CONFIG = {
    "train": tiny_train(max_tokens=6 * 32 * 20),
    "target_max_seqs": 24,
    "aioli": {"rounds": 2, "probe_steps": 2},
    "grid": {"step": 0.5, "train": {"max_tokens": 6 * 32 * 3}},
    "fastmix": {"search": {"z_lr": 0.1}},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_end_to_end(name, corpus, tmp_path):  # noqa: F811
    src = sources(corpus)
    target = validation(corpus)
    if name == "grid":
        src = {k: src[k] for k in ("code", "prose")}
        target = {k: target[k] for k in ("code", "prose")}
    sink = make_stream(src, None, TrainConfig(**tiny_train()))
    r = run_method(name, src, target, CONFIG, out_dir=tmp_path, sink=sink)
    assert r.method == name and list(r.weights) == list(src)
    assert sum(r.weights.values()) == pytest.approx(1.0) and min(r.weights.values()) >= 0
    w = json.loads((tmp_path / "weights.json").read_text())
    assert w["method"] == name and w["weights"] == pytest.approx(r.weights)
    traj = read_trajectory(tmp_path)
    assert traj and all(set(rec["weights"]) == set(src) for rec in traj)
    comp = json.loads((tmp_path / "compute.json").read_text())
    assert comp["wall_s"] >= 0 and "total" in comp["flops"]
    if name in ("stratified", "natural"):
        assert comp["flops"]["total"] == 0
    else:
        assert comp["flops"]["total"] > 0 and comp["flops"]["eval"] > 0  # validation passes counted
    assert (tmp_path / "trajectory.png").stat().st_size > 0
    assert sink.weights == pytest.approx(r.weights, abs=1e-9)  # the live stream got the final weights


def test_registry_errors(corpus):  # noqa: F811
    with pytest.raises(ValueError, match="unknown mixture method"):
        run_method("regmix", sources(corpus), None)
    with pytest.raises(ValueError, match="needs a target"):
        run_method("mixmin", sources(corpus), None)
    with pytest.raises(ValueError, match="unknown method config key"):
        build_config("mixmin", {"trian": {}})
    with pytest.raises(ValueError, match="unknown MixMinConfig key"):
        build_config("mixmin", {"mixmin": {"etaa": 1}})
    cfg = build_config("doremi", {"train": {"max_tokens": 100}, "doremi": {"train": {"seed": 3}}})
    assert cfg.train.max_tokens == 100 and cfg.train.seed == 3
