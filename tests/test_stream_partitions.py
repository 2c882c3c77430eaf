"""MixtureStream with canonical partitions, on real Parquet shards with row groups: the same content
for any worker and rank count that divides the work, each process reading only its share, exact
resume mid-block under live weights, packing with narrow ids and the right end-of-document id."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch
from conformance import batch_key, check_stream_resume
from shardgen import make_docs, write_parquet_source

from fastmix_data import MixtureStream
from fastmix_data.errors import StateError
from fastmix_data.stream import items as items_module

P = 4
W = {"big": 0.5, "ids": 0.4, "tiny": 0.1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    write_parquet_source(root / "big", make_docs(1200, seed=1, prefix="big"), shards=3, row_group_size=50)
    ids = [[(7 * i + j) % 60000 + 300 for j in range(1 + i % 23)] for i in range(1100)]
    write_parquet_source(root / "ids", make_docs(1100, seed=2, prefix="ids"), shards=2, ids_col="input_ids",
                         ids=ids, ids_type=pa.uint16(), row_group_size=64)  # fmt: skip
    write_parquet_source(root / "tiny", make_docs(9, seed=3, prefix="tiny"), shards=1)
    return root


def sources(root):
    return {"big": str(root / "big"), "ids": str(root / "ids"), "tiny": str(root / "tiny")}


def make(root, **kw):
    kw.setdefault("batch_size", 6)
    return MixtureStream(sources(root), W, seed=3, partitions=P, **kw)


def key(batch):
    return batch_key(batch, "text", "input_ids")


def take(it, n):
    return list(itertools.islice(it, n))


def test_partitions_in_use_and_a_source_too_small_to_cut(data):
    stream = make(data)
    assert stream.mixture.partitions == P
    assert [it.layout.count for it in stream.items] == [P, P, 1]  # tiny: one slice, shared by all
    assert stream.token_dtype == np.uint16  # the ids column is uint16, the byte vocabulary 257
    assert stream.state_dict()["config"]["partitions"] == P


def test_same_content_for_any_workers_and_ranks(data):
    ref = [key(b) for b in take(iter(make(data)), 24)]
    for workers in (1, 2, 4):
        got = [key(b) for b in take(make(data).loader(num_workers=workers), 24)]
        assert got == ref, workers
    # two ranks with the same per-rank batch: rank r's batch g is the one-rank stream's batch 2g + r
    for rank in (0, 1):
        got = take(iter(make(data, rank=rank, world_size=2)), 12)
        assert [key(b)[2:] for b in got] == [k[2:] for k in ref[rank::2]]
    # a fixed chunk keeps the content when the per-rank batch doubles at a fixed global batch
    one_rank = take(iter(make(data, batch_size=6, chunk_items=3)), 8)
    rank1 = take(iter(make(data, batch_size=3, chunk_items=3, rank=1, world_size=2)), 8)
    for whole, half in zip(one_rank, rank1):  # rank 1 serves the second chunk of each global batch
        assert whole["text"][3:] == half["text"] and whole["source"][3:].tolist() == half["source"].tolist()


def _rows_read(monkeypatch):
    reads = []
    real = items_module.ItemSource._read

    def spy(self, shard, groups):
        out = real(self, shard, groups)
        reads.append((self.source.name, shard, tuple(groups) if groups is not None else None, sum(d.rows for d in out)))
        return out

    monkeypatch.setattr(items_module.ItemSource, "_read", spy)
    return reads


def test_each_worker_and_rank_reads_only_its_share(data, monkeypatch):
    """With W * R = 2 dividing P, each process decodes about half of each cut source's rows (only the
    row groups of its slices: the boundary row groups twice), and the tiny source whole."""
    reads = _rows_read(monkeypatch)
    per_process = []
    for rank in range(2):
        reads.clear()
        stream = make(data, rank=rank, world_size=2, block_batches=8)
        take(iter(stream), 200)  # a whole epoch of every slice
        per_process.append({name: sum(r[3] for r in reads if r[0] == name) for name in ("big", "ids", "tiny")})
    for name, total in (("big", 1200), ("ids", 1100)):
        both = per_process[0][name] + per_process[1][name]
        assert total <= both <= total + 2 * 64 * 2, (name, per_process)
        assert per_process[0][name] <= 0.6 * total and per_process[1][name] <= 0.6 * total
    # workers within one process: batches w, w + 2, ... of worker w of 2
    reads.clear()
    stream = make(data, block_batches=8)
    worker0 = stream._batches(0, 0, 2, in_main=False, packed_out=True)
    take(worker0, 100)
    assert sum(r[3] for r in reads if r[0] == "big") <= 0.6 * 1200


def test_resume_mid_block_under_live_weights_with_workers(data):
    check_stream_resume(lambda: make(data, batch_size=5, block_batches=16), lambda s: s.loader(num_workers=2), key,
                        11, 13, change={"big": 0.1, "ids": 0.2, "tiny": 0.7})  # fmt: skip


def test_resume_in_process_mid_block(data):
    check_stream_resume(lambda: make(data, batch_size=4, block_batches=32), iter, key, 7, 20)


def test_state_refuses_another_partition_count(data):
    state = make(data).state_dict()
    other = MixtureStream(sources(data), W, batch_size=6, seed=3, partitions=8)
    with pytest.raises(StateError, match="partitions: 4 -> 8"):
        other.load_state_dict(state)


def test_drop_serves_a_shared_tiny_slice_exactly_once(data):
    stream = make(data, exhaustion={"tiny": "drop"})
    got = take(iter(stream), 150)
    tiny = [(s, i) for b in got for src, s, i in zip(b["source"].tolist(), b["shard"].tolist(), b["item"].tolist()) if src == 2]
    assert sorted(tiny) == [(0, i) for i in range(9)]


def test_packing_with_partitions_narrow_ids_and_their_end_of_document(data):
    def packed(**kw):
        return MixtureStream({"ids": str(data / "ids"), "big": str(data / "big")}, {"ids": 0.5, "big": 0.5},
                             batch_size=4, seq_len=63, seed=1, partitions=P, **kw)  # fmt: skip

    stream = packed()
    assert [it.layout.count for it in stream.items] == [1, P]  # ids: too few sequences to cut, shared
    batches = take(iter(stream), 12)
    assert batches[0]["tokens"].dtype == torch.int64  # widened in the training process
    ids_rows = [row for b in batches for row, src in zip(b["tokens"], b["source"].tolist()) if src == 0]
    # the ids are 300..60299: no 256 (the byte tokenizer's end of document) in pre-tokenized rows
    assert all(int(row.min()) >= 300 for row in ids_rows)
    assert all(b["doc_start"].any() for b in batches)
    workers = take(packed().loader(num_workers=2), 12)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, workers))
    narrow = take(iter(packed(narrow_tokens=True)), 2)
    assert narrow[0]["tokens"].dtype == torch.uint16
    assert torch.equal(narrow[1]["tokens"].to(torch.int64), batches[1]["tokens"])
    with_eos = take(iter(packed(eos_id=299)), 12)
    rows = [row for b in with_eos for row, src in zip(b["tokens"], b["source"].tolist()) if src == 0]
    assert sum(int((row == 299).sum()) for row in rows) > 0
    starts = [b["doc_start"][i] for b in with_eos for i, s in enumerate(b["source"].tolist()) if s == 0]
    for row, st in zip(rows, starts):  # every document but the first in a row follows its 299
        after = np.flatnonzero(st.numpy())
        assert all(int(row[j - 1]) == 299 for j in after if j > 0)


def test_manifest_of_a_partitioned_stream_serves_the_same(data, tmp_path):
    from collections import Counter

    from fastmix_data.export import manifest_from_stream, stream_from_manifest
    from fastmix_data.export.resample import resample

    live = make(data, batch_size=6, max_items=6 * 40)
    served = take(iter(live), 40)
    m = manifest_from_stream(live, 40, root=str(data))
    assert m["partitions"]["count"] == P and m["partitions"]["chunk"] == 6
    counts = Counter((s, sh) for b in served for s, sh in zip(b["source"].tolist(), b["shard"].tolist()))
    takes = Counter({(k, j): sh["take"] for k, s in enumerate(m["sources"]) for j, sh in enumerate(s["shards"]) if sh["take"]})
    assert counts == takes
    again = take(iter(stream_from_manifest(m, batch_size=6)), 40)
    assert [key(b) for b in again] == [key(b) for b in served]
    index = resample(m, tmp_path / "out", shard_items=100, progress=False)
    assert index["composition"]["items"] == {n: sum(v for (k, _), v in counts.items() if k == i) for i, n in enumerate(W)}


def test_a_packed_piece_is_uncached_two_epochs_later(data):
    stream = MixtureStream({"big": str(data / "big")}, {"big": 1.0}, batch_size=4, seq_len=63, seed=1, partitions=P)
    big = stream.items[0]
    packed = [big._packed(epoch, 0, 0) for epoch in range(4)]
    assert not np.array_equal(packed[0][0], packed[1][0])  # each epoch its own order
    assert sorted(k[1] for k in big._cache if k[0] == "packed") == [2, 3]
    again = big._packed(0, 0, 0)  # packed again when asked for
    assert np.array_equal(again[0], packed[0][0]) and np.array_equal(again[1], packed[0][1])
