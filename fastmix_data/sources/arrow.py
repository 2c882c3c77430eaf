"""Arrow column helpers shared by the Parquet and Hugging Face readers.

Conversions are vectorised: ids come out of a ListArray's flat values and offsets as zero-copy numpy
views in their stored integer type (`IdRows`), never through per-row Python ints.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fastmix_data.errors import SourceError
from fastmix_data.sources.base import IdRows, ShardData
from fastmix_data.sources.reader import IDS, TEXT, Candidate, Columns, ShardStats


def column_kind(dtype: pa.DataType) -> str:
    """``"text"`` for string types, ``"ids"`` for lists of integers, else the Arrow type name."""
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return TEXT
    if (
        pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)
    ) and pa.types.is_integer(dtype.value_type):
        return IDS
    return str(dtype)


def schema_kinds(schema: pa.Schema) -> dict[str, str]:
    return {f.name: column_kind(f.type) for f in schema}


def _check_no_nulls(col: pa.ChunkedArray, name: str, path: str) -> None:
    if col.null_count:
        raise SourceError(
            f"column {name!r} of shard {path} has {col.null_count} null rows; "
            "fill or drop them before using this shard"
        )


def stats_from_table(
    path: str,
    table: pa.Table,
    kinds: dict[str, str],
    text: tuple[Candidate, ...],
    ids: tuple[Candidate, ...],
) -> ShardStats:
    """Count rows, text bytes and ids tokens of the candidate columns present in ``table``."""
    stats = ShardStats(rows=table.num_rows, columns=kinds)
    for cand in text:
        if kinds.get(cand.name) == TEXT:
            col = table.column(cand.name)
            _check_no_nulls(col, cand.name, path)
            stats.text_bytes[cand.name] = int(pc.sum(pc.binary_length(col)).as_py() or 0)
    for cand in ids:
        if kinds.get(cand.name) == IDS:
            col = table.column(cand.name)
            _check_no_nulls(col, cand.name, path)
            stats.ids_tokens[cand.name] = int(pc.sum(pc.list_value_length(col)).as_py() or 0)
    return stats


def candidate_columns(
    kinds: dict[str, str], text: tuple[Candidate, ...], ids: tuple[Candidate, ...]
) -> list[str]:
    """Names of candidate columns with the right kind (the ones ``stats_from_table`` needs)."""
    wanted = [c.name for c in text if kinds.get(c.name) == TEXT]
    wanted += [c.name for c in ids if kinds.get(c.name) == IDS]
    return list(dict.fromkeys(wanted))


class Utf8Rows:
    """The rows of an Arrow string column as zero-copy UTF-8 ``memoryview`` slices, made only for
    the rows asked for (`take`). What DataLoader workers put in shared memory without making Python
    strings (see :mod:`fastmix_data.stream.batch_ring`)."""

    def __init__(self, chunk: pa.Array):
        wide = pa.types.is_large_string(chunk.type)
        _, offsets, values = chunk.buffers()
        self.offsets = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32)[
            chunk.offset : chunk.offset + len(chunk) + 1
        ]
        self.values = memoryview(values) if values is not None else memoryview(b"")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> memoryview:
        return self.values[int(self.offsets[row]) : int(self.offsets[row + 1])]

    def take(self, rows) -> list[memoryview]:
        """The UTF-8 bytes of ``rows`` (indices: an int64 array or a list), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        values, starts, ends = self.values, self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        return [values[a:b] for a, b in zip(starts, ends)]


def texts_of(col: pa.ChunkedArray, name: str, path: str, raw: bool = False) -> list[str] | Utf8Rows:
    """The rows of a string column: ``str`` each, or with ``raw`` a `Utf8Rows` view of its bytes."""
    _check_no_nulls(col, name, path)
    if not raw:
        return col.to_pylist()
    return Utf8Rows(col.chunk(0) if col.num_chunks == 1 else col.combine_chunks())


def integers(arr: pa.Array) -> np.ndarray:
    """A null-free integer Arrow array as a zero-copy numpy view of its data buffer (Arrow's own
    ``to_numpy`` imports pandas, which would cost every DataLoader worker ~0.2 s)."""
    t = arr.type
    dtype = np.dtype(f"{'i' if pa.types.is_signed_integer(t) else 'u'}{t.bit_width // 8}")
    return np.frombuffer(arr.buffers()[1], dtype=dtype)[arr.offset : arr.offset + len(arr)]


def _list_chunk_to_ids(chunk: pa.Array, name: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, int64 offsets from 0) of one list chunk: zero-copy views of its buffers."""
    if pa.types.is_fixed_size_list(chunk.type):
        flat = chunk.flatten()
        if flat.null_count:
            raise SourceError(f"column {name!r} of shard {path} has null token ids")
        width = chunk.type.list_size
        return integers(flat), np.arange(len(chunk) + 1, dtype=np.int64) * width
    offsets = integers(chunk.offsets)
    start, stop = int(offsets[0]), int(offsets[-1])
    child = chunk.values.slice(start, stop - start)
    if child.null_count:
        raise SourceError(f"column {name!r} of shard {path} has null token ids")
    return integers(child), offsets.astype(np.int64) - start


def ids_of(col: pa.ChunkedArray, name: str, path: str) -> IdRows:
    """The rows of an ids column as `IdRows`: the values in their stored integer type (a view of the
    Arrow buffer when the column has one chunk), offsets as int64."""
    _check_no_nulls(col, name, path)
    parts = [IdRows(*_list_chunk_to_ids(chunk, name, path)) for chunk in col.chunks]
    if not parts:
        return IdRows(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64))
    return IdRows.concat(parts)


def shard_data_from_table(
    table: pa.Table, columns: Columns, path: str, raw_text: bool = False, native_ids: bool = False
) -> ShardData:
    """Decode the selected columns of ``table`` into a :class:`ShardData` (``raw_text``: texts as
    UTF-8 memoryviews, see `texts_of`; ids as `IdRows` of int64, or with ``native_ids`` of the
    stored integer type, without a copy)."""
    text_col = table.column(columns.text) if columns.text else None
    ids_col = table.column(columns.ids) if columns.ids else None
    texts = texts_of(text_col, columns.text, path, raw_text) if text_col is not None else None
    ids = ids_of(ids_col, columns.ids, path) if ids_col is not None else None
    if ids is not None and not native_ids:
        ids = IdRows(ids.values.astype(np.int64), ids.offsets)
    extra = {name: table.column(name).to_pylist() for name in columns.extra}
    row_tokens = None
    if ids_col is not None:
        row_tokens = value_lengths(ids_col)
    elif text_col is not None:
        row_tokens = value_lengths(text_col) + 1
    return ShardData(texts=texts, ids=ids, extra=extra, row_tokens=row_tokens)


def table_from_shard_data(data: ShardData, columns: Columns) -> pa.Table:
    """The text/ids columns of a decoded shard as an Arrow table named as ``columns`` (the inverse
    of `shard_data_from_table`; extra columns are not carried)."""
    arrays, names = [], []
    if columns.text:
        arrays.append(pa.array(data.texts, type=pa.large_string()))
        names.append(columns.text)
    if columns.ids:
        rows = IdRows.of(data.ids)
        arrays.append(pa.LargeListArray.from_arrays(pa.array(rows.offsets), pa.array(rows.values)))
        names.append(columns.ids)
    return pa.table(arrays, names=names)


def value_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Per row, the UTF-8 bytes of a string column or the length of a list column (int64), from the
    offsets buffers (Arrow's to_numpy would import pandas into every DataLoader worker)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    if len(chunks) == 1:  # the usual case (one shard, one row group): no concatenation
        return _chunk_lengths(chunks[0])
    return np.concatenate([np.zeros(0, dtype=np.int64), *(_chunk_lengths(c) for c in chunks)])


def _chunk_lengths(chunk: pa.Array) -> np.ndarray:
    kind = chunk.type
    if pa.types.is_fixed_size_list(kind):
        return np.full(len(chunk), kind.list_size, dtype=np.int64)
    wide = pa.types.is_large_string(kind) or pa.types.is_large_list(kind)
    offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if wide else np.int32)
    offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1].astype(np.int64)
    return offsets[1:] - offsets[:-1]


def needed_columns(columns: Columns) -> list[str]:
    names = [n for n in (columns.text, columns.ids) if n is not None]
    return list(dict.fromkeys([*names, *columns.extra]))
