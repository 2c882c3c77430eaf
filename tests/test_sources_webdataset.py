"""WebDataset reader: member conventions, round trips, corrupt tars, pickled members, pipe: URLs."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from shardgen import byte_ids, make_docs, overwrite, read_all, truncate, write_wds_source

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.sources import open_source


@pytest.mark.parametrize("ids_member", ["npy", "json", "input_ids.npy", "input_ids.json"])
def test_round_trip_txt_and_ids(tmp_path, ids_member):
    docs = make_docs(30, empty=True)
    write_wds_source(tmp_path, docs, shards=3, ids_member=ids_member)
    src = open_source("w", tmp_path)
    assert src.format == "webdataset"
    assert (src.columns.text, src.columns.ids) == ("txt", ids_member)
    assert read_all(src) == (docs, [byte_ids(d) for d in docs])
    assert src.tokens == sum(len(byte_ids(d)) for d in docs)


def test_text_only_and_custom_member_names(tmp_path):
    docs = make_docs(9)
    write_wds_source(tmp_path, docs, shards=1, text_member="body.txt", ids_member="toks.npy")
    src = open_source("w", tmp_path, text_field="body.txt", ids_field="toks")
    assert read_all(src) == (docs, [byte_ids(d) for d in docs])
    src = open_source("w", tmp_path, text_field="body.txt", ids_field=None)
    assert src.shards[0].tokens == sum(len(d.encode()) for d in docs) + 9


def test_json_metadata_is_not_mistaken_for_ids(tmp_path):
    docs = make_docs(4)
    write_wds_source(tmp_path, docs, shards=1, extra={"json": [{"url": f"u{i}"} for i in range(4)]})
    src = open_source("w", tmp_path, extra_fields=["json"])
    assert src.columns.ids is None
    assert src.read_shard(0).extra["json"][2] == {"url": "u2"}


def test_member_missing_in_one_sample(tmp_path):
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k0.txt", b"x"), ("k0.npy", b""), ("k1.npy", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SourceError, match=r"'txt' is present in only 1 of 2 samples"):
        open_source("w", tmp_path, ids_field=None)


def _corrupt_cases(path):
    members = tarfile.open(path).getmembers()
    return {
        "truncated": lambda: truncate(path, 0.5),
        "truncated-at-member": lambda: truncate(path, members[6].offset),
        "header-overwritten": lambda: overwrite(path, members[6].offset + 100, b"garbage!"),
        "empty": lambda: truncate(path, 0),
    }


@pytest.mark.parametrize("case", ["truncated", "truncated-at-member", "header-overwritten", "empty"])
def test_corrupt_tar_raises_naming_the_file(tmp_path, case):
    paths = write_wds_source(tmp_path, make_docs(20), shards=2, ids_member="npy")
    _corrupt_cases(paths[1])[case]()
    with pytest.raises(SourceError, match=rf"shard {paths[1]} of source 'w' is corrupt.*on_corrupt='skip'"):
        open_source("w", tmp_path)


def test_corrupt_tar_skipped(tmp_path, caplog):
    paths = write_wds_source(tmp_path, make_docs(20), shards=2)
    _corrupt_cases(paths[0])["header-overwritten"]()
    src = open_source("w", tmp_path, on_corrupt="skip")
    assert [s.path for s in src.shards] == [str(paths[1])]
    assert src.skipped[0][0] == str(paths[0]) and "bad header checksum" in src.skipped[0][1]
    assert "skipping unreadable shard" in caplog.text


def test_invalid_utf8_text_is_corrupt(tmp_path):
    write_wds_source(tmp_path, ["a", "b"], shards=1, text_member=None, extra={"txt": [b"ok", b"\xff\xfe"]})
    with pytest.raises(SourceError, match="UnicodeDecodeError"):
        open_source("w", tmp_path)


def test_npy_object_array_is_never_unpickled(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    write_wds_source(tmp_path, ["a"], shards=1, extra={"npy": [buf.getvalue()]})
    with pytest.raises(SourceError, match="allow_pickle"):
        open_source("w", tmp_path)


@pytest.mark.parametrize("suffix", ["pkl", "pickle", "meta.pyd"])
def test_pickled_member_refused_unless_allowed(tmp_path, suffix):
    import pickle

    write_wds_source(tmp_path, ["a", "b"], shards=1, extra={suffix: [pickle.dumps(1), pickle.dumps(2)]})
    with pytest.raises(UnsafeInputError, match=rf"'{suffix}'.*allow_unsafe=True"):
        open_source("w", tmp_path)
    src = open_source("w", tmp_path, allow_unsafe=True, extra_fields=[suffix])
    assert src.read_shard(0).extra[suffix] == [1, 2]


def test_pipe_url_refused_then_allowed(tmp_path):
    docs = make_docs(5)
    (path,) = write_wds_source(tmp_path, docs, shards=1)
    url = f"pipe:cat {path}"
    with pytest.raises(UnsafeInputError, match="pipe:.*allow_unsafe=True"):
        open_source("w", url)
    src = open_source("w", [url], allow_unsafe=True)
    assert src.shards[0].path == url and src.shards[0].bytes == os.path.getsize(path)
    assert read_all(src)[0] == docs
