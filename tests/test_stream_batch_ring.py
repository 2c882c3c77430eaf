"""Batches from DataLoader workers to the training process through a ring of shared-memory slots."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from shardgen import write_code_web_sources

from fastmix_data import MixtureStream
from fastmix_data.stream import batch_ring
from fastmix_data.stream.batch_ring import RING_KEY, RingReader, RingWriter

TEXTS = ["plain", "", "héllo wörld", "\U0001f600 emoji", "lone \udc80 surrogate", None, "z" * 5000]


def _batch(i: int) -> dict:
    utf8 = memoryview(pa.py_buffer("from arrow é".encode()))
    return {
        "_meta": np.arange(10 * (i + 1), dtype=np.int64).reshape(5, -1),
        "doc_start": np.array([[True, False], [False, True]]),
        "_ids": (np.arange(7, dtype=np.int64) * i, np.array([3, 0, 4], dtype=np.int64)),
        "text": [*TEXTS, utf8, utf8[5:]],
        "url": [{"not": "text"}, 3],
        "batch_index": i,
        "weight_version": 2,
    }


def _want(i: int) -> dict:
    out = _batch(i)
    out["text"] = [*TEXTS, "from arrow é", "arrow é"]
    return out


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
        elif isinstance(value, tuple):
            assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got[key], value)), key
        else:
            assert got[key] == value, key


@pytest.fixture
def ring_dir(tmp_path):
    return str(tmp_path / "rings")


def test_round_trip_in_one_process(ring_dir):
    writer, reader = RingWriter(ring_dir, 0, slots=3), RingReader(ring_dir)
    try:
        received = []
        for i in range(7):  # more batches than slots: each is taken (acknowledged) before the next
            sent = writer.send(_batch(i))
            assert RING_KEY in sent and "_meta" not in sent and sent["url"] == [{"not": "text"}, 3]
            received.append(reader.receive(sent))
        for i, got in enumerate(received):  # copies: later batches in the same slots changed nothing
            _same(got, _want(i))
    finally:
        writer.close()
        reader.close()
    assert not os.path.exists(ring_dir)


def _worker(directory: str, queue) -> None:
    writer = RingWriter(directory, 1, slots=4)
    for i in range(4):
        queue.put(writer.send(_batch(i)))
    writer.close()


def test_round_trip_across_processes(ring_dir):
    reader = RingReader(ring_dir)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(ring_dir, queue))
    proc.start()
    try:
        for i in range(4):
            sent = queue.get(timeout=60)
            assert RING_KEY in sent
            _same(reader.receive(sent), _want(i))
    finally:
        proc.join(60)
        reader.close()
    assert proc.exitcode == 0


def test_ascii_and_non_ascii_texts_round_trip_alike(ring_dir):
    # each row is decoded straight from the map; the texts are str copies, so no view of the map
    # stays alive: it can be closed at once (a view left over would make close() raise BufferError)
    ascii_rows = ["", "abc", None, "x" * 3000, "", "tail"]
    mixed = [*ascii_rows, "é"]
    writer, reader = RingWriter(ring_dir, 0, slots=2), RingReader(ring_dir)
    try:
        for rows in (ascii_rows, mixed, [None, None], [], [""]):
            got = reader.receive(writer.send({"text": rows, "batch_index": 0}))
            assert got["text"] == rows and all(type(t) is str for t in got["text"] if t is not None)
        (_path, _fd, mm), = reader._maps.values()
        mm.close()
    finally:
        writer.close()
        reader.close()


def test_a_slot_not_yet_taken_is_not_overwritten(ring_dir):
    writer, reader = RingWriter(ring_dir, 0, slots=2), RingReader(ring_dir)
    try:
        first, second = writer.send(_batch(0)), writer.send(_batch(1))
        third = writer.send(_batch(2))  # both slots held: the batch goes inline, texts as str
        assert RING_KEY not in third
        _same(third, _want(2))
        _same(reader.receive(first), _want(0))
        fourth = writer.send(_batch(3))  # slot 0 was taken: reused
        assert RING_KEY in fourth
        _same(reader.receive(second), _want(1))
        _same(reader.receive(fourth), _want(3))
    finally:
        writer.close()
        reader.close()


def test_a_batch_larger_than_a_slot_goes_inline(ring_dir):
    writer = RingWriter(ring_dir, 0, slots=2, slot_bytes=4096)
    try:
        sent = writer.send(_batch(0))
        assert RING_KEY not in sent
        _same(sent, _want(0))
        small = writer.send({"x": np.arange(4), "batch_index": 0})
        assert RING_KEY in small
    finally:
        writer.close()


def test_full_shared_memory_falls_back_to_inline(ring_dir, monkeypatch):
    writer = RingWriter(ring_dir, 0, slots=2)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch_ring.os, "posix_fallocate", full)
    try:
        sent = writer.send(_batch(0))
        assert RING_KEY not in sent and writer.mm is None
        _same(sent, _want(0))
        _same(writer.send(_batch(1)), _want(1))
    finally:
        writer.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_code_web_sources(tmp_path_factory.mktemp("ring"))


def _counting(monkeypatch) -> list:
    seen = []
    original = RingReader.receive

    def receive(self, batch):
        seen.append(RING_KEY in batch)
        return original(self, batch)

    monkeypatch.setattr(RingReader, "receive", receive)
    return seen


def _key(b: dict) -> tuple:
    ids = tuple(tuple(x.tolist()) for x in b["input_ids"]) if "input_ids" in b else None
    return (b["batch_index"], b["weight_version"], b["source"].tolist(), b["item"].tolist(),
            b["num_tokens"].tolist(), b.get("text"), ids)


@pytest.mark.parametrize("ring", [True, False])
def test_loader_serves_the_in_process_batches_through_the_ring(data, monkeypatch, ring):
    """Texts (Parquet rows as Arrow bytes, tar rows as str) and ids arrive as in-process."""
    weights = {"code": 0.6, "web": 0.4}
    ref = [_key(b) for _, b in zip(range(20), MixtureStream(data, weights, batch_size=6, seed=4))]
    seen = _counting(monkeypatch)
    stream = MixtureStream(data, weights, batch_size=6, seed=4)
    loader = stream.loader(num_workers=2, prefetch_factor=2, shared_memory_batches=ring)
    got = [_key(b) for _, b in zip(range(20), loader)]
    assert got == ref
    # with rings, the workers write every batch to them and the DataLoader delivers none; the
    # per-item path (descriptors through the DataLoader) is not used
    assert seen == []
    assert (loader.transport, loader.items_delivered) == (("direct", 0) if ring else ("items", 0))
    directory = loader.ring.directory if ring else None
    stream.close()
    assert directory is None or not os.path.exists(directory)


def test_packed_sequences_and_persistent_workers(data, monkeypatch):
    """Packing-mode arrays through the ring; persistent workers start a new ring each epoch."""

    def make():
        return MixtureStream(data, {"code": 0.5, "web": 0.5}, batch_size=3, seq_len=31, seed=2, max_items=3 * 10)

    ref = [(b["batch_index"], b["tokens"].tolist(), b["doc_start"].tolist()) for b in make()]
    assert len(ref) == 10
    stream = make()
    loader = stream.loader(num_workers=2, prefetch_factor=1, persistent_workers=True)
    for _ in range(2):
        stream.load_state_dict(make().state_dict())  # start over
        got = [(b["batch_index"], b["tokens"].tolist(), b["doc_start"].tolist()) for b in loader]
        assert got == ref
        assert (loader.transport, loader.items_delivered) == ("direct", 0)
    rings = [n for n in os.listdir(loader.ring.directory) if n.startswith("ring-")]
    assert len(rings) == 2  # one per worker: each iteration's rings replace the previous ones
    stream.close()


def _frozen_in_worker(worker_id: int) -> None:
    import gc

    assert gc.get_freeze_count() > 0, "the loader's workers should start with the parent's objects frozen"


def test_workers_start_with_the_parents_objects_frozen_and_the_parent_unfreezes(data):
    """`loader()` forks its workers under `gc.freeze()` (their collections then skip everything
    inherited, which they would otherwise walk and copy page by page) and unfreezes at once."""
    import gc

    stream = MixtureStream(data, {"code": 0.5, "web": 0.5}, batch_size=4, seed=1)
    loader = stream.loader(num_workers=2, prefetch_factor=2, worker_init_fn=_frozen_in_worker)
    assert len([b for _, b in zip(range(6), loader)]) == 6  # a worker's failed assert would raise here
    assert gc.get_freeze_count() == 0
    stream.close()


def test_an_application_freeze_is_left_as_it_was(data):
    """An application that froze objects itself keeps them frozen: `loader()` neither freezes
    more nor unfreezes (gc.unfreeze() would undo the application's freeze)."""
    import gc

    gc.freeze()
    try:
        stream = MixtureStream(data, {"code": 0.5, "web": 0.5}, batch_size=4, seed=1)
        assert len([b for _, b in zip(range(4), stream.loader(num_workers=2, prefetch_factor=2))]) == 4
        assert gc.get_freeze_count() > 0  # still frozen (objects freed meanwhile leave the count)
        stream.close()
    finally:
        gc.unfreeze()


def test_a_torch_batch_owns_its_memory(data):
    stream = MixtureStream(data, {"code": 0.5, "web": 0.5}, batch_size=4, seed=1)
    batches = [b for _, b in zip(range(12), stream.loader(num_workers=2, prefetch_factor=2))]
    ref = [b for _, b in zip(range(12), MixtureStream(data, {"code": 0.5, "web": 0.5}, batch_size=4, seed=1))]
    # later batches reuse the slots of earlier ones: the earlier tensors must not have changed
    for got, want in zip(batches, ref):
        assert torch.equal(got["item"], want["item"]) and got["text"] == want["text"]
    stream.close()


@pytest.mark.parametrize("workers, per_item, ring", [(2, 2, True), (2, 3, False), (3, 2, True), (2, 5, True)])
def test_items_of_several_batches_are_served_in_order_to_the_end(data, workers, per_item, ring):
    """Worker w sends its batches w, w + W, ... in items of ``per_item``; the training process
    serves them in global order, also when the stream ends inside an item (13 batches here). A
    DataLoader ``timeout`` keeps the per-item path (the direct transport would deliver nothing
    through the DataLoader for longer than it)."""

    def make():
        return MixtureStream(data, {"code": 0.6, "web": 0.4}, batch_size=4, seed=8, max_items=4 * 13 + 2)

    ref = [_key(b) for b in make()]
    assert len(ref) == 13
    stream = make()
    loader = stream.loader(num_workers=workers, prefetch_factor=2, batches_per_item=per_item,
                           shared_memory_batches=ring, timeout=120)
    assert loader.loader.prefetch_factor == -(-2 // per_item)  # prefetch_factor counts batches
    assert [_key(b) for b in loader] == ref
    assert loader.transport == "items"
    assert stream.state_dict()["next_batch"] == 13
    stream.close()


def test_batches_per_item_must_be_positive(data):
    with pytest.raises(ValueError, match="batches_per_item must be >= 1, got 0"):
        MixtureStream(data, {"code": 0.6, "web": 0.4}, batch_size=4).loader(num_workers=1, batches_per_item=0)


def test_without_posix_fallocate_batches_go_inline(ring_dir, monkeypatch):
    monkeypatch.delattr(batch_ring.os, "posix_fallocate")
    writer = RingWriter(ring_dir, 0, slots=2)
    sent = writer.send(_batch(0))
    assert RING_KEY not in sent
    _same(sent, _want(0))
    writer.close()


def test_loader_without_usable_shared_memory_serves_the_same_batches(data, monkeypatch):
    """No posix_fallocate (macOS): the workers send everything through the pipe, texts as str."""
    weights = {"code": 0.6, "web": 0.4}
    ref = [_key(b) for _, b in zip(range(10), MixtureStream(data, weights, batch_size=6, seed=3))]
    monkeypatch.delattr(batch_ring.os, "posix_fallocate")
    seen = _counting(monkeypatch)
    stream = MixtureStream(data, weights, batch_size=6, seed=3)
    assert [_key(b) for _, b in zip(range(10), stream.loader(num_workers=2))] == ref
    assert len(seen) >= 10 and not any(seen)  # every batch came inline (some received ahead)
    stream.close()
