"""Resampled shards written to S3 (the loopback moto server): the same bytes as on local disk,
nothing partial visible after a crash, and a rerun that resumes."""

from __future__ import annotations

import hashlib

import pytest
from shardgen import code_web_manifest, write_code_web

from fastmix_data.export.resample import read_index, resample
from fastmix_data.storage import list_objects, read_bytes


@pytest.fixture
def manifest(tmp_path):
    return code_web_manifest(write_code_web(tmp_path / "corpus"))


def _objects(url: str) -> dict[str, str]:
    """sha256 of every visible object under ``url`` (the state directory left out)."""
    prefix = url + "/"
    return {
        o.url[len(prefix) :]: hashlib.sha256(read_bytes(o.url)).hexdigest()
        for o in list_objects(prefix)
        if not o.url[len(prefix) :].startswith(".")
    }


def _files(out) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if not p.name.startswith(".")
    }


@pytest.mark.parametrize("fmt", ["parquet", "mds"])
def test_same_bytes_on_s3_as_on_local_disk(s3, manifest, tmp_path, fmt):
    s3.put(tmp_path / "corpus" / "code", "unused")  # creates the test's bucket
    url = f"s3://{s3.bucket}/mix-{fmt}"
    local = resample(manifest, tmp_path / "local", format=fmt, shard_items=100, progress=False)
    index = resample(manifest, url, format=fmt, shard_items=100, progress=False)
    assert index["complete"] and index["run"] == local["run"]
    assert _objects(url) == _files(tmp_path / "local")  # shards, index.json, manifest.json
    assert read_index(url) == read_index(tmp_path / "local")
    again = resample(manifest, url, format=fmt, shard_items=100, progress=False)  # finished: all skipped
    assert again["stats"]["skipped"] == again["stats"]["tasks"] == 6 and again["stats"]["bytes_written"] == 0


def test_a_crash_leaves_nothing_partial_on_s3_and_a_rerun_resumes(s3, manifest, tmp_path, crash_third_parquet_write):
    s3.put(tmp_path / "corpus" / "code", "unused")  # creates the test's bucket
    url = f"s3://{s3.bucket}/mix"
    resample(manifest, tmp_path / "local", shard_items=100, progress=False)
    restore = crash_third_parquet_write()
    with pytest.raises(KeyboardInterrupt):
        resample(manifest, url, shard_items=100, progress=False)
    assert sorted(_objects(url)) == ["manifest.json", "part-00000.parquet", "part-00001.parquet"]
    restore()
    index = resample(manifest, url, shard_items=100, progress=False)
    assert index["complete"] and index["stats"]["skipped"] == 2
    assert _objects(url) == _files(tmp_path / "local")
