"""The one search config: identical defaults and values from Python, YAML and the command line;
one-line errors naming the field; flags generated from the fields' docs."""

from __future__ import annotations

import argparse

import pytest
import yaml

from fastmix_data.cli import _search_config, build_parser, main
from fastmix_data.errors import ConfigError
from fastmix_data.search.config import METHOD_NAMES, ProxySpec, SearchConfig
from fastmix_data.search.config_fields import parse_count, walk
from fastmix_data.search.methods import METHODS


def from_cli(*argv: str) -> SearchConfig:
    args = build_parser().parse_args(["search", *argv])
    return _search_config(args)[0]


def test_defaults_are_identical_from_python_yaml_and_cli():
    py = SearchConfig(max_tokens=20_000_000)
    ya = SearchConfig.from_dict(yaml.safe_load("max_tokens: 20M\n"))
    cli = from_cli("--max-tokens", "20M")
    assert py == ya == cli
    # and every field survives YAML both ways
    assert SearchConfig.from_dict(yaml.safe_load(yaml.safe_dump(py.to_dict()))) == py


def test_values_round_trip_python_yaml_cli():
    py = SearchConfig(max_tokens=1_500_000, method="mixmin", sources={"a": "x/a", "b": "x/b"})
    py.train.proxy = ProxySpec("gpu", {"vocab_size": 50304, "d_model": 512})
    py.train.seq_len, py.train.lr = 256, 3e-4
    py.target.path, py.target.max_seqs = {"g1": "t/1", "g2": "t/2"}, 200
    py.fastmix.z_lr, py.fastmix.final, py.fastmix.init_weights = 0.05, "last", {"a": 1.0, "b": 3.0}
    py.mixmin.per_token, py.output.progress = True, False
    text = """
    method: mixmin
    max_tokens: 1.5M
    sources: {a: x/a, b: x/b}
    train: {proxy: {preset: gpu, vocab_size: 50304, d_model: 512}, seq_len: 256, lr: 3e-4}
    target: {path: {g1: t/1, g2: t/2}, max_seqs: 200}
    fastmix: {z_lr: 5e-2, final: last, init_weights: {a: 1, b: 3}}
    mixmin: {per_token: true}
    output: {progress: false}
    """
    ya = SearchConfig.from_dict(yaml.safe_load(text))
    cli = from_cli("--method", "mixmin", "--max-tokens", "1.5M", "--source", "a=x/a", "--source", "b=x/b",
                   "--proxy", "gpu,vocab_size=50304,d_model=512", "--seq-len", "256", "--lr", "3e-4",
                   "--target", "g1=t/1", "g2=t/2", "--target-max-seqs", "200", "--z-lr", "0.05",
                   "--fastmix-final", "last", "--fastmix-init-weights", "a=1,b=3", "--mixmin-per-token",
                   "--no-progress")
    assert py.validate() == ya.validate() == cli
    assert cli.train.proxy.shape().d_model == 512 and cli.max_tokens == 1_500_000


def test_max_tokens_with_a_suffix_is_accepted_by_every_method():
    for m in METHOD_NAMES:
        assert from_cli("--method", m, "--max-tokens", "20M").max_tokens == 20_000_000
    assert parse_count("10B") == 10**10 and parse_count("1.5k") == 1500 and parse_count("4_096") == 4096
    with pytest.raises(ValueError, match="count like '20M'"):
        parse_count("lots")


def test_the_registry_matches_the_config():
    assert tuple(METHODS) == METHOD_NAMES
    for name, spec in METHODS.items():
        assert spec.name == name and spec.summary


def test_every_field_has_a_flag_with_its_doc_and_booleans_are_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["search"]
    by_dest = {a.dest: a for a in sub._actions}
    for leaf in walk(SearchConfig):
        action = by_dest["cfg:" + leaf.path]
        assert leaf.flag in action.option_strings
        assert leaf.field.metadata["doc"].split("(")[0].strip()[:20] in action.help.replace("%%", "%")
        if leaf.field.metadata["kind"] == "bool":
            assert "--no-" + leaf.flag[2:] in action.option_strings
    help_text = sub.format_help()
    assert "--fastmix-z-lr" in help_text and "--mixmin-eta" in help_text and "--no-plot" in help_text
    assert "derived from the budget" in help_text  # None defaults are explained
    # FastMix's flags also work without the prefix, as they did; booleans also take a value
    assert from_cli("--max-tokens", "1", "--outer-every", "5").fastmix.outer_every == 5
    assert from_cli("--max-tokens", "1", "--progress", "false").output.progress is False
    assert from_cli("--max-tokens", "1", "--no-plot").output.plot is False
    assert from_cli("--max-tokens", "1", "--mixmin-per-token").mixmin.per_token is True


def test_bad_configs_are_one_line_errors_naming_the_field():
    with pytest.raises(ConfigError) as e:
        SearchConfig(max_tokens=10, fastmix={"z_lr": -1}).validate()  # a section given as a dict
    assert "\n" not in str(e.value) and "fastmix" in str(e.value)
    cfg = SearchConfig(max_tokens=10)
    cfg.fastmix.z_lr, cfg.train.batch_size, cfg.aioli.rho = -1.0, 0, 2.0
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("fastmix.z_lr (--fastmix-z-lr): must be >= 0, got -1.0", "train.batch_size (--batch-size)",
                 "aioli.rho (--aioli-rho)"):
        assert part in msg
    with pytest.raises(ConfigError, match=r"max_tokens \(--max-tokens\): must be set"):
        SearchConfig().validate()
    with pytest.raises(ConfigError, match="did you mean 'z_lr'"):
        SearchConfig.from_dict({"max_tokens": 5, "fastmix": {"z_lrr": 1}})
    SearchConfig.from_dict({"max_tokens": 5, "train": {"proxy": "p20m"}}).validate()  # vocabulary: the run's
    with pytest.raises(ConfigError, match=r"train.proxy \(--proxy\): unknown model field.*d_modl"):
        SearchConfig.from_dict({"max_tokens": 5, "train": {"proxy": "p20m,d_modl=3"}}).validate()
    with pytest.raises(ConfigError, match="hypergrad.*search_batch='buffer'"):
        SearchConfig.from_dict({"max_tokens": 5, "fastmix": {"hypergrad": "full"}}).validate()
    with pytest.raises(ConfigError, match="max_tokens: .*count like '20M'"):
        SearchConfig.from_dict({"max_tokens": "lots"})


@pytest.mark.parametrize("train,match", [
    ({"proxy": "p150m,n_head=7"}, r"train.proxy \(--proxy\): invalid proxy model config: d_model=1024 is not divisible"),
    ({"proxy": "p20m,tie_embeddings=maybe"}, r"train.proxy \(--proxy\): .*tie_embeddings must be true or false"),
    ({"proxy": "p999m"}, r"train.proxy \(--proxy\): unknown model preset 'p999m'"),
    ({"tokenizer": "/nowhere/tokenizer.json"}, r"train.tokenizer \(--tokenizer\): no tokenizer file '/nowhere/"),
    ({"eos_token": 3}, r"train.eos_token \(--eos-token\)"),
    ({"fused_head": "sometimes"}, r"train.fused_head: must be true or false"),
])
def test_proxy_fields_bad_values_are_one_line_errors(train, match):
    with pytest.raises(ConfigError, match=match) as e:
        SearchConfig.from_dict({"max_tokens": 5, "train": train}).validate()
    assert "\n" not in str(e.value)


def test_proxy_spec_parses_ladder_presets_and_booleans():
    cfg = SearchConfig.from_dict({"max_tokens": 5, "train": {"proxy": "p60m,tie_embeddings=true,activation_checkpointing=True"}})
    cfg.validate()
    shape = cfg.train.proxy.shape(vocab_size=2048)
    assert shape.tie_embeddings is True and shape.activation_checkpointing is True and shape.vocab_size == 2048
    assert cfg.train.proxy.shape(vocab_size=2048).d_model == 768
    assert SearchConfig.from_dict({"max_tokens": 5, "train": {"proxy": "p20m,vocab_size=4096"}}).train.proxy.shape(2000).vocab_size == 4096
    assert cfg.train.learning_rate == 8e-4  # the preset's default (model.PRESET_LR)


def test_cli_reports_a_bad_config_on_one_line(capsys):
    rc = main(["search", "--max-tokens", "1M", "--fastmix-z-lr", "-1", "--source", "a=/nowhere"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "fastmix.z_lr (--fastmix-z-lr)" in err
    rc = main(["search", "--source", "a=/nowhere", "--target", "/nowhere"])
    assert rc == 2 and "--max-tokens" in capsys.readouterr().err


def test_config_file_and_flags_merge(tmp_path):
    (tmp_path / "c.yaml").write_text("max_tokens: 2M\nsources: {a: x/a}\ntrain: {seq_len: 64}\nout: o\n")
    args = build_parser().parse_args(["search", "--config", str(tmp_path / "c.yaml"), "--source", "b=x/b",
                                      "--seq-len", "32"])
    cfg, out = _search_config(args)
    assert cfg.sources == {"a": "x/a", "b": "x/b"} and cfg.train.seq_len == 32 and str(out) == "o"


def test_proxy_spec_parsing():
    assert ProxySpec.parse("cpu") == ProxySpec("cpu", {})
    assert ProxySpec.parse("gpu, vocab_size=32000") == ProxySpec("gpu", {"vocab_size": 32000})
    assert ProxySpec.parse({"preset": "tiny", "n_layer": 2}).shape().n_layer == 2
    with pytest.raises(ConfigError, match="unknown model preset"):
        SearchConfig.from_dict({"max_tokens": 1, "train": {"proxy": "huge"}}).validate()


def test_replace_by_dotted_path():
    c = SearchConfig(max_tokens=10).replace(**{"fastmix.z_lr": 0.3, "max_tokens": "1k"})
    assert c.fastmix.z_lr == 0.3 and c.max_tokens == 1000


def test_every_field_is_documented():
    """docs/search.md lists the shared fields, docs/methods.md the method sections' (by dotted path)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    search_md, methods_md = (root / "docs" / "search.md").read_text(), (root / "docs" / "methods.md").read_text()
    for leaf in walk(SearchConfig):
        doc = search_md if "." not in leaf.path or leaf.section_path in ("train", "target", "output") else methods_md
        name = leaf.path.split(".")[-1]
        assert f"`{leaf.path}`" in doc or (f"`{leaf.section_path}.{name}`" in doc) or (
            leaf.section_path and f"{leaf.section_path}.{name}" in doc), leaf.path


def test_a_vanishing_grid_step_is_a_range_error_not_an_overflow():
    """Found by the fuzz test: 1/1e-320 is infinite; the range check answers, on one line."""
    with pytest.raises(ConfigError, match=r"grid.step \(--grid-step\): must be >= 0.001, got 1e-320"):
        SearchConfig.from_dict({"max_tokens": 5, "grid": {"step": 1e-320}}).validate()
