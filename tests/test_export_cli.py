"""The manifest / resample / convert subcommands, driven through argparse as the CLI wires them."""

from __future__ import annotations

import argparse
import json

import pytest
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data.errors import FastMixDataError, ManifestError
from fastmix_data.export import read_manifest
from fastmix_data.export.cli_commands import add_export_parsers, parse_weights


def _run(argv):
    parser = argparse.ArgumentParser(prog="fastmix-data")
    add_export_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def corpus(tmp_path):
    write_parquet_source(tmp_path / "code", make_docs(60, prefix="code"), shards=2)
    write_wds_source(tmp_path / "web", make_docs(40, prefix="web"), shards=2)
    return tmp_path


def test_manifest_resample_convert(corpus, tmp_path, capsys):
    out = tmp_path / "m.json"
    argv = [
        "manifest",
        "--sources",
        f"code={corpus}/code",
        f"web={corpus}/web/*.tar",
        "--weights",
        "code=0.25,web=0.75",
    ]
    argv += [
        "--budget",
        "5k_tokens",
        "--seq-len",
        "31",
        "--exhaustion",
        "web=cap:3",
        "--seed",
        "2",
        "--out",
        str(out),
    ]
    assert _run(argv) == 0
    m = read_manifest(out)
    assert m["budget"]["items"] == -(-5000 // 32) and m["seed"] == 2
    assert m["sources"][1]["exhaustion"] == {"policy": "cap", "max_epochs": 3}
    assert "code" in capsys.readouterr().err
    res = tmp_path / "res"
    assert (
        _run(
            [
                "resample",
                "--manifest",
                str(out),
                "--out",
                str(res),
                "--format",
                "webdataset",
                "--shard-items",
                "50",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "token share" in err
    assert "tasks (0 already done) on local with 1 worker(s)" in err and "0 retried attempt(s)" in err
    assert _run(["resample", "--manifest", str(out), "--out", str(res), "--format", "webdataset",
                 "--shard-items", "50", "--engine", "local", "--workers", "2"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    n = len(json.loads((res / "index.json").read_text())["shards"])
    assert f"{n} tasks ({n} already done) on local with 2 worker(s)" in err and "wrote 0.0 MB" in err
    assert (
        _run(
            ["convert", "--manifest", str(out), "--to", "megatron", "--prefix", "code=/m/code", "web=/m/web"]
        )
        == 0
    )
    weights_prefixes = capsys.readouterr().out.split()
    assert weights_prefixes[1::2] == ["/m/code", "/m/web"]
    wids_path = res / "wids.json"
    assert (
        _run(
            [
                "convert",
                "--manifest",
                str(out),
                "--to",
                "wids",
                "--resampled",
                str(res),
                "--out",
                str(wids_path),
            ]
        )
        == 0
    )
    desc = json.loads(wids_path.read_text())
    assert sum(s["nsamples"] for s in desc["shardlist"]) == m["budget"]["items"]


def test_weights_from_a_file_and_history(corpus, tmp_path):
    wfile = tmp_path / "w.yaml"
    wfile.write_text("weights:\n  code: 1\n  web: 3\n")
    assert parse_weights(str(wfile)) == {"code": 1.0, "web": 3.0}
    hfile = tmp_path / "h.json"
    hfile.write_text(json.dumps({"history": [{"position": 20, "weights": {"code": 1, "web": 0}}]}))
    out = tmp_path / "m.json"
    argv = ["manifest", "--sources", f"code={corpus}/code", f"web={corpus}/web", "--weights", str(wfile)]
    _run(argv + ["--history", str(hfile), "--budget", "100", "--out", str(out)])
    m = read_manifest(out)
    assert [h["position"] for h in m["history"]] == [0, 20] and m["budget"]["items"] == 100


def test_bad_cli_input(corpus, tmp_path):
    with pytest.raises(FastMixDataError, match="name=VALUE"):
        _run(
            [
                "manifest",
                "--sources",
                str(corpus / "code"),
                "--weights",
                "code=1",
                "--budget",
                "10",
                "--out",
                str(tmp_path / "m"),
            ]
        )
    with pytest.raises(FastMixDataError, match="weights"):
        parse_weights("code=abc")
    with pytest.raises(ManifestError, match="cannot parse budget"):
        _run(
            [
                "manifest",
                "--sources",
                f"code={corpus}/code",
                "--weights",
                "code=1",
                "--budget",
                "lots",
                "--out",
                str(tmp_path / "m"),
            ]
        )
    with pytest.raises(SystemExit):
        _run(["convert", "--manifest", "x.json", "--to", "tfrecord"])


def test_one_spelling_of_source_and_the_old_one_still_works(corpus, tmp_path):
    """``--source NAME=PATH`` (repeatable) as in ``search``; ``--sources a=.. b=..`` still accepted."""
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    common = ["--weights", "code=1,web=3", "--budget", "100", "--seed", "1"]
    _run(["manifest", "--source", f"code={corpus}/code", "--source", f"web={corpus}/web", *common, "--out", str(new)])
    _run(["manifest", "--sources", f"code={corpus}/code", f"web={corpus}/web", *common, "--out", str(old)])
    assert read_manifest(new)["sources"] == read_manifest(old)["sources"]
    with pytest.raises(FastMixDataError, match="--source expects name=VALUE"):
        _run(["manifest", "--source", str(corpus / "code"), *common, "--out", str(tmp_path / "x")])


def test_a_search_weights_file_gives_the_shares_in_the_manifest_units(tmp_path):
    wfile = tmp_path / "weights.json"
    wfile.write_text(json.dumps({"weights": {"code": 0.6, "web": 0.4}, "weight_units": "tokens",
                                 "shares": {"tokens": {"code": 0.6, "web": 0.4},
                                            "samples": {"code": 0.1, "web": 0.9}, "bytes": None}}))
    assert parse_weights(str(wfile), "samples") == {"code": 0.1, "web": 0.9}
    assert parse_weights(str(wfile), "tokens") == {"code": 0.6, "web": 0.4}
    assert parse_weights(str(wfile)) == {"code": 0.6, "web": 0.4}
    with pytest.raises(FastMixDataError, match="no bytes shares"):
        parse_weights(str(wfile), "bytes")
