"""Tests for fastmix_data.corpus: the stdlib-derived multi-domain corpus and planted targets."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fastmix_data.corpus import (
    DOMAINS,
    MAX_DOC_BYTES,
    SPLITS,
    CorpusRoots,
    CorpusWarning,
    build_corpus,
    build_planted_target,
    largest_remainder_counts,
    read_split_texts,
    split_document,
)
from fastmix_data.errors import WeightsError

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(max_docs_per_domain=60, max_bytes_per_domain=80_000, docs_per_shard=8, progress=False)
FRACTIONS = (0.7, 0.15, 0.15)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    manifest = build_corpus(out, seed=0, split_fractions=FRACTIONS, **SMALL)
    return out, manifest


def test_domains_present_and_non_empty(corpus):
    out, manifest = corpus
    assert set(manifest["domains"]) | set(manifest["skipped_domains"]) == set(DOMAINS)
    assert {"code", "docstrings", "prose", "markup"} <= set(manifest["domains"])
    assert json.loads((out / "corpus.json").read_text()) == manifest
    assert manifest["python"]["version"] and manifest["seed"] == 0
    for domain, info in manifest["domains"].items():
        assert 3 <= info["docs"] <= SMALL["max_docs_per_domain"]
        assert info["bytes"] <= SMALL["max_bytes_per_domain"]
        for split in SPLITS:
            entry = info["splits"][split]
            assert entry["docs"] > 0, (domain, split)
            assert entry["parquet"], (domain, split)
            texts = read_split_texts(out, split, domain)
            assert len(texts) == entry["docs"]
            assert sum(len(t.encode("utf-8")) for t in texts) == entry["bytes"]
            assert all(0 < len(t.encode("utf-8")) <= MAX_DOC_BYTES and t.strip() for t in texts)
        assert sum(info["splits"][s]["docs"] for s in SPLITS) == info["docs"]
        assert len(info["splits"]["train"]["parquet"]) >= 2  # several shards per domain


def test_parquet_schema_and_layout(corpus):
    out, manifest = corpus
    for domain, info in manifest["domains"].items():
        for split in SPLITS:
            for i, rel in enumerate(info["splits"][split]["parquet"]):
                assert rel == f"{split}/{domain}/part-{i:05d}.parquet"
                table = pq.read_table(out / rel)
                assert table.schema.names == ["text", "domain"]
                assert table.schema.field("text").type == pa.string()
                assert table.schema.field("domain").type == pa.string()
                assert set(table.column("domain").to_pylist()) == {domain}
                assert 0 < table.num_rows <= SMALL["docs_per_shard"]
    assert not list(out.rglob("*.tmp-*"))


def test_splits_disjoint_and_docs_unique(corpus):
    out, manifest = corpus
    seen: dict[str, tuple[str, str]] = {}
    for domain in manifest["domains"]:
        for split in SPLITS:
            for text in read_split_texts(out, split, domain):
                assert text not in seen, (domain, split, seen.get(text))
                seen[text] = (domain, split)


def test_webdataset_matches_parquet_train(corpus):
    import webdataset as wds

    out, manifest = corpus
    for domain, info in manifest["domains"].items():
        tars = info["splits"]["train"]["webdataset"]
        assert tars == [f"train_wds/{domain}/shard-{i:05d}.tar" for i in range(len(tars))]
        assert len(tars) == len(info["splits"]["train"]["parquet"])
        samples = list(wds.WebDataset([str(out / t) for t in tars], shardshuffle=False))
        texts = [s["txt"].decode("utf-8") for s in samples]
        assert texts == read_split_texts(out, "train", domain)
        assert [s["__key__"] for s in samples] == [f"{domain}-{i:08d}" for i in range(len(texts))]


def test_deterministic_byte_identical(corpus, tmp_path):
    out, manifest = corpus
    again = build_corpus(tmp_path / "again", seed=0, split_fractions=FRACTIONS, **SMALL)
    assert again == manifest
    assert _tree_digest(tmp_path / "again") == _tree_digest(out)
    other = build_corpus(tmp_path / "other", seed=1, split_fractions=FRACTIONS, domains=["docstrings"], **SMALL)
    assert other["domains"]["docstrings"]["splits"]["train"]["text_sha256"] != (
        manifest["domains"]["docstrings"]["splits"]["train"]["text_sha256"]
    )


def test_rebuild_removes_stale_shards(tmp_path):
    out = tmp_path / "c"
    build_corpus(out, domains=["prose", "code"], **{**SMALL, "docs_per_shard": 4})
    m = build_corpus(out, domains=["prose"], formats=("parquet",), **SMALL)
    assert set(m["domains"]) == {"prose"}
    assert not (out / "train" / "code").exists() and not (out / "train_wds").exists()
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    listed = {"corpus.json"} | {r for s in SPLITS for r in m["domains"]["prose"]["splits"][s]["parquet"]}
    assert files == listed


def test_planted_target_exact_proportions(corpus, tmp_path):
    out, manifest = corpus
    doms = ["code", "docstrings", "prose"]
    smallest = min(manifest["domains"][d]["splits"]["validation"]["docs"] for d in doms)
    n_docs = 2 * smallest  # counts n/2, n/4, n/4: each fits its validation split
    props = {"code": 0.5, "docstrings": 0.25, "prose": 0.25}
    side = build_planted_target(tmp_path / "t", out, props, n_docs, seed=3)
    assert side["counts"] == largest_remainder_counts(props, n_docs)
    assert sum(side["counts"].values()) == n_docs
    assert side["repeated_docs"] == {d: 0 for d in doms}
    assert json.loads((tmp_path / "t" / "target.json").read_text()) == side
    table = pq.read_table(tmp_path / "t" / "part-00000.parquet")
    assert table.schema.names == ["text", "domain"] and table.num_rows == n_docs
    rows = table.to_pylist()
    for d in doms:
        got = [r["text"] for r in rows if r["domain"] == d]
        assert len(got) == side["counts"][d]
        assert len(set(got)) == len(got)
        assert set(got) <= set(read_split_texts(out, "validation", d))
    if n_docs % 4 == 0:
        assert side["realized_proportions"] == props
    # deterministic; the seed changes the draw
    again = build_planted_target(tmp_path / "t2", out, props, n_docs, seed=3)
    assert again == side
    assert (tmp_path / "t2" / "part-00000.parquet").read_bytes() == (
        tmp_path / "t" / "part-00000.parquet"
    ).read_bytes()


def test_planted_target_repeats_and_errors(corpus, tmp_path):
    out, manifest = corpus
    n_val = manifest["domains"]["prose"]["splits"]["validation"]["docs"]
    with pytest.warns(CorpusWarning, match="repeated"):
        side = build_planted_target(tmp_path / "r", out, {"prose": 1.0}, n_val + 5, split="validation")
    assert side["counts"] == {"prose": n_val + 5} and side["repeated_docs"] == {"prose": 5}
    with pytest.raises(WeightsError, match="allow_repeats"):
        build_planted_target(tmp_path / "r", out, {"prose": 1.0}, n_val + 5, allow_repeats=False)
    with pytest.raises(WeightsError, match="unknown"):
        build_planted_target(tmp_path / "r", out, {"nope": 1.0}, 4)
    with pytest.raises(WeightsError):
        build_planted_target(tmp_path / "r", out, {"prose": float("nan")}, 4)
    side = build_planted_target(tmp_path / "s", out, {"prose": 1, "code": 0}, 2, split="test")
    assert side["counts"] == {"code": 0, "prose": 2}


def test_largest_remainder_counts():
    assert largest_remainder_counts({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    assert largest_remainder_counts({"a": 0.29, "b": 0.71}, 100) == {"a": 29, "b": 71}
    assert largest_remainder_counts({"a": 0.1, "b": 0.2, "c": 0.7}, 10) == {"a": 1, "b": 2, "c": 7}
    assert largest_remainder_counts({"a": 2, "b": 6}, 4) == {"a": 1, "b": 3}  # normalised
    assert largest_remainder_counts({"x": 0.5, "y": 0.5}, 3) == {"x": 2, "y": 1}  # tie: name order
    with pytest.raises(WeightsError):
        largest_remainder_counts({"a": 0.0}, 3)
    with pytest.raises(WeightsError):
        largest_remainder_counts({"a": -1.0, "b": 2.0}, 3)


def test_split_document():
    text = "".join(f"line {i:04d} " + "x" * 50 + "\n" for i in range(300))
    docs = split_document(text, max_bytes=1000)
    assert "".join(docs) == text
    assert all(len(d.encode()) <= 1000 and d.endswith("\n") for d in docs)
    long_line = "é" * 3000  # 6000 bytes, one line: cut at character boundaries
    pieces = split_document(long_line, max_bytes=1001)
    assert "".join(pieces) == long_line and all(len(p.encode()) <= 1001 for p in pieces)
    assert split_document("\n\n   \n") == []
    assert split_document("a\r\nb\rc" + "z" * 20) == ["a\nb\nc" + "z" * 20]
    assert split_document("bad \udc80 surrogate here!") == ["bad ? surrogate here!"]


def _fake_python(root: Path, *, with_test_pkg: bool, with_test_files: bool) -> CorpusRoots:
    stdlib = root / "lib"
    body = "".join(
        f'def f{i}(x):\n    """Return x plus {i}, a function used to pad the fake module."""\n'
        f"    # add {i}\n    return x + {i}\n\n"
        for i in range(120)
    )
    for i in range(12):
        (stdlib / f"pkg{i}").mkdir(parents=True)
        (stdlib / f"pkg{i}" / "__init__.py").write_text(f'"""Package {i} of the fake standard library."""\n' + body)
        (stdlib / f"pkg{i}" / f"data{i}.json").write_text(json.dumps({"k": list(range(400)), "i": i}, indent=1))
        if with_test_files:
            (stdlib / f"pkg{i}" / f"test_mod{i}.py").write_text("import unittest\n" + body)
    if with_test_pkg:
        (stdlib / "test").mkdir()
        (stdlib / "test" / "test_a.py").write_text("import unittest\n" + body)
    (stdlib / "pydoc_data").mkdir()
    topics = {f"topic{i}": f"Topic {i}\n*******\n\n" + "Some English prose about things.\n" * 60 for i in range(5)}
    (stdlib / "pydoc_data" / "topics.py").write_text(f"topics = {topics!r}\n")
    (stdlib / "LICENSE.txt").write_text("A licence text that is long enough to be a document.\n" * 10)
    return CorpusRoots(stdlib=stdlib, base_prefix=root)


def test_tests_domain_fallback_and_skip(tmp_path):
    roots = _fake_python(tmp_path / "py1", with_test_pkg=False, with_test_files=True)
    m = build_corpus(tmp_path / "o1", roots=roots, **SMALL)
    assert set(m["domains"]) == set(DOMAINS) and not m["skipped_domains"]
    assert "test_*.py" in m["domains"]["tests"]["source"]
    code = read_split_texts(tmp_path / "o1", "train", "code")
    assert not any(t.startswith("import unittest") for t in code)  # tests never leak into code

    roots = _fake_python(tmp_path / "py2", with_test_pkg=False, with_test_files=False)
    with pytest.warns(CorpusWarning, match="'tests' skipped"):
        m = build_corpus(tmp_path / "o2", roots=roots, **SMALL)
    assert "tests" in m["skipped_domains"] and "tests" not in m["domains"]
    assert not (tmp_path / "o2" / "train" / "tests").exists()

    roots = _fake_python(tmp_path / "py3", with_test_pkg=True, with_test_files=True)
    m = build_corpus(tmp_path / "o3", roots=roots, **SMALL)
    assert "test/ package" in m["domains"]["tests"]["source"]


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        build_corpus(tmp_path, domains=["code", "nope"], progress=False)
    with pytest.raises(ValueError, match="formats"):
        build_corpus(tmp_path, formats=("mds",), progress=False)
    with pytest.raises(ValueError, match="split_fractions"):
        build_corpus(tmp_path, split_fractions=(0.5, 0.5, 0.5), progress=False)
    with pytest.raises(ValueError, match="docs_per_shard"):
        build_corpus(tmp_path, docs_per_shard=0, progress=False)


def test_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("build_corpus_cli", REPO / "tools" / "build_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main([
        "--out", str(tmp_path / "c"), "--max-docs-per-domain", "40", "--max-bytes-per-domain", "50000",
        "--docs-per-shard", "16", "--domains", "prose,docstrings", "--formats", "parquet",
        "--split", "0.6,0.2,0.2", "--no-progress",
        "--planted", str(tmp_path / "p"), "--proportions", "prose=0.5,docstrings=0.5", "--planted-docs", "6",
    ])
    assert rc == 0
    assert "corpus.json" in capsys.readouterr().out
    side = json.loads((tmp_path / "p" / "target.json").read_text())
    assert side["counts"] == {"docstrings": 3, "prose": 3}
    assert not (tmp_path / "c" / "train_wds").exists()
