"""MDS reader (mosaicml-streaming): round trips, compression, corrupt shards, pickle columns, compat."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from shardgen import byte_ids, make_docs, overwrite, read_all, truncate, write_mds_source

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.sources import open_source


@pytest.mark.parametrize("encoding", ["ndarray:int32", "ndarray:uint16", "ndarray", "json"])
def test_round_trip(tmp_path, streaming_module, encoding):
    docs = make_docs(25)
    root = write_mds_source(tmp_path / "m", docs, shards=3, ids_col="input_ids", ids_encoding=encoding)
    src = open_source("m", root)
    assert src.format == "mds" and len(src.shards) == 3
    assert [s.rows for s in src.shards] == [8, 8, 9]
    assert read_all(src) == (docs, [byte_ids(d) for d in docs])
    assert src.tokens == sum(len(byte_ids(d)) for d in docs)
    assert all(a.dtype == np.int64 for a in src.read_shard(2).ids)


def test_text_only_and_extra_column(tmp_path, streaming_module):
    docs = make_docs(6)
    root = write_mds_source(tmp_path / "m", docs, shards=2, extra={"score": ("int", list(range(6)))})
    src = open_source("m", root, extra_fields=["score"])
    assert src.shards[0].tokens == sum(len(d.encode()) for d in docs[:3]) + 3
    assert src.read_shard(1).extra == {"score": [3, 4, 5]}


def test_compressed_shards(tmp_path, streaming_module):
    docs = make_docs(12)
    root = write_mds_source(tmp_path / "m", docs, shards=2, ids_col="input_ids", compression="zstd")
    for raw in root.glob("*.mds"):
        raw.unlink()  # keep only the .mds.zstd files, as a downloaded remote dataset would
    src = open_source("m", root)
    assert all(s.path.endswith(".mds.zstd") for s in src.shards)
    assert read_all(src) == (docs, [byte_ids(d) for d in docs])


def test_shard_files_given_directly(tmp_path, streaming_module):
    docs = make_docs(9)
    root = write_mds_source(tmp_path / "m", docs, shards=3)
    src = open_source("m", str(root / "shard.0000[12].mds"))
    assert read_all(src)[0] == docs[3:]


@pytest.mark.parametrize("damage", ["truncate", "offsets"])
def test_corrupt_shard(tmp_path, streaming_module, damage):
    root = write_mds_source(tmp_path / "m", make_docs(10), shards=2)
    shard = root / "shard.00001.mds"
    if damage == "truncate":
        truncate(shard, 0.6)
    else:
        overwrite(shard, 4, b"\xff\xff\xff\x7f")
    with pytest.raises(SourceError, match=r"shard .*shard\.00001\.mds of source 'm' is corrupt"):
        open_source("m", root)
    src = open_source("m", root, on_corrupt="skip")
    assert len(src.shards) == 1 and src.skipped[0][0] == str(shard)


def test_missing_shard_file(tmp_path, streaming_module):
    root = write_mds_source(tmp_path / "m", make_docs(10), shards=2)
    (root / "shard.00000.mds").unlink()
    with pytest.raises(SourceError, match=r"shard\.00000\.mds of source 'm' does not exist"):
        open_source("m", root)


def test_pickle_column_refused_unless_allowed(tmp_path, streaming_module):
    docs = make_docs(4)
    root = write_mds_source(
        tmp_path / "m", docs, shards=1, extra={"obj": ("pkl", [{"i": i} for i in range(4)])}
    )
    with pytest.raises(UnsafeInputError, match=r"'obj'.*pkl.*allow_unsafe=True"):
        open_source("m", root)
    src = open_source("m", root, allow_unsafe=True, extra_fields=["obj"])
    assert src.read_shard(0).extra["obj"] == [{"i": i} for i in range(4)]


def test_index_path_escape_refused(tmp_path, streaming_module):
    root = write_mds_source(tmp_path / "m", make_docs(4), shards=1)
    index = json.loads((root / "index.json").read_text())
    index["shards"][0]["raw_data"]["basename"] = "../../etc/passwd"
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeInputError, match="outside"):
        open_source("m", root)


def test_import_streaming_leaves_no_stand_ins(streaming_module):
    assert streaming_module.MDSWriter is not None
    assert not any(name == "torchvision" or name.startswith("torchvision.") for name in sys.modules) or (
        getattr(sys.modules.get("torchvision"), "__file__", None) is not None
    )
