"""Fuzz: source specs and reader options (`open_source`, `MixtureStream` sources and arguments).

Specs are drawn from real directories, globs and shard files of every format, their lists and
mixtures, paths that do not exist, URLs and ``pipe:`` commands, and values of the wrong type; the
options likewise. Each combination either opens a source whose shards read back with their indexed
row counts, or raises `SourceError` / `UnsafeInputError` / `ConfigError` (the project's own
classes) naming the source, the path or the option; never a bare exception from inside.
"""

from __future__ import annotations

import pytest
from fuzzkit import fuzz_settings, scalars
from hypothesis import given
from hypothesis import strategies as st
from shardgen import make_docs, write_hf_source, write_mds_source, write_parquet_source, write_wds_source

from fastmix_data import MixtureStream
from fastmix_data.errors import ConfigError, FastMixDataError, SourceError, UnsafeInputError, WeightsError
from fastmix_data.sources import open_source
from fastmix_data.sources.source import ShardedSource


@pytest.fixture(scope="module")
def tree(tmp_path_factory, streaming_module):
    root = tmp_path_factory.mktemp("specs")
    write_parquet_source(root / "pq", make_docs(12, seed=1), shards=2, ids_col="input_ids", extra={"id": list(range(12))})
    write_wds_source(root / "wds", make_docs(10, seed=2), shards=2, ids_member="input_ids.npy")
    write_mds_source(root / "mds", make_docs(8, seed=3), shards=2)
    write_hf_source(root / "hf", make_docs(9, seed=4), shards=2)
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a shard")
    (root / "mixed").mkdir()
    write_parquet_source(root / "mixed", make_docs(4), shards=1)
    write_wds_source(root / "mixed", make_docs(4), shards=1)
    return root


def _specs(root):
    real = [
        str(root / "pq"), str(root / "pq" / "*.parquet"), str(root / "pq" / "part-00000.parquet"),
        str(root / "wds"), str(root / "wds" / "*.tar"), str(root / "mds"), str(root / "hf"),
        str(root / "hf" / "*.arrow"), f"file://{root / 'pq'}", str(root / "**" / "*.parquet"),
        str(root / "empty"), str(root / "notes.txt"), str(root / "mixed"), str(root / "missing"),
        str(root / "nothing-*.tar"), "pipe:cat /dev/null", "http://example.com/x.tar", "s3://b/k.parquet", "",
        root / "pq", "~/definitely-not-here",
    ]  # fmt: skip
    return st.one_of(
        st.sampled_from(real),
        st.lists(st.sampled_from(real), max_size=3),
        st.text(max_size=8),
        scalars(),
        st.dictionaries(st.text(max_size=3), st.sampled_from(real), max_size=2),
    )


OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from([None, "parquet", "webdataset", "mds", "hf", "csv", 3, ""]),
        "text_field": st.sampled_from(["text", None, "txt", "body", "", 5, "TEXT", "input_ids"]),
        "ids_field": st.sampled_from(["input_ids", None, "ids", "", 7, "text", "input_ids.npy"]),
        "extra_fields": st.sampled_from([(), ["id"], "id", [1], ["missing"], [""], None]),
        "on_corrupt": st.sampled_from(["raise", "skip", "ignore", None, 1]),
        "allow_unsafe": st.sampled_from([False, True, "yes", None]),
    },
)
ERRORS = (SourceError, UnsafeInputError)


@fuzz_settings(150)
@given(data=st.data())
def test_open_source_opens_or_names_the_problem(tree, tmp_path_factory, data):
    spec = data.draw(_specs(tree))
    options = data.draw(OPTIONS)
    try:
        src = open_source("fz", spec, **options)
    except ERRORS as exc:
        msg = str(exc)
        assert msg and ("'fz'" in msg or "/" in msg or "spec" in msg or "format" in msg or "URL" in msg
                        or "pipe" in msg or "on_corrupt" in msg), msg  # fmt: skip
        return
    assert isinstance(src, ShardedSource) and src.shards
    for i in range(min(2, len(src.shards))):
        assert src.read_shard(i).rows == src.shards[i].rows


STREAM_ARGS = st.fixed_dictionaries(
    {},
    optional={
        "batch_size": st.sampled_from([1, 4, 0, -1, 2.5, "4", True, None]),
        "seed": st.sampled_from([0, 7, -1, 2**40, 1.5, "0", None]),
        "seq_len": st.sampled_from([None, 8, 0, -3, 8.0, "8"]),
        "weight_units": st.sampled_from(["samples", "tokens", "bytes", None]),
        "exhaustion": st.sampled_from([None, {"a": "drop"}, {"a": "never"}, {"zz": "drop"}, {"a": {"policy": "cap", "max_epochs": 0}},
                                       {"a": {"policy": "cap", "max_epochs": "2"}}, {"a": 3}, "drop"]),  # fmt: skip
        "max_items": st.sampled_from([None, 100, 0, -5, 10.5]),
        "cache_shards": st.sampled_from([2, 0, -1, "2"]),
        "block_batches": st.sampled_from([None, 1, 0, 3.0]),
        "rank": st.sampled_from([None, 0, 1, -1]),
        "world_size": st.sampled_from([None, 1, 2, 0]),
        "text_fieldx": st.just("oops"),
    },
)


@fuzz_settings(80)
@given(data=st.data())
def test_stream_arguments_and_dict_specs_work_or_name_the_problem(tree, data):
    a_spec = data.draw(st.sampled_from([
        str(tree / "pq"), {"path": str(tree / "pq"), "text_field": "text"}, {"path": str(tree / "wds")},
        {"text_field": "text"}, {"path": str(tree / "pq"), "colour": "red"}, {"path": str(tree / "hf"), "format": "hf"},
    ]))  # fmt: skip
    args = data.draw(STREAM_ARGS)
    try:
        stream = MixtureStream({"a": a_spec, "b": str(tree / "mds")}, {"a": 1, "b": 1}, **{"batch_size": 2, **args})
    except (ConfigError, SourceError, WeightsError) as exc:
        assert isinstance(exc, FastMixDataError)
        named = [k for k in (*args, "path", "colour", "exhaustion", "policy", "max_epochs", "rank", "source") if k in str(exc)]
        assert named, str(exc)
        return
    batch = next(iter(stream))
    assert len(batch["source"]) == stream.batch_size
    stream.close()
