"""benchmarks/text_path_split.py (a diagnostic of issue 16) on small real text shards: every stage is
timed over the batches asked for, and the worker's batches, through a slot, are the in-process ones."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

STAGES = ("plan", "build_str", "build_views", "encode", "put", "take", "unpack", "texts_to_str", "join", "join_write",
          "utf8_floor", "arrow_take", "np_concatenate", "pwritev", "mm_write")  # fmt: skip


@pytest.fixture()
def split(bench_import):
    return bench_import("text_path_split")


@pytest.fixture()
def text_data(split, tmp_path, monkeypatch):
    """partition_bench's text sources in small: two Parquet shards of several row groups per domain,
    with non-ASCII and empty rows."""
    text = {}
    for k, d in enumerate(split.pb.WEIGHTS):
        rows = [("é" if i % 7 == 0 else "") + f"{d} {i} " * ((i * (k + 3)) % 40) for i in range(120)]
        text[d] = []
        for s in range(2):
            path = tmp_path / d / f"part-{s:05d}.parquet"
            path.parent.mkdir(exist_ok=True)
            pq.write_table(split.pb._table(rows[s::2], ids=False), path, row_group_size=16)
            text[d].append(str(path))
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return {"text": text}


def test_every_stage_is_timed_over_the_stream_s_own_batches(split, text_data, tmp_path):
    out = tmp_path / "split.json"
    assert split.main(["--batches", "12", "--reps", "1", "--out", str(out)], data=text_data) == 0
    got = json.loads(out.read_text())
    assert got["batches"] == 12 and 0 < got["non_ascii_batches"] <= 12
    assert all(got[k] > 0 for k in STAGES), {k: got[k] for k in STAGES}
    assert got["text_bytes_per_batch"] > 0


def test_a_batch_that_differs_through_the_slot_is_refused(split, text_data, tmp_path, monkeypatch):
    from fastmix_data.stream import batch_ring

    decode = batch_ring._texts
    monkeypatch.setattr(batch_ring, "_texts", lambda *a: decode(*a)[::-1])  # rows come back reversed
    with pytest.raises(RuntimeError, match="differ from the in-process"):
        split.main(["--batches", "4", "--reps", "1", "--out", str(tmp_path / "x.json")], data=text_data)
