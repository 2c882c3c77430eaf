"""Converters, checked against the real libraries: MosaicML Streaming, HF datasets, webdataset, wids."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from shardgen import make_docs, write_mds_source, write_parquet_source, write_wds_source

from fastmix_data.errors import ManifestError
from fastmix_data.export import build_manifest
from fastmix_data.export.converters import (
    convert,
    hf_interleave,
    megatron_args,
    megatron_blend,
    olmo_mixture,
    streaming_python,
    streaming_streams,
    wids_index,
)
from fastmix_data.export.resample import read_index, resample


def _prefix_counts(texts, prefixes=("code", "web", "book", "wiki")):
    return Counter(next(p for p in prefixes if t.startswith(p)) for t in texts)


@pytest.fixture
def parquet_corpus(tmp_path):
    write_parquet_source(tmp_path / "code", make_docs(200, prefix="code"), shards=3)
    write_parquet_source(tmp_path / "web", make_docs(100, prefix="web", seed=1), shards=2)
    return tmp_path


@pytest.fixture
def parquet_manifest(parquet_corpus):
    root = parquet_corpus
    return build_manifest(
        {"code": str(root / "code"), "web": str(root / "web")},
        {"code": 0.35, "web": 0.65},
        2000,
        root=root,
        seed=9,
    )


# --- Megatron ---------------------------------------------------------------------------------------


def _parse_blend(text):
    parts = text.split()
    return [float(w) for w in parts[0::2]], parts[1::2]


def test_megatron_blend_and_data_args(parquet_manifest, tmp_path):
    m = parquet_manifest
    blend = megatron_blend(m, {"code": "/mega/code_text_document"})
    weights, prefixes = _parse_blend(blend)
    assert prefixes == ["/mega/code_text_document", f"{m['root']}/web"]
    assert weights == pytest.approx([0.35, 0.65]) and sum(weights) == pytest.approx(1.0)
    per_shard = _parse_blend(megatron_blend(m, per_shard=True))
    assert len(per_shard[1]) == 5 and sum(per_shard[0]) == pytest.approx(1.0)
    assert per_shard[1][0] == f"{m['root']}/code/part-00000"
    path = tmp_path / "blend.txt"
    convert(m, "megatron", str(path), prefixes={"code": "/mega/code"})
    assert _parse_blend(path.read_text())[1] == [
        "/mega/code",
        f"{m['root']}/web",
    ]  # what --data-args-path reads
    assert megatron_args(m, str(path))[:4] == ["--data-args-path", str(path), "--train-samples", "2000"]
    with pytest.raises(ManifestError, match="unknown sources"):
        megatron_blend(m, {"books": "/x"})


def test_megatron_core_parses_the_blend(parquet_manifest):
    utils = pytest.importorskip("megatron.core.datasets.utils")  # megatron-core, installed with --no-deps
    text = convert(parquet_manifest, "megatron", prefixes={"code": "/mega/code"})
    got_prefixes, got_weights = utils.get_blend_from_list(text.split())
    assert got_prefixes == ["/mega/code", f"{parquet_manifest['root']}/web"]
    assert got_weights == pytest.approx([0.35, 0.65])


# --- MosaicML Streaming ------------------------------------------------------------------------------


def _count_streaming(streaming, spec, **kwargs):
    streams = [streaming.Stream(**entry) for entry in spec["streams"].values()]
    ds = streaming.StreamingDataset(
        streams=streams, batch_size=1, shuffle=True, shuffle_seed=spec["shuffle_seed"], **kwargs
    )
    return _prefix_counts(sample["text"] for sample in ds)


def test_streaming_realises_the_proportions(tmp_path, streaming_module):
    write_mds_source(tmp_path / "book", make_docs(90, prefix="book"), shards=2)
    write_mds_source(tmp_path / "wiki", make_docs(150, prefix="wiki", seed=2), shards=3)
    m = build_manifest(
        {"book": str(tmp_path / "book"), "wiki": str(tmp_path / "wiki")},
        {"book": 0.6, "wiki": 0.4},
        1000,
        root=tmp_path,
    )
    spec = streaming_streams(m)
    assert spec["streams"]["book"]["local"] == str(tmp_path / "book") and spec["epoch_size"] == 1000
    counts = _count_streaming(streaming_module, spec, epoch_size=spec["epoch_size"])
    want = {s["name"]: s["take"] for s in m["sources"]}
    assert sum(counts.values()) == 1000
    for name, take in want.items():
        assert abs(counts[name] - take) <= 0.01 * 1000
    chosen = _count_streaming(streaming_module, streaming_streams(m, choose=True))
    assert dict(chosen) == want
    # the Python rendering builds the same Streams
    namespace: dict = {}
    exec(compile(streaming_python(m), "<streams>", "exec"), namespace)
    assert [s.proportion for s in namespace["streams"]] == pytest.approx([0.6, 0.4])
    assert yaml.safe_load(convert(m, "streaming-yaml")) == json.loads(convert(m, "streaming-json")) == spec


def test_streaming_reads_resampled_mds_of_other_formats(
    parquet_manifest, parquet_corpus, tmp_path, streaming_module
):
    m = parquet_manifest
    with pytest.raises(ManifestError, match="MosaicML Streaming reads MDS"):
        streaming_streams(m)
    locals_ = {}
    for name in ("code", "web"):
        one = build_manifest(
            {name: str(parquet_corpus / name)},
            [1],
            {"code": 200, "web": 100}[name],
            root=parquet_corpus,
            shuffle=False,
        )
        resample(one, tmp_path / f"{name}-mds", format="mds", shard_items=64, progress=False)
        locals_[name] = str(tmp_path / f"{name}-mds")
    spec = streaming_streams(m, locals_)
    counts = _count_streaming(streaming_module, spec, epoch_size=spec["epoch_size"])
    assert abs(counts["code"] - 700) <= 10 and sum(counts.values()) == 2000


# --- Hugging Face --------------------------------------------------------------------------------------


def test_hf_interleave_realises_the_probabilities(parquet_manifest, tmp_path):
    import datasets

    spec = json.loads(convert(parquet_manifest, "hf"))
    assert spec == hf_interleave(parquet_manifest)
    assert spec["probabilities"] == pytest.approx([0.35, 0.65])
    loaded = [
        datasets.load_dataset(
            d["builder"], data_files=d["data_files"], split="train", cache_dir=str(tmp_path / "hf-cache")
        ).repeat(d["repeat"])
        for d in spec["datasets"]
    ]
    assert [d["repeat"] for d in spec["datasets"]] == [5, 15]
    mixed = datasets.interleave_datasets(
        loaded,
        probabilities=spec["probabilities"],
        seed=spec["seed"],
        stopping_strategy=spec["stopping_strategy"],
    )
    n = spec["num_samples"]
    counts = _prefix_counts(mixed.select(range(n))["text"])
    for name, p in zip(["code", "web"], spec["probabilities"]):
        sigma = (n * p * (1 - p)) ** 0.5
        assert abs(counts[name] - n * p) < 4 * sigma  # i.i.d. draws: within 4 sigma


def test_hf_refuses_mds(tmp_path, streaming_module):
    write_mds_source(tmp_path / "book", make_docs(10, prefix="book"), shards=1)
    m = build_manifest({"book": str(tmp_path / "book")}, [1], 10, root=tmp_path)
    with pytest.raises(ManifestError, match="cannot load"):
        hf_interleave(m)


# --- OLMo ----------------------------------------------------------------------------------------------


def test_olmo_source_mixture(parquet_manifest):
    m = parquet_manifest
    cfg = yaml.safe_load(convert(m, "olmo"))
    assert cfg == olmo_mixture(m)
    assert cfg["max_tokens"] == m["budget"]["tokens"] and cfg["seed"] == 9
    ratios = {c["source_name"]: c["target_ratio"] for c in cfg["source_configs"]}
    assert sum(ratios.values()) == pytest.approx(1.0)
    for c, s in zip(cfg["source_configs"], m["sources"]):
        assert set(c) == {
            "source_name",
            "target_ratio",
            "paths",
            "max_repetition_ratio",
            "max_source_fraction",
        }
        assert (
            c["max_repetition_ratio"] * s["tokens"] >= s["take_tokens"] and c["max_repetition_ratio"] >= 1.0
        )
        assert len(c["paths"]) == len(s["shards"]) and all(p.startswith(m["root"]) for p in c["paths"])


# --- wids and webdataset ---------------------------------------------------------------------------------


@pytest.fixture
def resampled_tars(parquet_manifest, tmp_path):
    out = tmp_path / "out"
    resample(parquet_manifest, out, format="webdataset", shard_items=700, progress=False)
    desc = wids_index(read_index(out), str(out), out_dir=str(out))
    (out / "wids.json").write_text(json.dumps(desc))
    return out, desc


def test_wids_index_of_resampled_tars(resampled_tars):
    import webdataset as wds

    out, desc = resampled_tars
    assert desc["__kind__"] == "wids-shard-index-v1" and desc["wids_version"] == 1
    assert [s["url"] for s in desc["shardlist"]] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert [s["nsamples"] for s in desc["shardlist"]] == [700, 700, 600]
    for entry in desc["shardlist"]:  # nsamples match what webdataset reads
        assert (
            sum(1 for _ in wds.WebDataset(str(out / entry["url"]), shardshuffle=False)) == entry["nsamples"]
        )


def test_wids_reads_the_index(resampled_tars, tmp_path):
    wids = pytest.importorskip("wids")  # the wids package (pip install wids)
    out, _ = resampled_tars
    ds = wids.ShardListDataset(
        str(out / "wids.json"), cache_dir=str(tmp_path / "wids-cache"), transformations=[]
    )
    assert len(ds) == 2000
    assert ds[1234][".position.id"].read() == b"1234"


def test_wids_index_of_webdataset_sources(tmp_path):
    write_wds_source(tmp_path / "web", make_docs(30, prefix="web"), shards=2)
    write_parquet_source(tmp_path / "code", make_docs(20), shards=1)
    m = build_manifest(
        {"web": str(tmp_path / "web"), "code": str(tmp_path / "code")}, [1, 1], 50, root=tmp_path
    )
    desc = json.loads(convert(m, "wids", str(tmp_path / "lists" / "wids.json")))
    assert [s["url"] for s in desc["shardlist"]] == ["../web/shard-00000.tar", "../web/shard-00001.tar"]
    assert [s["nsamples"] for s in desc["shardlist"]] == [15, 15]
    with pytest.raises(ManifestError, match="no webdataset sources"):
        wids_index(build_manifest({"code": str(tmp_path / "code")}, [1], 5, root=tmp_path), str(tmp_path))


def test_unknown_target(parquet_manifest):
    with pytest.raises(ManifestError, match="unknown conversion target"):
        convert(parquet_manifest, "tfrecord")
