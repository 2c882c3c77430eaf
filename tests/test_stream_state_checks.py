"""`load_state_dict` names a bad field, and a resume refused because a source changed names the
shard(s) that changed (rewritten, added, removed)."""

from __future__ import annotations

import copy
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data import MixtureStream
from fastmix_data.errors import StateError

W = {"a": 0.5, "b": 0.5}


@pytest.fixture
def srcs(tmp_path):
    write_parquet_source(tmp_path / "a", make_docs(40, seed=1, prefix="a"), shards=4)
    write_wds_source(tmp_path / "b", make_docs(30, seed=2, prefix="b"), shards=3)
    return {"a": str(tmp_path / "a"), "b": str(tmp_path / "b" / "*.tar")}


def _state(srcs):
    stream = MixtureStream(srcs, W, batch_size=4, seed=3)
    for _, _b in zip(range(5), stream):
        pass
    stream.set_weights({"a": 0.9, "b": 0.1})
    for _, _b in zip(range(3), stream):
        pass
    return json.loads(json.dumps(stream.state_dict()))


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda s: s.update(next_batch=-1), "next_batch"),
        (lambda s: s.update(next_batch=2.5), "next_batch"),
        (lambda s: s["history"][1].update(batch=-1), r"history\[1\]\.batch"),
        (lambda s: s["history"][1].update(batch="7"), r"history\[1\]\.batch"),
        (lambda s: s["history"][1].update(position=s["history"][1]["position"] + 4), r"history\[1\]\.batch"),
        (lambda s: s["history"][1].update(weights=[0.0, 0.0]), r"history\[1\]\.weights is all zero"),
        (lambda s: s["history"][1].update(weights=[float("nan"), 1.0]), r"history\[1\]\.weights.*'a' is nan"),
        (lambda s: s["history"][1].update(weights=[-1.0, 1.0]), r"history\[1\]\.weights.*negative"),
        (lambda s: s["history"][1].update(weights=[1.0]), r"history\[1\]\.weights has 1 weights"),
        (lambda s: s["history"][1].update(version=0), r"history\[1\]\.version"),
        (lambda s: s["history"].append(dict(s["history"][1])), r"history\[2\]\.version"),
        (lambda s: s.update(history=[]), "history"),
        (lambda s: s.update(cursor={"next": 3, "worker": 2, "num_workers": 2}), r"cursor\.worker"),
        (lambda s: s.update(probes=[{"id": 0}]), r"probes\[0\]\.steps"),
        (lambda s: s["history"][0].update(requested={"a": 1.0}), r"history\[0\]\.requested"),
        (lambda s: s["history"][1].update(publisher={"run_id": "", "seq": 1}), r"history\[1\]\.publisher"),
        (lambda s: s["history"][1].update(publisher={"run_id": "r", "seq": -1}), r"history\[1\]\.publisher\.seq"),
        (lambda s: s["history"][1].update(publisher={"run_id": "r", "seq": 1, "published": "x"}),
         r"history\[1\]\.publisher\.published"),
        (lambda s: s["config"].update(partitions=0), r"config\.partitions"),
        (lambda s: s["config"].update(chunk_items=3), r"config\.chunk_items.*must divide config\.batch_size \(4\)"),
        (lambda s: s["config"].pop("ids_eos_id"), r"config\.ids_eos_id is missing"),
        (lambda s: s["config"].update(ids_eos_id=-1), r"config\.ids_eos_id"),
        (lambda s: s.pop("config"), r"config is missing"),
    ],
)
def test_a_bad_field_is_named(srcs, edit, field):
    state = _state(srcs)
    bad = copy.deepcopy(state)
    edit(bad)
    stream = MixtureStream(srcs, W, batch_size=4, seed=3)
    with pytest.raises(StateError, match=field):
        stream.load_state_dict(bad)
    stream.load_state_dict(state)  # nothing of the refused state stayed behind
    assert stream.state_dict()["next_batch"] == state["next_batch"]


def test_refused_resume_names_a_rewritten_shard(srcs, tmp_path):
    state = _state(srcs)
    target = tmp_path / "a" / "part-00002.parquet"
    pq.write_table(pa.table({"text": ["other", "rows", "now"]}), target)
    with pytest.raises(StateError, match=r"Changed shards: source 'a': .*part-00002\.parquet \(now \d+ bytes") as exc:
        MixtureStream(srcs, W, batch_size=4, seed=3).load_state_dict(state)
    assert "part-00001" not in str(exc.value) and "part-00003" not in str(exc.value)


def test_refused_resume_names_an_added_and_counts_a_removed_shard(srcs, tmp_path):
    state = _state(srcs)
    os.remove(tmp_path / "a" / "part-00000.parquet")
    write_parquet_source(tmp_path / "a", make_docs(5, seed=9), shards=1, prefix="extra")
    with pytest.raises(StateError) as exc:
        MixtureStream(srcs, W, batch_size=4, seed=3).load_state_dict(state)
    msg = str(exc.value)
    assert "extra-00000.parquet is new or changed" in msg and "1 shard(s) of the saved state are gone" in msg
    assert "source 'b'" not in msg.split("Changed shards:")[1]
