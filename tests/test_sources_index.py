"""Shard index cache: computed once, reused, recomputed per changed shard, written atomically."""

from __future__ import annotations

import json
import os

import pytest
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data.sources import index as index_mod
from fastmix_data.sources import open_source


@pytest.fixture
def hash_calls(monkeypatch):
    calls: list[str] = []
    original = index_mod.sha256_file

    def counting(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(index_mod, "sha256_file", counting)
    return calls


def test_second_open_uses_the_cache(tmp_path, hash_calls, index_cache):
    paths = write_parquet_source(tmp_path / "d", make_docs(20), shards=4)
    first = open_source("s", tmp_path / "d")
    assert sorted(hash_calls) == sorted(map(str, paths))
    hash_calls.clear()
    second = open_source("s", tmp_path / "d")
    assert hash_calls == []
    assert second.shards == first.shards
    assert len(list(index_cache.glob("*.json"))) == 1


def test_changed_shard_is_recomputed_alone(tmp_path, hash_calls):
    paths = write_parquet_source(tmp_path / "d", make_docs(20), shards=4)
    before = open_source("s", tmp_path / "d")
    hash_calls.clear()
    write_parquet_source(tmp_path / "d", make_docs(5, seed=1), shards=1, prefix="part")  # rewrites part-00000
    after = open_source("s", tmp_path / "d")
    assert hash_calls == [str(paths[0])]
    assert after.shards[0].rows == 5 and after.shards[1:] == before.shards[1:]
    assert after.fingerprint() != before.fingerprint()


def test_touch_without_change_recomputes_but_keeps_fingerprint(tmp_path, hash_calls):
    paths = write_parquet_source(tmp_path / "d", make_docs(8), shards=2)
    before = open_source("s", tmp_path / "d")
    hash_calls.clear()
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = open_source("s", tmp_path / "d")
    assert hash_calls == [str(paths[1])]
    assert after.fingerprint() == before.fingerprint()


def test_new_shard_in_same_directory_reuses_the_others(tmp_path, hash_calls):
    write_parquet_source(tmp_path / "d", make_docs(8), shards=2)
    open_source("s", tmp_path / "d")
    hash_calls.clear()
    (extra,) = write_parquet_source(tmp_path / "d", make_docs(3), shards=1, prefix="zz")
    src = open_source("s", tmp_path / "d")
    assert hash_calls == [str(extra)] and len(src.shards) == 3


def test_reader_config_is_part_of_the_key(tmp_path, hash_calls, index_cache):
    write_parquet_source(tmp_path / "d", make_docs(8), shards=2, ids_col="input_ids")
    with_ids = open_source("s", tmp_path / "d")
    hash_calls.clear()
    text_only = open_source("s", tmp_path / "d", ids_field=None)
    assert len(hash_calls) == 2 and len(list(index_cache.glob("*.json"))) == 2
    assert with_ids.shards[0].tokens != text_only.shards[0].tokens


def test_cache_file_format_and_no_temp_files(tmp_path, index_cache):
    (path,) = write_parquet_source(tmp_path / "d", ["héllo", "ab"], shards=1)
    open_source("s", tmp_path / "d")
    (cache_file,) = index_cache.iterdir()
    obj = json.loads(cache_file.read_text())
    assert obj["version"] == 2 and obj["format"] == "parquet"
    entry = obj["shards"][str(path)]
    st = os.stat(path)
    assert entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns
    assert entry["rows"] == 2 and entry["text_bytes"] == {"text": 8} and entry["columns"] == {"text": "text"}
    assert len(entry["sha256"]) == 64
    layout = entry["layout"]  # footer and column-chunk byte ranges, rows per row group
    assert layout["rows"] == [2] and layout["footer"][0] + layout["footer"][1] == st.st_size
    assert set(layout["chunks"]) == {"text"} and 4 <= layout["chunks"]["text"][0][0] < layout["footer"][0]


def test_unreadable_cache_file_is_rebuilt(tmp_path, hash_calls, index_cache):
    write_parquet_source(tmp_path / "d", make_docs(4), shards=1)
    open_source("s", tmp_path / "d")
    (cache_file,) = index_cache.iterdir()
    cache_file.write_text("{not json")
    hash_calls.clear()
    assert open_source("s", tmp_path / "d").rows == 4
    assert len(hash_calls) == 1
    json.loads(cache_file.read_text())


def test_explicit_cache_dir_and_env_default(tmp_path, index_cache):
    write_wds_source(tmp_path / "d", make_docs(4), shards=1)
    open_source("s", tmp_path / "d", cache_dir=tmp_path / "mine")
    assert len(list((tmp_path / "mine").glob("webdataset-*.json"))) == 1
    assert index_mod.default_cache_dir() == index_cache
    assert not list(index_cache.iterdir())


def test_unwritable_cache_dir_only_warns(tmp_path, caplog):
    write_parquet_source(tmp_path / "d", make_docs(4), shards=1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    src = open_source("s", tmp_path / "d", cache_dir=blocker / "sub")
    assert src.rows == 4 and "cannot write shard index cache" in caplog.text


def test_progress_bar_for_many_shards(tmp_path, capsys):
    write_parquet_source(tmp_path / "d", make_docs(20), shards=10)
    open_source("many", tmp_path / "d")
    assert "indexing many" in capsys.readouterr().err
