"""Remote sources for real: shards written by pyarrow, webdataset and mosaicml-streaming, uploaded to
the loopback S3 server (moto) and served by http.server; read, indexed, streamed and resumed."""

from __future__ import annotations

import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from remote_servers import FAKE_KEY_ID, FAKE_SECRET, Faults, fault_proxy, http_server, upload_dir
from shardgen import (
    make_docs,
    read_all,
    write_hf_source,
    write_mds_source,
    write_parquet_source,
    write_wds_source,
)

from fastmix_data.errors import SourceError
from fastmix_data.sources import index_source, open_source
from fastmix_data.storage import CacheBudgetError, ShardChangedError
from fastmix_data.storage.prefetch import prefetch_block, prefetcher
from fastmix_data.stream.batches import block_reads
from fastmix_data.stream.mixture import MixtureStream


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One directory with a Parquet (several row groups, ids), a WebDataset and an MDS source."""
    root = tmp_path_factory.mktemp("corpus")
    write_parquet_source(root / "pq", make_docs(60, seed=1), shards=3, ids_col="input_ids", row_group_size=8)
    write_wds_source(root / "wds", make_docs(40, seed=2), shards=2, ids_member="npy")
    write_mds_source(root / "mds", make_docs(40, seed=3), shards=2)
    write_hf_source(root / "hf", make_docs(30, seed=5), shards=2)
    return root


@pytest.fixture
def on_s3(s3, corpus):
    for name in ("pq", "wds", "mds", "hf"):
        s3.put(corpus / name, name)
    return s3


@pytest.mark.parametrize("name", ["pq", "wds", "mds", "hf"])
def test_every_format_reads_the_same_from_s3_and_http(on_s3, corpus, name, tmp_path):
    local = open_source(name, corpus / name)
    remote = open_source(name, f"s3://{on_s3.bucket}/{name}")
    assert [s.rows for s in remote.shards] == [s.rows for s in local.shards]
    assert [s.tokens for s in remote.shards] == [s.tokens for s in local.shards]
    assert remote.shards[0].path.startswith(f"s3://{on_s3.bucket}/{name}/") and remote.shards[0].sha256 == ""
    assert read_all(remote) == read_all(local)
    with http_server(corpus) as base:
        over_http = open_source(name, f"{base}{name}/", cache_dir=tmp_path / "h")
        assert read_all(over_http) == read_all(local)


def test_globs_list_the_store(on_s3):
    src = open_source("g", f"s3://{on_s3.bucket}/pq/part-0000[02].parquet")
    assert [os.path.basename(s.path) for s in src.shards] == ["part-00000.parquet", "part-00002.parquet"]
    with pytest.raises(SourceError, match="matches no objects"):
        open_source("g", f"s3://{on_s3.bucket}/pq/*.tar")
    with pytest.raises(SourceError, match="does not exist or holds no objects"):
        open_source("g", f"s3://{on_s3.bucket}/nothing-here/")


def test_fingerprint_matches_local_when_indexed_alike(on_s3, corpus):
    local = open_source("pq", corpus / "pq")  # local default: sha256
    plain = open_source("pq", f"s3://{on_s3.bucket}/pq")  # remote default: size + ETag only
    hashed = open_source("pq", f"s3://{on_s3.bucket}/pq", verify="sha256")
    assert hashed.fingerprint() == local.fingerprint() != plain.fingerprint()
    assert [s.sha256 for s in hashed.shards] == [s.sha256 for s in local.shards]
    assert open_source("pq", corpus / "pq", verify="size").fingerprint() == plain.fingerprint()


def test_parquet_reads_fetch_only_the_needed_column_chunks(s3, tmp_path):
    docs = make_docs(40, seed=4)
    write_parquet_source(tmp_path / "wide", docs, shards=1, row_group_size=10,
                         extra={"blob": [os.urandom(3000) for _ in docs]})  # a big column nobody reads
    url = s3.put(tmp_path / "wide", "wide")
    src = open_source("w", url)  # indexed directly (not through the proxy)
    size = src.shards[0].bytes
    faults = Faults()
    with fault_proxy(s3.endpoint, faults) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy
        try:
            src.storage.cache.clear()
            data = src.read_shard(0)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
    assert data.texts == docs
    needed = src.fetch_bytes(0)  # footer + 4 row groups of the text chunk
    assert faults.bytes == needed and needed < size / 4  # the footer holds the blob min/max stats


def test_row_group_api(on_s3, corpus):
    from fastmix_data.sources.reader import Columns

    src = open_source("pq", f"s3://{on_s3.bucket}/pq")
    reader, path = src.reader, src.shards[1].path
    layout = reader.layout(path)
    assert sum(layout["rows"]) == src.shards[1].rows and len(layout["rows"]) == 3  # 20 rows, groups of 8
    table = reader.read_row_groups(path, Columns("text", None), [1])
    local = pq.ParquetFile(corpus / "pq" / "part-00001.parquet").read_row_group(1, columns=["text"])
    assert table.equals(local)


def test_changed_object_is_refused_by_name(on_s3, tmp_path):
    src = open_source("w", f"s3://{on_s3.bucket}/wds")
    src.storage.cache.clear()
    write_wds_source(tmp_path / "new", make_docs(25, seed=9), shards=1)
    upload_dir(on_s3.endpoint, tmp_path / "new", on_s3.bucket, "wds")  # overwrites shard-00000.tar
    with pytest.raises(ShardChangedError, match=r"shard-00000\.tar.*changed since it was indexed.*re-open"):
        src.read_shard(0)
    assert src.read_shard(1).texts  # the other shard is fine


def _through_proxy(s3, faults: Faults, fn):
    with fault_proxy(s3.endpoint, faults) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy
        try:
            return fn()
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3.endpoint


def test_cold_parquet_read_is_one_round_of_gets_and_no_head(on_s3, tmp_path):
    """A cold read of a shard's row groups costs one GET per run of touching byte ranges (footer and
    row groups merged where adjacent), all at once, with no HEAD: the identity is checked on the GETs'
    answers. The node-local cache still holds one entry per part (footer, each row group)."""
    from fastmix_data.storage.store import merge_ranges

    src = open_source("pq", f"s3://{on_s3.bucket}/pq", cache_dir=tmp_path / "c")  # indexed directly
    src.storage.cache.clear()
    parts = src.reader.parts(src.shards[1].path, src.columns, [0, 2])
    runs = merge_ranges([r for p in parts for r in p])
    faults = Faults()
    table = _through_proxy(on_s3, faults, lambda: src.read_shard_table(1, row_groups=[0, 2]))
    assert table.num_rows == 8 + 4  # 20 rows in groups of 8: groups 0 and 2
    methods = [line.split()[0] for line in faults.log]
    assert methods == ["GET"] * len(runs) and len(runs) < len(parts), (faults.log, runs)
    assert faults.bytes == src.fetch_bytes(1, [0, 2])  # exactly the plan's bytes
    assert sorted(os.listdir(src.storage.cache.directory / "blobs")) == sorted(src.cache_keys(1, [0, 2]))
    faults = Faults()
    assert _through_proxy(on_s3, faults, lambda: src.read_shard_table(1, row_groups=[2])).num_rows == 4
    assert faults.requests == 0  # warm: the row group and the footer are cache hits


@pytest.mark.parametrize("docs", [5, 60], ids=["shrunk", "grown"])
def test_parquet_object_changed_after_indexing_is_refused_without_head(on_s3, tmp_path, docs):
    src = open_source("pq", f"s3://{on_s3.bucket}/pq", cache_dir=tmp_path / "c")
    src.storage.cache.clear()
    write_parquet_source(tmp_path / "new", make_docs(docs, seed=11), shards=1, ids_col="input_ids", row_group_size=8)
    os.rename(tmp_path / "new" / "part-00000.parquet", tmp_path / "new" / "part-00001.parquet")
    upload_dir(on_s3.endpoint, tmp_path / "new", on_s3.bucket, "pq")  # overwrites part-00001.parquet
    faults = Faults()
    with pytest.raises(ShardChangedError, match=r"part-00001\.parquet.*changed since it was indexed.*re-open"):
        _through_proxy(on_s3, faults, lambda: src.read_shard_table(1, row_groups=[0]))
    assert not any(line.startswith("HEAD") for line in faults.log)
    assert os.listdir(src.storage.cache.directory / "blobs") == []  # nothing of the changed object was cached
    assert src.read_shard_table(0, row_groups=[0]).num_rows == 8  # the other shards are fine


def test_index_file_is_loaded_instead_of_listing(on_s3, corpus, tmp_path):
    index_url = f"s3://{on_s3.bucket}/indexes/mds.json"
    doc = index_source("m", f"s3://{on_s3.bucket}/mds", out=index_url)
    assert doc["root"] == f"s3://{on_s3.bucket}/mds" and [s["path"] for s in doc["shards"]] == [
        "shard.00000.mds", "shard.00001.mds"]
    faults = Faults()
    with fault_proxy(on_s3.endpoint, faults) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy
        try:
            src = open_source("m", index_file=index_url, cache_dir=tmp_path / "fresh")
        finally:
            os.environ["AWS_ENDPOINT_URL"] = on_s3.endpoint
    # only the index file itself is read (s3fs: HEAD + GET): no listing, no request per shard
    assert faults.log and all(line.endswith("/indexes/mds.json") for line in faults.log), faults.log
    assert read_all(src) == read_all(open_source("m", corpus / "mds"))


def test_cli_index_command(on_s3, tmp_path, capsys):
    from fastmix_data.cli import main

    out = tmp_path / "idx.json"
    assert main(["index", f"s3://{on_s3.bucket}/wds", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "fastmix_data/shard-index" and len(doc["shards"]) == 2
    assert "2 shards" in capsys.readouterr().out


def _texts(stream, n, loader=None):
    it = iter(loader if loader is not None else stream)
    return [list(next(it)["text"]) for _ in range(n)]


def _batches(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def _sources(where: str, verify: str) -> dict:
    return {name: {"path": f"{where}{name}", "verify": verify} for name in ("pq", "wds", "mds")}


def test_same_batches_from_disk_s3_and_http_and_resume_across(on_s3, corpus, tmp_path):
    weights = {"pq": 0.5, "wds": 0.3, "mds": 0.2}

    def run(where, verify, cache):
        stream = MixtureStream(_sources(where, verify), weights, batch_size=4, seed=7, cache_dir=tmp_path / cache,
                               block_batches=4)
        first = _texts(stream, 6)
        stream.set_weights({"pq": 0.1, "wds": 0.1, "mds": 0.8})
        return stream, first + _texts(stream, 6)

    local, want = run(f"{corpus}/", "auto", "l")
    s3_stream, got = run(f"s3://{on_s3.bucket}/", "sha256", "s")
    assert got == want
    with http_server(corpus) as base:
        _, over_http = run(base, "sha256", "h")
    assert over_http == want
    # a state saved on local disk resumes on S3 (same files: same fingerprint)
    state = json.loads(json.dumps(local.state_dict()))
    s3_stream.load_state_dict(state)
    local_next = _texts(local, 3)
    assert _texts(s3_stream, 3) == local_next


def test_two_workers_download_each_needed_byte_once(on_s3, tmp_path):
    # indexed first, directly (the stream below finds the entries in the same cache_dir), then cold
    src = open_source("pq", f"s3://{on_s3.bucket}/pq", cache_dir=tmp_path / "c")
    needed = sum(src.fetch_bytes(i) for i in range(len(src.shards)))
    src.storage.cache.clear()
    faults = Faults()
    with fault_proxy(on_s3.endpoint, faults) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy
        try:
            stream = MixtureStream({"pq": {"path": f"s3://{on_s3.bucket}/pq", "cache_dir": tmp_path / "c"}},
                                   {"pq": 1.0}, batch_size=6, seed=1)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
            batches = [b for _, b in zip(range(10), loader)]  # one epoch: 60 rows
            cold_requests = faults.requests
            warm = [b for _, b in zip(range(10), torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))]
        finally:
            os.environ["AWS_ENDPOINT_URL"] = on_s3.endpoint
    assert sum(len(b["text"]) for b in batches) == 60
    shard_bytes = sum(n for path, n in faults.bytes_by_path.items() if path.endswith(".parquet"))
    assert shard_bytes == needed  # every shard's needed bytes fetched once for the node (the rest: listing)
    assert [b["text"] for b in warm] == [b["text"] for b in batches]
    assert faults.requests == cold_requests  # warm: the index and the cache prove every shard; no request


_COLD_EPOCH_CHILD = """
import json, sys
from fastmix_data.stream.mixture import MixtureStream
stream = MixtureStream({"pq": {"path": sys.argv[1], "cache_dir": sys.argv[2]}}, {"pq": 1.0}, batch_size=6, seed=1)
print(json.dumps([list(b["text"]) for _, b in zip(range(10), stream.loader(num_workers=2))]))
"""


@pytest.mark.parametrize("name, ext", [("pq", ".parquet"), ("wds", ".tar"), ("mds", ".mds")])
def test_workers_read_through_obstore_the_same_batches_and_bytes(on_s3, corpus, tmp_path, name, ext):
    """A cold 2-worker epoch in a fresh process (this one used obstore, so its forked workers would
    read through s3fs) with ``FASTMIX_DATA_S3_CLIENT=obstore``: the workers' GETs (Parquet's byte
    ranges, WebDataset's and MDS's whole shards) go through obstore or fail; the batches are local
    disk's, each needed byte is fetched once, and no shard is asked for with a HEAD."""
    import subprocess
    import sys

    src = open_source(name, f"s3://{on_s3.bucket}/{name}", cache_dir=tmp_path / "c")
    needed = sum(src.fetch_bytes(i) for i in range(len(src.shards)))
    src.storage.cache.clear()
    local = MixtureStream({"pq": str(corpus / name)}, {"pq": 1.0}, batch_size=6, seed=1)
    want = [list(b["text"]) for _, b in zip(range(10), local.loader(num_workers=2))]
    faults = Faults()
    with fault_proxy(on_s3.endpoint, faults) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy, "FASTMIX_DATA_S3_CLIENT": "obstore"}
        proc = subprocess.run([sys.executable, "-c", _COLD_EPOCH_CHILD, f"s3://{on_s3.bucket}/{name}",
                               str(tmp_path / "c")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == want
    assert sum(n for path, n in faults.bytes_by_path.items() if path.endswith(ext)) == needed
    assert [line for line in faults.log if ext in line] and not [
        line for line in faults.log if line.startswith("HEAD") and ext in line]


def test_cache_budget_below_one_block_is_a_clear_error(on_s3, tmp_path):
    with pytest.raises(CacheBudgetError, match="does not fit in the shard cache's budget of 4,000 bytes"):
        open_source("w", f"s3://{on_s3.bucket}/wds", cache_dir=tmp_path / "c", cache_limit=4000)  # indexing
    open_source("w", f"s3://{on_s3.bucket}/wds", cache_dir=tmp_path / "c")  # index with room, then:
    stream = MixtureStream({"w": {"path": f"s3://{on_s3.bucket}/wds", "cache_dir": tmp_path / "c",
                                  "cache_limit": 4000}}, {"w": 1.0}, batch_size=8, seed=0)
    with pytest.raises(CacheBudgetError, match="smaller than one block.*raise cache_limit"):
        next(iter(stream))


def test_prefetch_fetches_the_row_groups_the_plan_reads_next(on_s3, tmp_path):
    stream = MixtureStream({"pq": {"path": f"s3://{on_s3.bucket}/pq", "cache_dir": tmp_path / "c", "prefetch": "1B"}},
                           {"pq": 1.0}, batch_size=4, seed=3)
    src = stream.sources[0]
    src.storage.cache.clear()
    block, later = stream._plan_block([0]), stream._plan_block(list(range(1, 30)))
    now, ahead = block_reads(stream.items, block, [0]), block_reads(stream.items, later, [0])
    assert all(groups is not None for _, groups in now[0] + ahead[0])  # row groups, not whole shards
    prefetch_block(stream.sources, now, [ahead])  # one coming block
    prefetcher().wait()
    cached = set(os.listdir(src.storage.cache.directory / "blobs"))
    first_next = next(r for r in ahead[0] if r not in now[0])
    wanted = {key for shard, groups in [*now[0], first_next] for key in src.cache_keys(shard, groups)}
    assert cached == wanted  # this block's row groups (and footers) and the next read's, nothing else
    prefetcher().release_all()


@pytest.mark.parametrize("budget_reads", [2, None], ids=["two-reads", "all"])
def test_prefetch_fetches_the_coming_reads_up_to_its_byte_budget(on_s3, tmp_path, budget_reads):
    """The coming blocks' reads, in plan order, are fetched together until their bytes reach the
    source's prefetch budget: exactly the first two with a budget of their bytes, every one of two
    coming blocks with a large budget; nothing else."""
    stream = MixtureStream({"pq": {"path": f"s3://{on_s3.bucket}/pq", "cache_dir": tmp_path / "c"}},
                           {"pq": 1.0}, batch_size=4, seed=3)
    src = stream.sources[0]
    src.storage.cache.clear()
    now = block_reads(stream.items, stream._plan_block([0]), [0])
    coming = [block_reads(stream.items, stream._plan_block(b), [0]) for b in (list(range(1, 6)), list(range(6, 30)))]
    reads = list(dict.fromkeys(r for block in coming for r in block[0] if r not in now[0]))
    assert len(reads) >= 3
    wanted = reads if budget_reads is None else reads[:budget_reads]
    src.storage.prefetch = 10**9 if budget_reads is None else sum(src.reads_bytes([r]) for r in wanted)
    prefetch_block(stream.sources, now, iter(coming))
    prefetcher().wait()
    cached = set(os.listdir(src.storage.cache.directory / "blobs"))
    assert cached == {key for shard, groups in [*now[0], *wanted] for key in src.cache_keys(shard, groups)}
    prefetcher().release_all()


def test_a_rank_downloads_only_the_row_groups_of_its_partitions(s3, tmp_path):
    """Two ranks, each with its own cache (as on two hosts), 4 partitions: a rank downloads the
    footers and the row groups of its partitions' slices only, about half of what the data needs."""
    docs = [d * 2 for d in make_docs(1024, seed=6)]  # 4 slices of MIN_SLICE_ITEMS rows
    write_parquet_source(tmp_path / "big", docs, shards=4, row_group_size=64)
    url = s3.put(tmp_path / "big", "big")
    index_url = f"s3://{s3.bucket}/indexes/big.json"
    index_source("big", url, out=index_url, cache_dir=tmp_path / "index")
    whole = sum(open_source("big", index_file=index_url, cache_dir=tmp_path / "index").fetch_bytes(i)
                for i in range(4))  # footers and all text chunks: what one process would download
    got, per_rank = [], []
    for rank in range(2):
        src = open_source("big", index_file=index_url, cache_dir=tmp_path / f"rank{rank}")
        faults = Faults()
        with fault_proxy(s3.endpoint, faults) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy
            try:
                stream = MixtureStream({"big": src}, {"big": 1.0}, batch_size=8, seed=1, partitions=4, rank=rank,
                                       world_size=2)
                got += [t for b in _batches(stream, 64) for t in b["text"]]  # one epoch: 512 rows per rank
            finally:
                os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
        per_rank.append(sum(n for path, n in faults.bytes_by_path.items() if path.endswith(".parquet")))
    assert sorted(got) == sorted(docs)
    for n in per_rank:
        assert n <= 0.55 * whole, (per_rank, whole)  # its half (plus a shared footer or row group)
    assert whole <= sum(per_rank) <= 1.1 * whole, (per_rank, whole)


def test_credentials_never_in_state_logs_or_errors(on_s3, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    stream = MixtureStream({"w": f"s3://{on_s3.bucket}/wds"}, {"w": 1.0}, batch_size=4, seed=0,
                           cache_dir=tmp_path / "c")
    _texts(stream, 3)
    with pytest.raises(SourceError) as info:
        open_source("x", f"s3://{on_s3.bucket}/absent.tar")
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fastmix_data"))
    blob = json.dumps(stream.state_dict()) + ours + str(info.value) + repr(stream.sources[0].storage)
    assert FAKE_SECRET not in blob and FAKE_KEY_ID not in blob
    assert FAKE_SECRET not in caplog.text  # not even in botocore's DEBUG lines (it logs the key id)
    with pytest.raises(SourceError) as info:
        open_source("x", f"s3://{on_s3.bucket}/wds", storage_options={"secret": "inline-secret-42"},
                    retry=None, format="parquet")
    assert "inline-secret-42" not in str(info.value) + caplog.text


def test_streamed_without_a_local_copy(on_s3, tmp_path, corpus):
    src = open_source("w", f"s3://{on_s3.bucket}/wds", remote_cache=False, cache_dir=tmp_path / "c")
    assert read_all(src) == read_all(open_source("w", corpus / "wds"))
    assert not (tmp_path / "c" / "shards").exists()


def test_parquet_table_is_shared_as_arrow(on_s3):
    src = open_source("pq", f"s3://{on_s3.bucket}/pq")
    assert isinstance(src.read_shard_table(0), pa.Table)


def test_manifest_of_a_remote_source_is_refused_without_credentials(on_s3, tmp_path):
    from fastmix_data.errors import ManifestError
    from fastmix_data.export.manifest import build_manifest

    src = open_source("w", f"s3://{on_s3.bucket}/wds")
    with pytest.raises(ManifestError, match="not a local file") as info:
        build_manifest({"w": src}, [1], 10, root=tmp_path)
    assert FAKE_SECRET not in str(info.value)
