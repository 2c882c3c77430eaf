"""The multi-process floor control (benchmarks/multiproc_floor.py): split over N forked processes,
every row group of the shards is decoded exactly once in total, and the rows counted from the decoded
columns and their value sums equal the files' own."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="module")
def floor(bench_import):
    return bench_import("multiproc_floor")


@pytest.fixture()
def workdir(tmp_path):
    """partition_bench's layout in small: text and token shards of two domains, row groups of
    different sizes (7 and 11 rows), 3 + 2 text files and 1 + 1 token files."""
    rng = np.random.default_rng(0)
    for d, files in (("code", 3), ("prose", 2)):
        for i in range(files):
            texts = [
                "".join(chr(97 + int(c)) for c in rng.integers(0, 26, int(n))) + "é"
                for n in rng.integers(0, 40, 50)
            ]
            (tmp_path / "text" / d).mkdir(parents=True, exist_ok=True)
            pq.write_table(
                pa.table({"text": texts}), tmp_path / "text" / d / f"part-{i:05d}.parquet", row_group_size=7
            )
        ids = [rng.integers(0, 65535, int(n)).astype(np.uint16) for n in rng.integers(1, 30, 40)]
        (tmp_path / "tokens" / d).mkdir(parents=True)
        col = pa.array([list(map(int, x)) for x in ids], pa.list_(pa.uint16()))
        pq.write_table(
            pa.table({"input_ids": col}), tmp_path / "tokens" / d / "part-00000.parquet", row_group_size=11
        )
    return tmp_path


def _expected(files: list[str], mode: str) -> tuple[int, int]:
    """The files' rows and the sum of their values (token ids, or the texts' UTF-8 bytes), read whole."""
    rows = total = 0
    for f in files:
        col = pq.read_table(f).column(0).to_pylist()
        rows += len(col)
        total += sum(sum(x) for x in col) if mode == "tokens" else sum(sum(t.encode()) for t in col)
    return rows, total


@pytest.mark.parametrize("mode", ["tokens", "text"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("sink", [False, True])
def test_every_row_group_once(floor, workdir, mode, n, sink):
    """(With a sink and a warm parent alternately: the parent's own decode is not counted.)"""
    files = floor.shard_files(str(workdir), mode)
    assert len(files) == (5 if mode == "text" else 2)
    res = floor.run_split(files, mode, n, sink, warm_parent=sink)
    assert len(res["children"]) == n
    decoded = Counter(tuple(u) for c in res["children"] for u in c["units"])
    every = {(f, g) for f in files for g in range(pq.ParquetFile(f).metadata.num_row_groups)}
    assert set(decoded) == every and set(decoded.values()) == {1}
    assert res["n_units"] == len(every)
    rows, total = _expected(files, mode)
    assert sum(c["rows"] for c in res["children"]) == rows
    assert sum(c["sum"] for c in res["children"]) == total
    assert res["user"] + res["sys"] > 0 and res["minflt"] > 0
    sent = sum(c["sent"] for c in res["children"])
    if sink:  # every decoded value's bytes (uint16 ids: 2 each) went through the pipe, and were all received
        assert sent == res["sink"]["received"] == _value_bytes(files, mode)
    else:
        assert sent == 0 and "sink" not in res


def _value_bytes(files: list[str], mode: str) -> int:
    if mode == "tokens":
        return sum(2 * len(x) for f in files for x in pq.read_table(f).column(0).to_pylist())
    return sum(len(t.encode()) for f in files for t in pq.read_table(f).column(0).to_pylist())


def test_cells(floor):
    assert floor.parse_cell("4") == (4, False) and floor.parse_cell("1+sink") == (1, True)
    for bad in ("0", "x", "4+pipe", "4+"):
        with pytest.raises(ValueError, match="N or N\\+sink"):
            floor.parse_cell(bad)


def test_passes_repeat_each_share(floor, workdir):
    """``passes=2``: each process decodes its share twice; twice the rows, sums and row groups decoded."""
    files = floor.shard_files(str(workdir), "tokens")
    res = floor.run_split(files, "tokens", 2, passes=2)
    rows, total = _expected(files, "tokens")
    assert sum(c["rows"] for c in res["children"]) == 2 * rows
    assert sum(c["sum"] for c in res["children"]) == 2 * total
    decoded = Counter(tuple(u) for c in res["children"] for u in c["units"])
    assert set(decoded.values()) == {2} and len(decoded) == res["n_units"]
    assert res["decoded"] == 2 * res["n_units"]


@pytest.mark.parametrize("n", [1, 3])
def test_fraction_is_the_same_row_groups_at_every_n(floor, workdir, n):
    """``fraction=0.4``: an evenly spread 2 of every 5 row groups, each decoded once, the same at any N."""
    files = floor.shard_files(str(workdir), "text")
    units = floor.row_groups(files)
    res = floor.run_split(files, "text", n, fraction=0.4)
    want = [u for i, u in enumerate(units) if i % 5 in (2, 4)]
    assert sorted(tuple(u) for c in res["children"] for u in c["units"]) == sorted(want)
    assert res["decoded"] == res["n_units"] == len(want) == round(0.4 * len(units))
    assert sum(c["rows"] for c in res["children"]) == sum(
        pq.ParquetFile(p).metadata.row_group(g).num_rows for p, g in want
    )
    with pytest.raises(ValueError, match="fraction"):
        floor.spread(units, 0)


def test_shares_are_contiguous_and_cover(floor):
    units = list(range(10))
    for n in (1, 2, 3, 4, 7):
        parts = [floor.share(units, n, k) for k in range(n)]
        assert sum(parts, []) == units
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_failed_child_is_reported(floor, workdir):
    """A child that cannot decode its share (here: asked for the text column of token shards) makes
    the cell fail, naming the cell, instead of counting its CPU."""
    with pytest.raises(RuntimeError, match="N=2 text cell failed"):
        floor.run_split(floor.shard_files(str(workdir), "tokens"), "text", 2)
