"""Hugging Face save_to_disk reader: round trip against load_from_disk, DatasetDict, corrupt Arrow."""

from __future__ import annotations

import json

import datasets
import pytest
from shardgen import byte_ids, make_docs, overwrite, read_all, truncate, write_hf_source

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.sources import open_source


def test_round_trip_matches_load_from_disk(tmp_path):
    docs = make_docs(30, empty=True)
    root = write_hf_source(tmp_path / "d", docs, shards=3, ids_col="input_ids")
    src = open_source("h", root)
    assert src.format == "hf" and len(src.shards) == 3
    assert all(s.path.endswith(".arrow") for s in src.shards)
    texts, ids = read_all(src)
    reference = datasets.load_from_disk(str(root))
    assert texts == reference["text"] == docs
    assert ids == reference["input_ids"] == [byte_ids(d) for d in docs]


def test_text_only(tmp_path):
    docs = make_docs(8)
    root = write_hf_source(tmp_path / "d", docs, shards=2)
    src = open_source("h", root)
    assert src.tokens == sum(len(d.encode()) for d in docs) + 8


def test_dataset_dict_points_to_splits(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceError, match=r"DatasetDict.*one split.*test, train"):
        open_source("h", tmp_path / "dd")
    assert read_all(open_source("h", tmp_path / "dd" / "train"))[0] == ["a", "b"]


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_corrupt_arrow_file(tmp_path, damage):
    root = write_hf_source(tmp_path / "d", make_docs(40), shards=2, ids_col="input_ids")
    shard = root / "data-00001-of-00002.arrow"
    truncate(shard, 0.5) if damage == "truncate" else overwrite(shard, 0, b"\xff" * 64)
    with pytest.raises(SourceError, match=r"data-00001-of-00002\.arrow of source 'h' is corrupt"):
        open_source("h", root)
    src = open_source("h", root, on_corrupt="skip")
    assert [s.path for s in src.shards] == [str(root / "data-00000-of-00002.arrow")]


def test_state_json_cannot_escape_the_directory(tmp_path):
    root = write_hf_source(tmp_path / "d", ["a"], shards=1)
    state = json.loads((root / "state.json").read_text())
    state["_data_files"] = [{"filename": "../outside.arrow"}]
    (root / "state.json").write_text(json.dumps(state))
    with pytest.raises(UnsafeInputError, match="outside"):
        open_source("h", root)
