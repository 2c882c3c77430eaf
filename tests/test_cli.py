"""The `fastmix-data` command: search from flags and from a YAML config with every method, the
one-line error, torch threads, and the demo end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data.cli import default_threads, main, set_threads


@pytest.fixture()
def tiny(tmp_path):
    write_parquet_source(tmp_path / "a", make_docs(80, seed=1, prefix="alpha"), shards=2)
    write_wds_source(tmp_path / "b", make_docs(80, seed=2, prefix="beta"), shards=2)
    write_parquet_source(tmp_path / "t", make_docs(40, seed=3, prefix="alpha"), shards=1)
    return tmp_path


FAST = ["--seq-len", "32", "--batch-size", "4", "--proxy", "tiny", "--no-progress", "--threads", "1"]


def test_search_from_flags_writes_outputs_and_manifest(tiny, capsys):
    out = tiny / "out"
    rc = main(["search", "--source", f"a={tiny / 'a'}", f"b={tiny / 'b' / '*.tar'}", "--target", str(tiny / "t"),
               "--max-tokens", "1.5k", *FAST, "--out", str(out), "--manifest-out", str(tiny / "m.json"),
               "--manifest-budget", "10000_tokens"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.split("manifest written")[0])
    assert set(printed["weights"]) == {"a", "b"} and abs(sum(printed["weights"].values()) - 1) < 1e-6
    assert set(printed["shares"]) == {"tokens", "samples", "bytes"}
    for name in ("weights.json", "trajectory.jsonl", "trajectory.png", "compute.json", "search_config.json"):
        assert (out / name).exists(), name
    manifest = json.loads((tiny / "m.json").read_text())
    assert {s["name"] for s in manifest["sources"]} == {"a", "b"}


def test_search_from_yaml_config(tiny):
    cfg = {"method": "mixmin", "max_tokens": "2k", "sources": {"a": str(tiny / "a"), "b": str(tiny / "b" / "*.tar")},
           "target": {"path": str(tiny / "t")}, "train": {"proxy": "tiny", "seq_len": 32, "batch_size": 4},
           "mixmin": {"eta": 0.5}, "output": {"progress": False}, "out": str(tiny / "yout")}
    (tiny / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", "--config", str(tiny / "c.yaml"), "--threads", "1"]) == 0
    w = json.loads((tiny / "yout" / "weights.json").read_text())
    assert w["method"] == "mixmin"
    saved = json.loads((tiny / "yout" / "compute.json").read_text())
    assert saved["tokens"]["train"] > 0


@pytest.mark.parametrize("method", ["stratified", "natural", "doremi", "aioli"])
def test_every_method_from_the_same_flags(tiny, method):
    out = tiny / method
    rc = main(["search", "--source", f"a={tiny / 'a'}", "--source", f"b={tiny / 'b' / '*.tar'}",
               "--target", str(tiny / "t"), "--method", method, "--max-tokens", "5k", *FAST, "--out", str(out)])
    assert rc == 0
    w = json.loads((out / "weights.json").read_text())
    assert w["method"] == method and set(w["weights"]) == {"a", "b"}


def test_a_bad_option_is_one_line(tiny, capsys):
    rc = main(["search", "--source", f"a={tiny / 'a'}", "--target", str(tiny / "t"), "--outer-every", "0",
               "--max-tokens", "3k"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "fastmix.outer_every (--fastmix-outer-every)" in err


def test_bad_source_is_a_clear_error(tiny, capsys):
    rc = main(["search", "--source", f"a={tiny / 'missing'}", "--target", str(tiny / "t"), "--max-tokens", "3k"])
    assert rc == 2 and "missing" in capsys.readouterr().err


def test_torch_threads_are_set_sensibly(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert 1 <= default_threads() <= 8
        assert set_threads(None) == default_threads() == torch.get_num_threads()
        assert set_threads(3) == 3 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) is None  # the user's OMP setting wins
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-tokens", "30k", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert abs(sum(summary["final_weights"].values()) - 1) < 1e-6
    assert summary["job_stream"]["weight_updates"] >= 1 and summary["job_stream"]["batches_served"] >= 2
    assert (tmp_path / "demo" / "search" / "trajectory.png").exists()
    assert "fastmix-data demo" in capsys.readouterr().out
