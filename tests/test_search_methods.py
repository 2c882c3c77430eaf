"""Every registered method through the one entry point: the same outputs, compute.json with the same
keys for every method (cached proxies charged), weights as token, sample and byte shares, a live
MixtureStream as the sink."""

from __future__ import annotations

import json

import pytest
from search_corpus import sources, tiny_config, validation, write_tiny_corpus

from fastmix_data.errors import ConfigError
from fastmix_data.search import read_trajectory, run_method
from fastmix_data.search.config import TrainConfig
from fastmix_data.search.methods import METHODS
from fastmix_data.search.outputs import SourceStats, shares
from fastmix_data.search.proxy.trainer import make_stream

CFG = {"grid": {"step": 0.5}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))


def _keys(d, prefix=""):
    """Every key path of a compute dict, except inside the method's free-form parts."""
    out = set()
    for k, v in d.items():
        p = f"{prefix}{k}"
        out.add(p)
        if isinstance(v, dict) and k not in ("details",):
            out |= _keys(v, p + ".")
    return out


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    out = {}
    for name in METHODS:
        src, target = sources(corpus), validation(corpus)
        if name == "grid":
            src = {k: src[k] for k in ("code", "prose")}
            target = {k: target[k] for k in ("code", "prose")}
        d = tmp_path_factory.mktemp(name)
        sink = make_stream(src, None, TrainConfig.from_dict({"batch_size": 6, "seq_len": 32}))
        r = run_method(tiny_config(name, steps=24, **CFG), sources=src, target=target, out_dir=d, sink=sink)
        out[name] = (r, d, sink)
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_end_to_end(name, runs):
    r, out, sink = runs[name]
    assert r.method == name and list(r.weights) == r.source_names
    assert sum(r.weights.values()) == pytest.approx(1.0) and min(r.weights.values()) >= 0
    w = json.loads((out / "weights.json").read_text())
    assert w["method"] == name and w["weights"] == pytest.approx(r.weights) and w["weight_units"] == "tokens"
    for unit in ("tokens", "samples", "bytes"):
        assert sum(w["shares"][unit].values()) == pytest.approx(1.0)
    traj = read_trajectory(out)
    assert traj and all(set(rec["weights"]) == set(r.source_names) for rec in traj)
    comp = json.loads((out / "compute.json").read_text())
    if name in ("stratified", "natural"):
        assert comp["flops"]["total"] == 0
    else:
        assert comp["flops"]["total"] > 0 and comp["flops"]["eval"] > 0  # evaluation passes counted
    assert sink.weights == pytest.approx(r.weights, abs=1e-9)  # the live stream ends on the exported mixture


def test_compute_json_has_the_same_keys_for_every_method(runs):
    keys = {name: _keys(json.loads((d / "compute.json").read_text())) for name, (_, d, _) in runs.items()}
    first = keys["fastmix"]
    assert all(k == first for k in keys.values()), {n: sorted(k ^ first) for n, k in keys.items()}
    for part in ("tokens.train", "tokens.eval", "tokens.scored", "flops.train", "flops.eval", "flops.hypergrad",
                 "flops.total", "flops.cached", "wall_s", "optimizer_steps", "parts", "details"):
        assert part in first


def test_cached_proxies_are_charged(corpus, tmp_path):
    cfg = tiny_config("mixmin", steps=9, cache_dir=str(tmp_path / "cache"))
    a = run_method(cfg, sources=sources(corpus), target=validation(corpus))
    assert a.details["proxies_cached"] == [] and a.compute["flops"]["cached"] == 0
    b = run_method(cfg, sources=sources(corpus), target=str(corpus / "planted"))
    assert sorted(b.details["proxies_cached"]) == sorted(sources(corpus))
    # reused proxies cost what they cost to train: the same training FLOPs, all of them cached
    assert b.compute["flops"]["train"] == a.compute["flops"]["train"] > 0
    assert b.compute["flops"]["cached"] == pytest.approx(sum(p["flops"]["total"] for p in b.compute["parts"]))
    assert b.compute["flops"]["total"] == pytest.approx(b.compute["flops"]["train"] + b.compute["flops"]["eval"])
    g = tiny_config("grid", steps=3, cache_dir=str(tmp_path / "cache"), grid={"step": 0.5})
    src = {k: sources(corpus)[k] for k in ("code", "prose")}
    g1 = run_method(g, sources=src, target=validation(corpus)["code"])
    g2 = run_method(g, sources=src, target=validation(corpus)["code"])
    assert all(t["cached"] for t in g2.trajectory) and g2.compute["flops"]["total"] == g1.compute["flops"]["total"]
    assert g2.compute["flops"]["cached"] == g2.compute["flops"]["total"] > 0


def test_shares_in_samples_and_bytes_follow_from_the_index():
    stats = {"code": SourceStats(rows=100, tokens=200_000, text_bytes=199_900),
             "web": SourceStats(rows=400, tokens=50_000, text_bytes=49_600)}
    s = shares({"code": 0.6, "web": 0.4}, stats)
    # samples: 0.6 / 2000 tokens per doc vs 0.4 / 125 -> 0.0857 : 0.9143
    assert s["samples"]["code"] == pytest.approx(0.6 / 2000 / (0.6 / 2000 + 0.4 / 125))
    assert s["bytes"]["code"] == pytest.approx(0.6 * 0.9995 / (0.6 * 0.9995 + 0.4 * 0.992))
    assert shares({"a": 1.0}, None) == {"tokens": {"a": 1.0}, "samples": None, "bytes": None}


def test_registry_errors(corpus):
    with pytest.raises(ConfigError, match="method.*must be one of"):
        run_method(tiny_config("regmix"), sources=sources(corpus))
    with pytest.raises(ConfigError, match="needs a target"):
        run_method(tiny_config("mixmin"), sources=sources(corpus))
    with pytest.raises(ConfigError, match="FastMix options"):
        run_method(tiny_config("mixmin"), sources=sources(corpus), target=validation(corpus), resume=True)
    with pytest.raises(ConfigError, match="unknown key"):
        run_method({"max_tokens": 1, "trian": {}}, sources=sources(corpus))
