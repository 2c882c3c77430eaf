"""open_source: spec resolution, format detection, bad input, safety, fingerprint, pickling."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shardgen import (
    make_docs,
    overwrite,
    read_all,
    truncate,
    write_hf_source,
    write_parquet_source,
    write_wds_source,
)

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.sources import ShardedSource, Source, open_source

# --- spec resolution and detection ---------------------------------------------------------------


def test_directory_glob_and_list_give_the_same_sorted_shards(tmp_path):
    paths = write_parquet_source(tmp_path, make_docs(12), shards=3)
    by_dir = open_source("s", tmp_path)
    by_glob = open_source("s", str(tmp_path / "*.parquet"))
    by_list = open_source("s", [str(p) for p in reversed(paths)])
    assert [s.path for s in by_dir.shards] == [str(p) for p in paths]
    assert by_dir.shards == by_glob.shards == by_list.shards
    assert isinstance(by_dir, Source)


def test_nested_directories_and_file_url(tmp_path):
    write_parquet_source(tmp_path / "a", make_docs(4), shards=1)
    write_parquet_source(tmp_path / "b" / "c", make_docs(4, seed=1), shards=1)
    assert len(open_source("s", tmp_path).shards) == 2
    assert len(open_source("s", f"file://{tmp_path}/a").shards) == 1


def test_explicit_format_for_unusual_names(tmp_path):
    (path,) = write_parquet_source(tmp_path, ["a", "b"], shards=1)
    odd = tmp_path / "data.pq"
    os.rename(path, odd)
    with pytest.raises(SourceError, match=r"cannot tell the format of .*data\.pq.*format="):
        open_source("s", odd)
    assert read_all(open_source("s", odd, format="parquet"))[0] == ["a", "b"]


def test_detects_each_format(tmp_path):
    write_parquet_source(tmp_path / "p", ["a"], shards=1)
    write_wds_source(tmp_path / "w", ["a"], shards=1)
    write_hf_source(tmp_path / "h", ["a"], shards=1)
    assert [open_source("s", tmp_path / d).format for d in "pwh"] == ["parquet", "webdataset", "hf"]


# --- bad input -----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(SourceError, match=r"path '.*nope' does not exist"):
        open_source("s", tmp_path / "nope")


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(SourceError, match=r"glob '.*\*\.parquet' matches no files"):
        open_source("s", str(tmp_path / "*.parquet"))


def test_directory_without_shards(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(SourceError, match="holds no shards"):
        open_source("s", tmp_path)


def test_empty_spec_and_unknown_format_and_bad_policy(tmp_path):
    with pytest.raises(SourceError, match="empty list"):
        open_source("s", [])
    with pytest.raises(SourceError, match="unknown format 'csv'"):
        open_source("s", tmp_path, format="csv")
    with pytest.raises(SourceError, match="on_corrupt='ignore'"):
        open_source("s", tmp_path, on_corrupt="ignore")


def test_mixed_formats(tmp_path):
    write_parquet_source(tmp_path, ["a"], shards=1)
    write_wds_source(tmp_path, ["a"], shards=1)
    with pytest.raises(SourceError, match="mixes formats: parquet .*webdataset"):
        open_source("s", tmp_path)


def test_empty_source_all_shards_zero_rows(tmp_path):
    write_parquet_source(tmp_path, [], shards=2)
    with pytest.raises(SourceError, match=r"source 's' is empty: its 2 shards hold zero rows"):
        open_source("s", tmp_path)


def test_zero_row_shard_among_others_is_kept(tmp_path):
    write_parquet_source(tmp_path, ["a"], shards=2)
    assert [s.rows for s in open_source("s", tmp_path).shards] == [0, 1]


def test_schema_mismatch_type(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [1]}), tmp_path / "b.parquet")
    with pytest.raises(
        SourceError, match=r"schema mismatch.*'text' is text in .*a\.parquet but int64 in .*b\.parquet"
    ):
        open_source("s", tmp_path)


def test_schema_mismatch_missing_column(tmp_path):
    write_parquet_source(tmp_path, make_docs(4), shards=1, ids_col="input_ids", prefix="a")
    write_parquet_source(tmp_path, make_docs(4), shards=1, prefix="b")
    with pytest.raises(
        SourceError, match=r"'input_ids' is ids in .*a-00000.parquet but missing in .*b-00000"
    ):
        open_source("s", tmp_path)


def test_wrong_type_everywhere(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(SourceError, match=r"'text' of source 's' has type int64.*text_field="):
        open_source("s", tmp_path)


def test_unknown_column_lists_existing_ones(tmp_path):
    write_parquet_source(tmp_path, ["a"], shards=1, text_col="content", extra={"url": ["u"]})
    with pytest.raises(SourceError, match=r"no text column 'body'.*columns present: \['content', 'url'\]"):
        open_source("s", tmp_path, text_field="body")
    with pytest.raises(SourceError, match=r"neither a text nor an ids column.*\['content', 'url'\]"):
        open_source("s", tmp_path)
    with pytest.raises(SourceError, match=r"no column 'lang'"):
        open_source("s", tmp_path, text_field="content", extra_fields=["lang"])


@pytest.mark.parametrize("damage", ["truncate", "magic", "page"])
def test_corrupt_parquet(tmp_path, damage, caplog):
    paths = write_parquet_source(tmp_path, make_docs(60), shards=3)
    bad = paths[1]
    {
        "truncate": lambda: truncate(bad, 0.5),
        "magic": lambda: overwrite(bad, -4, b"XXXX"),
        "page": lambda: overwrite(bad, 100, b"\xff" * 16),
    }[damage]()
    with pytest.raises(
        SourceError, match=rf"shard {bad} of source 's' is corrupt or unreadable.*on_corrupt='skip'"
    ):
        open_source("s", tmp_path)
    src = open_source("s", tmp_path, on_corrupt="skip")
    assert [s.path for s in src.shards] == [str(paths[0]), str(paths[2])]
    assert [p for p, _ in src.skipped] == [str(bad)]
    assert str(bad) in caplog.text


def test_all_shards_corrupt_with_skip(tmp_path):
    for p in write_parquet_source(tmp_path, make_docs(4), shards=2):
        truncate(p, 10)
    with pytest.raises(SourceError, match="no readable shards: all 2 were skipped"):
        open_source("s", tmp_path, on_corrupt="skip")


def test_shard_changed_after_open(tmp_path):
    paths = write_parquet_source(tmp_path, make_docs(10), shards=2)
    src = open_source("s", tmp_path)
    truncate(paths[1], 0.5)
    with pytest.raises(SourceError, match=rf"shard {paths[1]} of source 's' changed since it was indexed"):
        src.read_shard(1)
    os.remove(paths[0])
    with pytest.raises(SourceError, match="cannot be read"):
        src.read_shard(0)


# --- safety --------------------------------------------------------------------------------------


def test_pipe_refused_without_opt_in():
    with pytest.raises(UnsafeInputError, match="allow_unsafe=True"):
        open_source("s", "pipe:cat x.tar")


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAXXX:hunter2secret@bucket/a.parquet",
        "https://host.invalid/a.tar?X-Amz-Credential=AKIAXXX&X-Amz-Signature=hunter2secret",
        "az://container/x.tar?sv=2020&sig=hunter2secret",
    ],
)
def test_credentials_inside_urls_refused_and_not_repeated(url):
    # URLs are data and need no opt-in (tests/test_remote_*.py read them for real); credentials in
    # them would be copied into states, manifests and logs, so they are refused, even with opt-in.
    with pytest.raises(UnsafeInputError, match="credentials") as info:
        open_source("s", url, allow_unsafe=True)
    assert "hunter2secret" not in str(info.value) and "AKIAXXX" not in str(info.value)


def test_pipe_only_for_webdataset():
    with pytest.raises(SourceError, match="only supported for webdataset"):
        open_source("s", "pipe:cat a", format="parquet", allow_unsafe=True)


# --- fingerprint and pickling --------------------------------------------------------------------

_FINGERPRINT = "import sys; from fastmix_data.sources import open_source; print(open_source('x', sys.argv[1]).fingerprint())"


def test_fingerprint_stable_across_processes_and_sensitive_to_changes(tmp_path):
    paths = write_parquet_source(tmp_path / "d", make_docs(10), shards=2)
    here = open_source("s", tmp_path / "d").fingerprint()
    env = {**os.environ, "FASTMIX_DATA_CACHE": str(tmp_path / "other-cache")}
    out = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT, str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == here
    write_parquet_source(tmp_path / "d", make_docs(10, seed=5), shards=2)
    assert open_source("s", tmp_path / "d").fingerprint() != here
    assert open_source("s", paths[0]).fingerprint() != here


def test_pickle_round_trip_is_small(tmp_path):
    write_wds_source(tmp_path, make_docs(40), shards=4, ids_member="npy")
    src = open_source("w", tmp_path)
    blob = pickle.dumps(src)
    assert len(blob) < 3000
    clone = pickle.loads(blob)
    assert isinstance(clone, ShardedSource)
    assert clone.fingerprint() == src.fingerprint()
    assert read_all(clone) == read_all(src)
