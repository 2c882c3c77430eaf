"""The CPU-ratio benchmark's same-work check (benchmarks/steady_ab.py's batch digests,
benchmarks/inprocess_thp.py's comparison): cells with the same seed agree at any worker count and
token width, and a cell that served other batches is reported."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="module")
def bench(bench_import):
    return bench_import("steady_ab"), bench_import("inprocess_thp")


@pytest.fixture()
def token_data(bench, tmp_path, monkeypatch):
    """partition_bench's token sources in small: one Parquet shard of uint16 ids per domain."""
    pb = bench[0].pb
    rng = np.random.default_rng(0)
    tokens = {}
    for k, d in enumerate(pb.WEIGHTS):
        texts = ["".join(chr(97 + (k + i) % 26) * int(n) for i in range(3)) for n in rng.integers(300, 900, 60)]
        path = tmp_path / d / "part-00000.parquet"
        path.parent.mkdir()
        pq.write_table(pb._table(texts, ids=True), path, row_group_size=20)
        tokens[d] = [str(path)]
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return {"tokens": tokens}


def _cell(bench, data, mode: str, seed: int, workers: int, n: int = 48) -> dict:
    steady_ab, _ = bench
    seen: dict = {}
    opened = steady_ab.fingerprinted(steady_ab.pb.CONTENDERS[steady_ab.MODES[mode]], n, seen)
    out = steady_ab.pb.measure(opened, data, seed, workers, n)
    return {**seen, "served": out["served"]}


def test_same_seed_same_batches_at_any_worker_count_and_width(bench, token_data):
    ref = _cell(bench, token_data, "tokens", 1, 0)
    assert ref["served"] == 48 and ref["first"] != ref["last"]
    assert _cell(bench, token_data, "tokens", 1, 2) == ref
    assert _cell(bench, token_data, "tokens-narrow", 1, 0) == ref  # digested as int64
    assert _cell(bench, token_data, "tokens", 2, 0)["first"] != ref["first"]


def test_different_work_names_the_repetition_and_cells(bench):
    _, thp = bench
    cells = [{"rep": r, "cell": c, "first": "a", "last": "b"} for r in (0, 1) for c in ("inproc", "w2")]
    assert thp.different_work(cells) == []
    cells[3]["last"] = "c"
    assert thp.different_work(cells) == ["rep 1: inproc a/b, w2 a/c"]
    del cells[0]["last"]
    assert thp.different_work(cells)[0] == "rep 0: inproc a/None, w2 a/b"


def test_digest_of_texts_and_ids(bench):
    steady_ab, _ = bench
    torch = steady_ab.pb.torch
    assert steady_ab.digest(["ab", "c"]) != steady_ab.digest(["a", "bc"])
    ids = torch.tensor([[1, 2, 3]], dtype=torch.uint16)
    assert steady_ab.digest(ids) == steady_ab.digest(ids.long()) != steady_ab.digest(ids.long().flip(1))
