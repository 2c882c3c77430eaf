"""Resampled shards: read back with the real libraries, identical for any parallelism, resumable."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardgen import code_web_manifest, make_docs, write_code_web, write_parquet_source, write_wds_source

from fastmix_data.errors import ManifestError
from fastmix_data.export import build_manifest, stream_from_manifest
from fastmix_data.export.resample import STATE_DIR, ResampleError, plan_layout, read_index, resample
from fastmix_data.sources import open_source


@pytest.fixture
def corpus(tmp_path):
    return write_code_web(tmp_path)


@pytest.fixture
def manifest(corpus):
    return code_web_manifest(corpus)


def _stream_items(m, batch_size=20):
    texts, sources = [], []
    for b in stream_from_manifest(m, batch_size=batch_size):
        texts += b["text"]
        sources += b["source"].tolist()
    return texts, sources


def _digests(out):
    return {
        f: hashlib.sha256((out / f).read_bytes()).hexdigest()
        for f in sorted(os.listdir(out))
        if not f.startswith(".")
    }


def test_parquet_output_is_the_stream_in_order(manifest, tmp_path):
    out = tmp_path / "out"
    index = resample(manifest, out, format="parquet", shard_items=128, progress=False)
    assert index["complete"] and len(index["shards"]) == 5
    assert [s["rows"] for s in index["shards"]] == [128, 128, 128, 128, 88]
    table = pq.read_table(sorted(str(p) for p in out.glob("*.parquet")))
    texts, sources = _stream_items(manifest)
    names = [s["name"] for s in manifest["sources"]]
    assert table.column("text").to_pylist() == texts
    assert table.column("source").to_pylist() == [names[k] for k in sources]
    assert table.column("position").to_pylist() == list(range(600))
    comp = index["composition"]
    assert comp["items"] == comp["manifest_items"] == {s["name"]: s["take"] for s in manifest["sources"]}
    assert comp["max_token_share_deviation"] < 0.01
    assert read_index(out)["run"] == index["run"]
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    # the output is itself a source (shards listed by glob: out/index.json is not an MDS index)
    src = open_source("resampled", str(out / "*.parquet"))
    assert src.rows == 600


def test_webdataset_output_read_by_webdataset(manifest, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    index = resample(manifest, out, format="webdataset", shard_items=256, progress=False)
    urls = [str(out / s["path"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    texts, _ = _stream_items(manifest)
    assert [s["txt"] for s in samples] == texts
    assert [s["position.id"] for s in samples] == list(range(600))
    assert {s["source.txt"] for s in samples} == {"code", "web"}
    assert open_source("r", str(out / "*.tar")).rows == 600


def test_mds_output_read_by_streaming(manifest, tmp_path, streaming_module):
    out = tmp_path / "out"
    resample(manifest, out, format="mds", shard_items=200, progress=False)
    ds = streaming_module.StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    got = [ds[i] for i in range(ds.num_samples)]
    texts, _ = _stream_items(manifest)
    assert [g["text"] for g in got] == texts
    assert [int(g["position"]) for g in got] == list(range(600))
    assert open_source("r", out).rows == 600  # our own MDS reader too
    assert read_index(out)["output_format"] == "mds"


def test_packing_mode_token_budget(corpus, tmp_path, streaming_module):
    m = build_manifest(
        {"code": str(corpus / "code"), "web": str(corpus / "web")}, {"code": 0.5, "web": 0.5}, "12k_tokens",
        root=corpus, seq_len=47, weight_units="tokens",
    )  # fmt: skip
    n = m["budget"]["items"]
    out = tmp_path / "out"
    index = resample(m, out, format="parquet", shard_items=64, progress=False)
    comp = index["composition"]
    assert comp["tokens"] == comp["manifest_tokens"] and sum(comp["tokens"].values()) == n * 48
    ids = pq.read_table(sorted(str(p) for p in out.glob("*.parquet"))).column("input_ids").to_pylist()
    served = np.concatenate([b["tokens"].numpy() for b in stream_from_manifest(m, batch_size=n)])
    assert np.array_equal(np.array(ids), served)
    mds = tmp_path / "mds"
    resample(m, mds, format="mds", shard_items=64, progress=False)
    ds = streaming_module.StreamingDataset(local=str(mds), shuffle=False, batch_size=1)
    assert np.array_equal(np.stack([ds[i]["input_ids"] for i in range(n)]), served)
    assert ds[0]["doc_start"].dtype == np.uint8


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_identical_for_workers_and_ranks(manifest, tmp_path, fmt):
    one = tmp_path / "one"
    resample(manifest, one, format=fmt, shard_items=100, workers=1, progress=False)
    two = tmp_path / "two"
    resample(manifest, two, format=fmt, shard_items=100, workers=2, progress=False)
    ranks = tmp_path / "ranks"
    first = resample(manifest, ranks, format=fmt, shard_items=100, rank=1, world_size=2, progress=False)
    assert first["complete"] is False and first["written"] == [
        plan_layout(manifest, fmt, shard_items=100).name(i) for i in (3, 4, 5)
    ]
    assert not (ranks / "index.json").exists()
    resample(manifest, ranks, format=fmt, shard_items=100, rank=0, world_size=2, progress=False)
    assert _digests(one) == _digests(two) == _digests(ranks)
    assert "index.json" in _digests(one)


def test_rank_from_environment(manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    result = resample(manifest, tmp_path / "out", shard_items=100, progress=False)
    assert result["written"] == ["part-00002.parquet", "part-00003.parquet"]


def test_layout_depends_only_on_the_manifest(manifest):
    a = plan_layout(manifest, "parquet", "4KB")
    assert a == plan_layout(manifest, "parquet", 4000) and a.count == -(-600 // a.per_shard)
    with pytest.raises(ResampleError, match="unknown output format"):
        plan_layout(manifest, "csv")
    with pytest.raises(ManifestError, match="cannot parse size"):
        plan_layout(manifest, "parquet", "lots")


def test_resume_after_interruption(manifest, tmp_path, crash_third_parquet_write):
    clean = tmp_path / "clean"
    resample(manifest, clean, shard_items=100, progress=False)
    out = tmp_path / "out"
    restore = crash_third_parquet_write()
    with pytest.raises(KeyboardInterrupt):
        resample(manifest, out, shard_items=100, progress=False)
    visible = sorted(p.name for p in out.glob("*.parquet"))
    assert visible == ["part-00000.parquet", "part-00001.parquet"]  # nothing half-written is visible
    assert not (out / "index.json").exists()
    mtimes = {p: os.stat(out / p).st_mtime_ns for p in visible}
    # a stale temporary file of a crashed writer is cleaned up by the shard's next writer
    (out / STATE_DIR / "tmp" / "part-00002.parquet.otherhost.1.tmp").write_bytes(b"junk")
    restore()
    index = resample(manifest, out, shard_items=100, progress=False)
    assert index["complete"]
    assert {p: os.stat(out / p).st_mtime_ns for p in visible} == mtimes  # finished shards were skipped
    assert _digests(out) == _digests(clean)
    assert not (out / STATE_DIR / "tmp").exists()


def test_rerun_rewrites_a_damaged_finished_shard(manifest, tmp_path):
    out = tmp_path / "out"
    resample(manifest, out, shard_items=100, progress=False)
    before = _digests(out)
    with open(out / "part-00001.parquet", "r+b") as f:
        f.seek(20)
        f.write(b"\x00\x01\x02")
    resample(manifest, out, shard_items=100, progress=False)
    assert _digests(out) == before


def test_another_run_in_out_dir_is_refused(manifest, corpus, tmp_path):
    out = tmp_path / "out"
    resample(manifest, out, shard_items=100, progress=False)
    before = _digests(out)
    other = build_manifest({"code": str(corpus / "code")}, [1], 50, root=corpus)
    with pytest.raises(ResampleError, match=r"already holds another resample run \(manifest_fingerprint"):
        resample(other, out, shard_items=100, progress=False)
    with pytest.raises(ResampleError, match=r"output_format: 'parquet' there, 'webdataset' now"):
        resample(manifest, out, format="webdataset", shard_items=100, progress=False)
    with pytest.raises(ResampleError, match="items_per_shard"):
        resample(manifest, out, shard_items=99, progress=False)
    assert _digests(out) == before


def test_unrelated_files_in_out_dir_are_refused(manifest, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ResampleError, match=r"not empty \(precious\.txt\)"):
        resample(manifest, out, progress=False)
    assert sorted(os.listdir(out)) == ["precious.txt"]


def test_changed_input_is_refused_before_writing(manifest, corpus, tmp_path):
    with open(corpus / "code" / "part-00000.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(ManifestError, match=r"part-00000\.parquet.*bytes"):
        resample(manifest, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_sources_without_a_common_column(corpus, tmp_path):
    write_parquet_source(corpus / "ids", make_docs(20, seed=5), shards=1, text_col=None, ids_col="input_ids")
    m = build_manifest({"code": str(corpus / "code"), "ids": str(corpus / "ids")}, [1, 1], 40, root=corpus)
    with pytest.raises(ResampleError, match="share neither a text nor an ids column"):
        resample(m, tmp_path / "out", progress=False)


def test_ids_columns_from_hf_parquet_and_webdataset(tmp_path):
    import pyarrow as pa
    from shardgen import write_hf_source

    write_hf_source(tmp_path / "hf", make_docs(40, prefix="hf"), shards=2, ids_col="input_ids")
    write_parquet_source(
        tmp_path / "pq",
        make_docs(30, prefix="pq", seed=2),
        shards=2,
        ids_col="input_ids",
        ids_type=pa.int64(),
    )
    write_wds_source(
        tmp_path / "wds", make_docs(20, prefix="wds", seed=3), shards=1, ids_member="input_ids.npy"
    )
    srcs = {n: str(tmp_path / n) for n in ("hf", "pq", "wds")}
    m = build_manifest(srcs, {"hf": 0.5, "pq": 0.3, "wds": 0.2}, 200, root=tmp_path, seed=1)
    out = tmp_path / "out"
    index = resample(m, out, shard_items=64, progress=False)
    table = pq.read_table(sorted(str(p) for p in out.glob("*.parquet")))
    texts, ids = [], []
    for b in stream_from_manifest(m, batch_size=50):
        texts += b["text"]
        ids += [x.tolist() for x in b["input_ids"]]
    assert table.column("text").to_pylist() == texts
    assert table.column("input_ids").to_pylist() == ids
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    want = {n: sum(len(x) for x, s in zip(ids, table.column("source").to_pylist()) if s == n) for n in srcs}
    # the ids alone: the byte tokenizer's end-of-document id (256) is not theirs, so none is counted
    assert index["composition"]["tokens"] == want


@pytest.mark.slow
def test_torch_distributed_ranks(manifest, tmp_path):
    """Two gloo ranks (as under torchrun) write disjoint shards; rank 0 writes the index after a barrier."""
    import multiprocessing

    from fastmix_data.export import write_manifest

    path = tmp_path / "m.json"
    write_manifest(manifest, path)
    single = tmp_path / "single"
    resample(manifest, single, shard_items=100, progress=False)
    out = tmp_path / "dist"
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_dist_worker, args=(r, 2, str(path), str(out), str(tmp_path / "rdv")))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _digests(out) == _digests(single)


def _dist_worker(rank, world, manifest_path, out, rendezvous):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = resample(manifest_path, out, shard_items=100, progress=False)
        assert result["complete"] is True and len(result["shards"]) == 6
    finally:
        dist.destroy_process_group()
