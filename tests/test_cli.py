"""The `fastmix-data` command: search from flags and from a YAML config, and the demo end to end."""

from __future__ import annotations

import json

import pytest
import yaml
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data.cli import main


@pytest.fixture()
def tiny(tmp_path):
    write_parquet_source(tmp_path / "a", make_docs(80, seed=1, prefix="alpha"), shards=2)
    write_wds_source(tmp_path / "b", make_docs(80, seed=2, prefix="beta"), shards=2)
    write_parquet_source(tmp_path / "t", make_docs(40, seed=3, prefix="alpha"), shards=1)
    return tmp_path


def test_search_from_flags_writes_outputs_and_manifest(tiny, capsys):
    out = tiny / "out"
    rc = main(["search", "--source", f"a={tiny / 'a'}", "--source", f"b={tiny / 'b' / '*.tar'}",
               "--target", str(tiny / "t"), "--seq-len", "32", "--batch-size", "4", "--model", "tiny",
               "--max-steps", "12", "--warmup-steps", "2", "--outer-every", "2", "--progress", "false",
               "--out", str(out), "--manifest-out", str(tiny / "m.json"), "--manifest-budget", "10000_tokens"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.split("manifest written")[0])
    assert set(printed["weights"]) == {"a", "b"} and abs(sum(printed["weights"].values()) - 1) < 1e-6
    for name in ("weights.json", "trajectory.jsonl", "trajectory.png", "compute.json"):
        assert (out / name).exists(), name
    manifest = json.loads((tiny / "m.json").read_text())
    assert {s["name"] for s in manifest["sources"]} == {"a", "b"}


def test_search_from_yaml_config(tiny):
    cfg = {"sources": {"a": str(tiny / "a"), "b": str(tiny / "b" / "*.tar")}, "target": str(tiny / "t"),
           "seq_len": 32, "batch_size": 4, "model": "tiny", "max_steps": 8, "warmup_steps": 2, "outer_every": 2,
           "progress": False, "out": str(tiny / "yout")}
    (tiny / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["search", "--config", str(tiny / "c.yaml")]) == 0
    assert json.loads((tiny / "yout" / "weights.json").read_text())


def test_search_refuses_bad_option(tiny, capsys):
    rc = main(["search", "--source", f"a={tiny / 'a'}", "--target", str(tiny / "t"), "--outer-every", "0",
               "--max-steps", "3"])
    assert rc == 2 and "outer_every must be a positive integer, got 0" in capsys.readouterr().err


def test_bad_source_is_a_clear_error(tiny, capsys):
    rc = main(["search", "--source", f"a={tiny / 'missing'}", "--target", str(tiny / "t"), "--max-steps", "3"])
    assert rc == 2 and "missing" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-tokens", "30000", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert abs(sum(summary["final_weights"].values()) - 1) < 1e-6
    assert summary["job_stream"]["weight_updates"] >= 1 and summary["job_stream"]["batches_served"] >= 2
    assert (tmp_path / "demo" / "search" / "trajectory.png").exists()
    assert "fastmix-data demo" in capsys.readouterr().out


def test_search_other_method_from_the_same_entry_point(tiny):
    out = tiny / "nat"
    rc = main(["search", "--source", f"a={tiny / 'a'}", "--source", f"b={tiny / 'b' / '*.tar'}",
               "--target", str(tiny / "t"), "--method", "natural", "--seq-len", "32", "--batch-size", "4",
               "--out", str(out)])
    assert rc == 0
    weights = json.loads((out / "weights.json").read_text())
    weights = weights.get("weights", weights)
    assert set(weights) == {"a", "b"}
