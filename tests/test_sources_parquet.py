"""Parquet reader: round trips, token counts, column types, null handling."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardgen import byte_ids, make_docs, read_all, write_parquet_source

from fastmix_data.errors import SourceError
from fastmix_data.sources import open_source
from fastmix_data.sources.arrow import ids_of, value_lengths


def test_round_trip_text_and_ids(tmp_path):
    docs = make_docs(50, empty=True)
    write_parquet_source(tmp_path, docs, shards=4, ids_col="input_ids", row_group_size=7)
    src = open_source("web", tmp_path)
    assert src.format == "parquet" and len(src.shards) == 4
    texts, ids = read_all(src)
    assert texts == docs
    assert ids == [byte_ids(d) for d in docs]
    assert src.rows == 50
    assert src.tokens == sum(len(byte_ids(d)) for d in docs)
    data = src.read_shard(0)
    assert all(a.dtype == np.int64 for a in data.ids)


def test_text_only_tokens_are_bytes_plus_one_eos_per_doc(tmp_path):
    docs = make_docs(20, empty=True)
    write_parquet_source(tmp_path, docs, shards=2)
    src = open_source("t", tmp_path)
    assert src.columns.ids is None
    for shard, part in zip(src.shards, [docs[:10], docs[10:]]):
        assert shard.tokens == sum(len(d.encode()) for d in part) + len(part)
    assert read_all(src) == (docs, None)


@pytest.mark.parametrize("ids_type", [pa.int64(), pa.uint16(), pa.int32()])
def test_ids_only_any_integer_width(tmp_path, ids_type):
    ids = [[1, 2, 3], [], [65535 if ids_type == pa.uint16() else 7] * 5]
    write_parquet_source(
        tmp_path, ["a", "b", "c"], shards=1, text_col=None, ids_col="toks", ids=ids, ids_type=ids_type
    )
    src = open_source("ids", tmp_path, ids_field="toks")
    assert src.columns.text is None
    assert read_all(src) == (None, ids)
    assert src.shards[0].tokens == 8


def test_large_string_and_large_list(tmp_path):
    table = pa.table(
        {
            "text": pa.array(["x", "yé"], pa.large_string()),
            "input_ids": pa.array([[1], [2, 3]], pa.large_list(pa.int64())),
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    src = open_source("l", tmp_path)
    assert read_all(src) == (["x", "yé"], [[1], [2, 3]])


def test_ids_conversion_of_sliced_chunks():
    arr = pa.array([[1, 2], [3], [], [4, 5, 6], [7]], pa.list_(pa.int32()))
    col = pa.chunked_array([arr.slice(1, 3), arr.slice(4, 1)])
    assert [a.tolist() for a in ids_of(col, "ids", "mem")] == [[3], [], [4, 5, 6], [7]]


@pytest.mark.parametrize(
    "col",
    [
        pa.chunked_array([pa.array(["ab", "", "héllo"]), pa.array(["x", "yz"]).slice(1)]),
        pa.chunked_array([pa.array(["ab", "cde"], type=pa.large_string()).slice(1)]),
        pa.chunked_array([pa.array([[1, 2], [], [3]]).slice(1), pa.array([[4, 5, 6]])]),
        pa.chunked_array([pa.array([[4, 5, 6], [1]], type=pa.large_list(pa.int64())).slice(1)]),
        pa.chunked_array([pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4]), 2)]),
        pa.chunked_array([pa.array(["ab", "", "héllo", "q"]).slice(1, 2)]),  # one sliced chunk
        pa.chunked_array([], type=pa.string()),  # no chunks
        pa.array(["a", "bcd"]),  # a plain Array
    ],
)
def test_row_token_lengths_from_offsets_match_arrow(col):
    is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
    want = (pa.compute.binary_length if is_text else pa.compute.list_value_length)(col).to_pylist()
    got = value_lengths(col)
    assert got.dtype == np.int64
    assert got.tolist() == want


def test_reading_a_shard_does_not_import_pandas(tmp_path):
    """Every DataLoader worker reads shards: an import of pandas there costs ~0.2 s per worker."""
    import subprocess
    import sys

    write_parquet_source(tmp_path, make_docs(20), shards=1, ids_col="input_ids")
    code = (
        "import sys; from fastmix_data.sources import open_source; "
        f"d = open_source('s', {str(tmp_path)!r}).read_shard(0); "
        "assert d.row_tokens is not None; print('pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_extra_columns(tmp_path):
    docs = make_docs(6)
    write_parquet_source(tmp_path, docs, shards=2, extra={"url": [f"u{i}" for i in range(6)]})
    src = open_source("e", tmp_path, extra_fields=["url"])
    assert src.read_shard(1).extra == {"url": ["u3", "u4", "u5"]}


def test_null_text_is_an_error_naming_the_column(tmp_path):
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "a.parquet")
    with pytest.raises(SourceError, match=r"'text'.*1 null rows"):
        open_source("n", tmp_path)


def test_reads_only_needed_columns(tmp_path, monkeypatch):
    docs = make_docs(4)
    write_parquet_source(tmp_path, docs, shards=1, ids_col="input_ids", extra={"blob": [b"x"] * 4})
    src = open_source("c", tmp_path, ids_field=None)
    asked = []
    original = pq.ParquetFile.read

    def spy(self, columns=None, **kw):
        asked.append(columns)
        return original(self, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    assert src.read_shard(0).texts == docs
    assert asked == [["text"]]


@pytest.mark.parametrize("whole_file_bytes", [0, 1 << 30])
def test_small_and_large_shards_read_alike(tmp_path, monkeypatch, whole_file_bytes):
    """Shards up to WHOLE_FILE_BYTES are decoded from one read(); larger ones by pyarrow from the path."""
    from fastmix_data.sources import parquet

    docs = make_docs(40, empty=True)
    write_parquet_source(tmp_path, docs, shards=2, ids_col="input_ids", row_group_size=9)
    src = open_source("w", tmp_path)
    opened = []
    original = pq.ParquetFile.__init__

    def spy(self, source, *a, **kw):
        opened.append(type(source).__name__)
        original(self, source, *a, **kw)

    monkeypatch.setattr(parquet, "WHOLE_FILE_BYTES", whole_file_bytes)
    monkeypatch.setattr(pq.ParquetFile, "__init__", spy)
    assert read_all(src) == (docs, [byte_ids(d) for d in docs])
    assert set(opened) == ({"str"} if whole_file_bytes == 0 else {"BufferReader"})


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("large", [False, True])
def test_raw_texts_are_the_utf8_bytes_of_each_row(chunks, large):
    from fastmix_data.sources.arrow import texts_of

    rows = ["ab", "", "héllo wörld", "\U0001f600", "z" * 70]
    typ = pa.large_string() if large else pa.string()
    arr = pa.array(["skip", *rows], type=typ).slice(1)
    size = -(-len(rows) // chunks)
    col = pa.chunked_array([arr.slice(i, size) for i in range(0, len(rows), size)], type=typ)
    raw = texts_of(col, "text", "mem", raw=True)
    assert len(raw) == len(rows)
    assert [bytes(raw[i]) for i in range(len(rows))] == [r.encode() for r in rows]
    picked = raw.take([4, 0, 2, 2])
    assert all(type(v) is memoryview for v in picked)
    assert [bytes(v) for v in picked] == [rows[i].encode() for i in [4, 0, 2, 2]]
    assert texts_of(col, "text", "mem") == rows
