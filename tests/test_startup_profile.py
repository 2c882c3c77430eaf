"""benchmarks/startup_profile.py (a diagnostic of issue 16) on small real shards: every worker reports,
the served items add up, and what the workers decoded covers what they served."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from fastmix_data.stream import direct_ring, items, mixture


@pytest.fixture()
def sp(monkeypatch, bench_import):
    # the script wraps these before the workers fork: restored after the test
    for owner, name in ((items.ItemSource, "_read"), (items.ItemSource, "_packed"),
                        (mixture.MixtureStream, "__iter__"), (direct_ring, "write_all")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    mod = bench_import("startup_profile")
    monkeypatch.setattr(mod, "STATE", {"consumed": 1 << 62, "profile_dir": None, "out_dir": None})
    return mod


@pytest.fixture()
def token_data(sp, tmp_path, monkeypatch):
    """partition_bench's token sources in small: one Parquet shard of uint16 ids per domain."""
    rng = np.random.default_rng(0)
    tokens = {}
    for k, d in enumerate(sp.pb.WEIGHTS):
        texts = ["".join(chr(97 + (k + i) % 26) * int(n) for i in range(3)) for n in rng.integers(300, 900, 60)]
        path = tmp_path / d / "part-00000.parquet"
        path.parent.mkdir()
        pq.write_table(sp.pb._table(texts, ids=True), path, row_group_size=20)
        tokens[d] = [str(path)]
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    return {"tokens": tokens}


def test_two_workers_report_their_start_and_what_they_decoded(sp, token_data, tmp_path):
    out = tmp_path / "p.json"
    assert sp.main(["--mode", "tokens", "--workers", "2", "--n", "40", "--out", str(out)], data=token_data) == 0
    got = json.loads(out.read_text())
    workers = got["worker_figures"]
    assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
    served = sum(w["counts"]["items_served"] for w in workers)
    assert served == 40  # the 5 batches up to the 40th item, each counted by the worker that built it
    for w in workers:
        assert w["entry"]["cpu"] <= w["first"]["cpu"] <= w["end"]["cpu"]
        assert w["first_counts"]["groups_decoded"] >= 1 and w["counts"]["pieces_packed"] >= 1
        assert w["counts"]["items_built"] >= w["counts"]["items_served"]
    t = got["training"]
    assert t["start"]["cpu"] <= t["first"]["cpu"] <= t["nth"]["cpu"] and got["training_counts"]["groups_decoded"] == 0
