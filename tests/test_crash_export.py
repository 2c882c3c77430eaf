"""SIGKILL of `resample` (with worker processes) and of index building at a random point, then a
rerun: the output is byte-identical to an uninterrupted run, and no partial file is ever visible
under a final name (every visible shard is whole; every cache file parses). The killed processes'
temporary files are removed by the rerun.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest
from fuzzkit import KillPoints, kill_when, our_leftovers, start
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data.export import build_manifest, resample, write_manifest
from fastmix_data.export.resample import STATE_DIR
from fastmix_data.sources import open_source

PROGRAM = os.path.join(os.path.dirname(__file__), "crash_programs.py")
SHARD_ITEMS = 40
COUNT = 1600 // SHARD_ITEMS  # output shards


def _indexed(log: str) -> int:
    try:
        with open(log) as f:
            return f.read().count("indexed ")
    except FileNotFoundError:
        return 0


def _files(directory: str) -> dict[str, str]:
    """sha256 of every file under ``directory`` (relative paths), the run's own state excluded."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
        if os.path.isfile(path) and STATE_DIR not in path:
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-export")
    write_parquet_source(root / "code", make_docs(400, seed=1, prefix="code"), shards=4)
    write_wds_source(root / "web", make_docs(300, seed=2, prefix="web"), shards=3)
    m = build_manifest({"code": str(root / "code"), "web": str(root / "web" / "*.tar")}, {"code": 0.4, "web": 0.6},
                       1600, root=root, seed=3, history=[{"position": 500, "weights": {"code": 0.8, "web": 0.2}}])  # fmt: skip
    path = root / "manifest.json"
    write_manifest(m, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_sigkill_of_resample_then_rerun_is_byte_identical(manifest_path, tmp_path, fmt):
    reference = tmp_path / "reference"
    resample(manifest_path, reference, format=fmt, shard_items=SHARD_ITEMS, progress=False)
    expected = _files(str(reference))
    points = KillPoints(1, 4, default_seed=5)
    rng = points.rng
    for point in points:
        out, log = str(tmp_path / f"out{point}"), str(tmp_path / f"log{point}")
        args = {"manifest": manifest_path, "out": out, "format": fmt, "workers": 2, "shard_items": SHARD_ITEMS}
        proc = start([PROGRAM, "resample", json.dumps(args)], log=log)
        done_dir = os.path.join(out, STATE_DIR, "done")
        k = rng.randrange(1, COUNT - 1)  # after k finished shards, while both workers write
        kill_when(proc, lambda d=done_dir, k=k: len(glob.glob(os.path.join(d, "*.json"))) >= k, rng, f"{k} shards")
        if os.path.exists(os.path.join(out, "index.json")):  # a loaded machine finished first: another point
            continue
        points.landed()
        # No partial file under a final name: whatever is visible is a whole shard.
        for path in glob.glob(os.path.join(out, "part-*.parquet")):
            assert pq.read_table(path).num_rows == SHARD_ITEMS, path
        for path in glob.glob(os.path.join(out, "shard-*.tar")):
            assert open_source("check", path, cache_dir=tmp_path / "check-cache").shards[0].rows == SHARD_ITEMS
        resample(manifest_path, out, format=fmt, shard_items=SHARD_ITEMS, progress=False)
        assert _files(out) == expected, f"FASTMIX_CRASH_SEED={points.seed} attempt {point}"
        tmp_dir = os.path.join(out, STATE_DIR, "tmp")
        assert not os.path.isdir(tmp_dir) or not os.listdir(tmp_dir)  # the killed writers' temporaries are gone
        assert our_leftovers(os.path.join(out, STATE_DIR, "done"), proc.pid) == []


def test_sigkill_of_index_building_then_reopen_is_identical(tmp_path):
    sources = {}
    for k in range(6):
        write_parquet_source(tmp_path / f"s{k}", make_docs(240, seed=k, prefix=f"s{k}"), shards=12)
        sources[f"s{k}"] = str(tmp_path / f"s{k}")
    clean = {n: open_source(n, spec, cache_dir=tmp_path / "clean-cache").shards for n, spec in sources.items()}
    points = KillPoints(2, 6, default_seed=5)
    rng = points.rng
    for point in points:
        cache, log = str(tmp_path / f"cache{point}"), str(tmp_path / f"log{point}")
        pace = 0.1  # each source waits this long first: >= 2 sources left take longer than the jitter below
        proc = start([PROGRAM, "index", json.dumps({"sources": sources, "cache": cache, "pace": pace})], log=log)
        k = rng.randrange(0, len(sources) - 1)  # after k sources were indexed, during the next
        kill_when(proc, lambda log=log, k=k: _indexed(log) >= k, rng, f"{k} sources indexed", jitter=pace + 0.1)
        if _indexed(log) == len(sources):  # a loaded machine finished before the kill: try another point
            continue
        points.landed()
        for path in glob.glob(os.path.join(cache, "*.json")):  # atomic: whole or absent
            with open(path) as f:
                json.load(f)
        again = {n: open_source(n, spec, cache_dir=cache).shards for n, spec in sources.items()}
        strip = lambda shards: [(s.path, s.rows, s.tokens, s.bytes, s.sha256) for s in shards]  # noqa: E731
        assert {n: strip(s) for n, s in again.items()} == {n: strip(s) for n, s in clean.items()}
        assert our_leftovers(cache, proc.pid) == []
