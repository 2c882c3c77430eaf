"""Decoded shards shared between DataLoader workers through slot files in shared memory."""

from __future__ import annotations

import multiprocessing as mp
import os

import pyarrow as pa
import pytest
from shardgen import make_docs, write_parquet_source

from fastmix_data import MixtureStream
from fastmix_data.stream.shared_shards import SharedShards


def _table(tag: str, rows: int = 50) -> pa.Table:
    return pa.table({"text": [f"{tag}-{i}-" + "x" * i for i in range(rows)]})


def _fail():
    raise AssertionError("decoded although another process had published the shard")


def _reader(shared: SharedShards, key: str, queue) -> None:
    queue.put(shared.get(key, _fail).column("text").to_pylist())


def test_a_shard_decoded_in_one_process_is_read_in_another():
    shared = SharedShards(slots=8)
    try:
        calls = []
        table = shared.get("src-3", lambda: calls.append(1) or _table("a"))
        assert calls == [1] and table.equals(_table("a"))
        assert shared.get("src-3", _fail).equals(_table("a"))  # this process: from the slot as well
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_reader, args=(shared, "src-3", queue))
        proc.start()
        got = queue.get(timeout=60)
        proc.join(60)
        assert proc.exitcode == 0 and got == _table("a").column("text").to_pylist()
    finally:
        shared.close()
    assert not os.path.exists(shared.dir)


def test_a_slot_taken_by_another_shard_is_a_miss_not_a_wrong_answer():
    shared = SharedShards(slots=1)  # every key collides
    try:
        shared.get("a", lambda: _table("a"))
        shared.get("b", lambda: _table("b"))  # overwrites the only slot
        calls = []
        again = shared.get("a", lambda: calls.append(1) or _table("a"))
        assert calls == [1] and again.equals(_table("a"))
    finally:
        shared.close()


def test_torn_slot_is_a_miss():
    shared = SharedShards(slots=1)
    try:
        shared.get("a", lambda: _table("a"))
        os.pwrite(shared._fd(0), (1).to_bytes(8, "little"), 8)  # an odd generation: a write in progress
        calls = []
        shared.get("a", lambda: calls.append(1) or _table("a"))
        assert calls == [1]
    finally:
        shared.close()


def test_not_enough_shared_memory_disables_sharing():
    shared = SharedShards.for_shards(max_shard_bytes=1 << 50, min_slots=4)
    try:
        assert not shared.enabled
        calls = []
        shared.get("a", lambda: calls.append(1) or _table("a"))
        shared.get("a", lambda: calls.append(1) or _table("a"))
        assert calls == [1, 1] and not os.path.exists(shared.dir)
    finally:
        shared.close()


@pytest.mark.parametrize("share, workers", [(True, 3), (False, 3), (True, 2)])
def test_workers_share_decoded_shards_and_serve_the_same_batches(tmp_path, share, workers):
    """From SHARE_MIN_WORKERS (3) workers on they share; with 2, or share_decoded=False, they do not."""
    write_parquet_source(tmp_path / "a", make_docs(200, seed=1, prefix="a"), shards=8)
    write_parquet_source(tmp_path / "b", make_docs(150, seed=2, prefix="b"), shards=6)
    sources = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}

    def texts(batches):
        return [(b["batch_index"], tuple(b["text"]), tuple(b["source"].tolist())) for b in batches]

    ref = MixtureStream(sources, {"a": 0.6, "b": 0.4}, batch_size=8, seed=4, block_batches=4)
    want = texts(b for _, b in zip(range(30), ref))
    stream = MixtureStream(sources, {"a": 0.6, "b": 0.4}, batch_size=8, seed=4, block_batches=4, share_decoded=share)
    got = texts(b for _, b in zip(range(30), stream.loader(num_workers=workers, prefetch_factor=2)))
    assert got == want
    if share and workers >= 3:
        assert os.listdir(stream.shared.dir)  # the workers wrote slot files
        stream.close()
        assert not os.path.exists(stream.shared.dir)
    elif share:
        assert not os.path.exists(stream.shared.dir)  # 2 workers decode for themselves
    else:
        assert stream.shared is None
