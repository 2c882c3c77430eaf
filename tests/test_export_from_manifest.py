"""A MixtureStream built from a manifest serves exactly the manifest; manifests of live streams."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data.errors import ManifestError
from fastmix_data.export import build_manifest, manifest_from_stream, stream_from_manifest, write_manifest
from fastmix_data.stream.mixture import MixtureStream


@pytest.fixture
def corpus(tmp_path):
    write_parquet_source(tmp_path / "code", make_docs(120, prefix="code"), shards=3)
    write_wds_source(tmp_path / "web", make_docs(80, prefix="web", seed=1), shards=2)
    return tmp_path


def _sources(root):
    return {"code": str(root / "code"), "web": str(root / "web")}


def _served(stream):
    counts = Counter()
    texts = []
    for batch in stream:
        for src, shard in zip(batch["source"].tolist(), batch["shard"].tolist()):
            counts[(src, shard)] += 1
        texts += batch.get("text", [])
    return counts, texts


def _manifest_counts(m):
    return Counter(
        {
            (k, j): sh["take"]
            for k, s in enumerate(m["sources"])
            for j, sh in enumerate(s["shards"])
            if sh["take"]
        }
    )


def test_stream_serves_the_manifests_per_shard_counts(corpus, tmp_path):
    history = [{"position": 160, "weights": {"code": 0.8, "web": 0.2}}]
    m = build_manifest(_sources(corpus), {"code": 0.3, "web": 0.7}, 480, root=corpus, seed=7, history=history)
    path = tmp_path / "m.json"
    write_manifest(m, path)
    stream = stream_from_manifest(path, batch_size=16)
    counts, _ = _served(stream)
    assert counts == _manifest_counts(m)
    assert sum(counts.values()) == 480


def test_packing_mode_and_two_ranks(corpus):
    m = build_manifest(_sources(corpus), {"code": 1, "web": 1}, "8k_tokens", root=corpus, seq_len=31)
    n = m["budget"]["items"]
    assert n == 250
    m = build_manifest(_sources(corpus), {"code": 1, "web": 1}, 256, root=corpus, seq_len=31)
    total = Counter()
    for rank in range(2):
        counts, _ = _served(stream_from_manifest(m, batch_size=8, rank=rank, world_size=2))
        total += counts
    assert total == _manifest_counts(m)


def test_stream_matches_an_equivalent_live_stream(corpus):
    live = MixtureStream(_sources(corpus), {"code": 0.4, "web": 0.6}, batch_size=10, seed=3, max_items=200)
    m = build_manifest(_sources(corpus), {"code": 0.4, "web": 0.6}, 200, root=corpus, seed=3)
    assert manifest_from_stream(live, 20, root=str(corpus))["fingerprint"] == m["fingerprint"]
    _, live_texts = _served(live)
    _, texts = _served(stream_from_manifest(m, batch_size=10))
    assert texts == live_texts and len(texts) == 200


def test_manifest_from_a_stream_that_changed_weights(corpus):
    live = MixtureStream(_sources(corpus), {"code": 0.5, "web": 0.5}, batch_size=8, seed=2)
    it = iter(live)
    first = [next(it) for _ in range(5)]
    live.set_weights({"code": 0.9, "web": 0.1})
    rest = [next(it) for _ in range(15)]
    served = first + rest
    m = manifest_from_stream(live, 20)
    assert m["budget"]["items"] == 160 and len(m["history"]) == 2
    assert m["budget"]["served"] == {"batches": 20, "batch_size": 8, "world_size": 1}
    counts = Counter()
    for b in served:
        counts.update(zip(b["source"].tolist(), b["shard"].tolist()))
    assert counts == _manifest_counts(m)
    replay = list(stream_from_manifest(m, batch_size=8))
    assert [b["text"] for b in replay] == [b["text"] for b in served]
    assert [b["weight_version"] for b in replay] == [b["weight_version"] for b in served]


def test_moved_dataset_with_root_override(corpus, tmp_path_factory):
    m = build_manifest(_sources(corpus), [1, 1], 40, root=corpus)
    moved = tmp_path_factory.mktemp("moved") / "data"
    shutil.copytree(corpus, moved)
    with pytest.raises(ManifestError):
        shutil.rmtree(corpus / "web")
        stream_from_manifest(m, batch_size=8)
    _, texts = _served(stream_from_manifest(m, batch_size=8, root=str(moved)))
    assert len(texts) == 40


def test_plan_overrides_and_wrong_tokenizer_are_refused(corpus):
    m = build_manifest(_sources(corpus), [1, 1], 64, root=corpus, seq_len=15)
    with pytest.raises(ManifestError, match=r"cannot override \['seed'\]"):
        stream_from_manifest(m, batch_size=8, seed=1)
    with pytest.raises(ManifestError, match="packed with tokenizer 'bytes-v1'"):
        stream_from_manifest(m, batch_size=8, tokenizer=lambda s: [1, 2, 3], eos_id=0)


def test_unsafe_stays_off(corpus):
    m = build_manifest(_sources(corpus), [1, 1], 16, root=corpus)
    stream = stream_from_manifest(m, batch_size=8)
    assert all(not getattr(s.reader, "allow_unsafe", False) for s in stream.sources)
    assert np.isclose(sum(m["weights"]["realised_items"].values()), 1.0)
