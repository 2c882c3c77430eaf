"""The text per-batch path of `MixtureStream.loader` workers: Parquet rows gathered as UTF-8 views of
the decoded Arrow column (`Utf8Rows.take`), written into a ring slot as int64 lengths and the rows'
bytes (`batch_ring._text_parts`), and decoded to ``str`` in the training process (`batch_ring._texts`).
What the user receives must be what ``num_workers=0`` serves: the same ``str`` rows, None kept, in the
same order."""

from __future__ import annotations

import glob
import mmap

import numpy as np
import pyarrow.parquet as pq
import pytest
from shardgen import write_parquet_source

from fastmix_data import MixtureStream
from fastmix_data.sources.arrow import Utf8Rows
from fastmix_data.stream import batch_ring

ROWS = ["plain", "", "héllo wörld", "\U0001f600 emoji", "日本語のテキスト", "z" * 3000, "tab\tand\nnewline", "\x00 nul"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source "prose": texts (non-ASCII, empty, a NUL) in 3 shards of several row groups; "ids": an ids
    column and no text column (its rows' text is None)."""
    root = tmp_path_factory.mktemp("texts")
    docs = [f"{ROWS[i % len(ROWS)]}{'' if i % 3 else i}" for i in range(150)]
    write_parquet_source(root / "prose", docs, shards=3, row_group_size=16)
    write_parquet_source(root / "ids", [f"x{i}" for i in range(60)], shards=2, text_col=None, ids_col="input_ids")
    return {"prose": str(root / "prose"), "ids": str(root / "ids")}


def _texts(batches) -> list[tuple[int, list]]:
    return [(b["batch_index"], b["text"]) for b in batches]


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_serve_the_in_process_texts_none_kept(sources, workers):
    weights = {"prose": 0.7, "ids": 0.3}
    ref = _texts(b for _, b in zip(range(40), MixtureStream(sources, weights, batch_size=8, seed=3)))
    rows = [t for _, texts in ref for t in texts]
    # the cells the path must carry: a batch spanning both sources, None, empty and non-ASCII rows
    assert any(None in texts and any(t for t in texts) for _, texts in ref)
    assert "" in rows and any(t and not t.isascii() for t in rows) and any(t and "\x00" in t for t in rows)
    stream = MixtureStream(sources, weights, batch_size=8, seed=3)
    try:
        loader = stream.loader(num_workers=workers, prefetch_factor=2)
        got = _texts(b for _, b in zip(range(40), loader))
        assert loader.transport == "direct"
    finally:
        stream.close()
    assert got == ref
    assert all(type(t) is str for _, texts in got for t in texts if t is not None)


def _slot_round_trip(rows: list) -> list:
    """``rows`` written as a slot's text column and read back (`encode` / `decode` over a map)."""
    out, layout, pieces, size = batch_ring.encode({"text": rows, "batch_index": 0})
    with mmap.mmap(-1, 4096 + size) as mm:
        batch_ring.write_pieces(mm, 64, pieces)
        return batch_ring.decode(out, layout, mm, 64)["text"]


def test_arrow_rows_taken_by_index_array_or_list_round_trip_through_a_slot(sources):
    path = sorted(glob.glob(f"{sources['prose']}/*.parquet"))[1]
    column = pq.read_table(path).column("text")
    want = column.to_pylist()
    rows = Utf8Rows(column.combine_chunks())
    order = np.array([5, 0, 5, len(want) - 1, 1, 2, 3, 4], dtype=np.int64)  # any order, repeats
    for indices in (order, order.tolist()):
        taken = rows.take(indices)
        assert all(type(v) is memoryview for v in taken)
        assert _slot_round_trip(taken) == [want[i] for i in order]
    assert _slot_round_trip(rows.take(np.zeros(0, dtype=np.int64))) == []


def test_mixed_text_kinds_keep_none_and_any_str(sources):
    column = pq.read_table(sorted(glob.glob(f"{sources['prose']}/*.parquet"))[0]).column("text")
    views = Utf8Rows(column.combine_chunks()).take([2, 0])
    rows = [None, views[0], "", "lone \udc80 surrogate", None, views[1], "\U0001f600"]
    want = [None, column[2].as_py(), "", "lone \udc80 surrogate", None, column[0].as_py(), "\U0001f600"]
    assert _slot_round_trip(rows) == want
    assert _slot_round_trip([None, None]) == [None, None]
    assert _slot_round_trip([""]) == [""]
