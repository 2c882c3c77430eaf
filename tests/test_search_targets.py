"""One target type for every method: packed like the stream, sampled uniformly and seeded across all
target files and documents (a target stored as one file per domain gives each domain its share)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from search_corpus import sources, tiny_config, validation, write_tiny_corpus
from shardgen import write_wds_source

from fastmix_data.search import load_target, run_method
from fastmix_data.search.config import TrainConfig
from fastmix_data.search.proxy.trainer import make_stream
from fastmix_data.search.targets import TargetBatches, TargetSet, pack_texts, target_from_texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))


def _domain_files(root, sizes: dict[str, int], with_column: bool = True):
    """One Parquet file per domain (sorted names put 'a' first): domain d's documents are its letter
    repeated, so a sequence's domain can be read off its bytes."""
    root.mkdir(parents=True, exist_ok=True)
    for d, n in sizes.items():
        texts = [d * 90 for _ in range(n)]
        cols = {"text": texts, "domain": [d] * n} if with_column else {"text": texts}
        pq.write_table(pa.table(cols), root / f"{d}.parquet")
    return root


def _letter_shares(t: TargetSet) -> dict[str, float]:
    first = t.tokens[:, 0].tolist()
    letters = [chr(x) if x < 256 else "eos" for x in first]
    return {c: letters.count(c) / len(letters) for c in set(letters)}


@pytest.mark.parametrize("with_column", [True, False])
def test_a_target_stored_as_one_file_per_domain_gives_each_domain_its_share(tmp_path, with_column):
    sizes = {"a": 400, "b": 200, "c": 200}  # token shares 0.5 / 0.25 / 0.25
    root = _domain_files(tmp_path / "t", sizes, with_column)
    t = load_target(str(root), seq_len=44, max_seqs=120, seed=0)  # 120 of ~1,600 sequences
    assert len(t) == 120
    shares = t.shares() if with_column else _letter_shares(t)
    for d, want in {"a": 0.5, "b": 0.25, "c": 0.25}.items():
        assert abs(shares.get(d, 0.0) - want) < 0.1, shares
    if with_column:
        assert t.group_names == ["a", "b", "c"] and t.average == "tokens"
        assert t.full_shares["a"] == pytest.approx(0.5, abs=0.1)
    # averaged over seeds the sample is unbiased
    mean_a = np.mean([load_target(str(root), 44, max_seqs=60, seed=s).shares()["a"] if with_column else
                      _letter_shares(load_target(str(root), 44, max_seqs=60, seed=s)).get("a", 0.0)
                      for s in range(8)])
    assert abs(mean_a - 0.5) < 0.05


def test_a_few_long_documents_keep_their_token_share(tmp_path):
    """A planted-style target of few documents with unequal lengths: domain "a" is 4 long documents
    holding half the tokens, "b" 96 short ones. Sampling just enough documents for ``max_seqs``
    sequences (about 10 of 100) gave "a" anywhere from 0 to most of the set; the sample must read
    enough documents (here all) that every seed keeps both shares."""
    root = tmp_path / "t"
    root.mkdir()
    pq.write_table(pa.table({"text": ["a" * 2400] * 4, "domain": ["a"] * 4}), root / "a.parquet")
    pq.write_table(pa.table({"text": ["b" * 99] * 96, "domain": ["b"] * 96}), root / "b.parquet")
    for seed in range(6):
        t = load_target(str(root), seq_len=63, max_seqs=40, seed=seed)  # 40 of ~300 sequences
        assert len(t) == 40
        assert abs(t.shares()["a"] - 0.5) < 0.2, (seed, t.shares())
        assert t.full_shares["a"] == pytest.approx(0.5, abs=0.02), (seed, t.full_shares)


def test_documents_to_read_keeps_enough_documents():
    from fastmix_data.search.targets import MIN_DOCS, MIN_DOCS_MAX_FACTOR, OVERSAMPLE, documents_to_read

    assert documents_to_read(100, 10_000, None) == 100  # no cap: everything
    assert documents_to_read(100, 10_000, 9_000) == 100  # the source is smaller than the need
    # a million documents of 1,000 tokens, 100,000 tokens needed: 130 by tokens, raised to MIN_DOCS
    assert documents_to_read(10**6, 10**9, 10**5) == max(MIN_DOCS, 130) == MIN_DOCS
    # very long documents: at most MIN_DOCS_MAX_FACTOR times what the tokens need
    n = documents_to_read(10**6, 10**11, 10**5)
    assert n == MIN_DOCS_MAX_FACTOR * 2 and OVERSAMPLE * 10**5 / 10**5 <= n


def test_the_sample_is_seeded_and_reads_across_formats(tmp_path):
    root = _domain_files(tmp_path / "t", {"a": 100, "b": 100})
    one = load_target(str(root), 44, max_seqs=30, seed=1)
    assert one.fingerprint() == load_target(str(root), 44, max_seqs=30, seed=1).fingerprint()
    assert one.fingerprint() != load_target(str(root), 44, max_seqs=30, seed=2).fingerprint()
    write_wds_source(tmp_path / "w", ["x" * 80] * 50 + ["y" * 80] * 50, shards=2)
    w = load_target(str(tmp_path / "w" / "*.tar"), 40, max_seqs=40, seed=0)
    assert len(w) == 40 and 0.2 < _letter_shares(w).get("x", 0) < 0.8  # both shards of the glob are read


def test_group_averaged_targets_and_errors(corpus):
    t = load_target(validation(corpus), 32, max_seqs=30)
    assert t.average == "groups" and len(t) <= 30 and t.group_names == ["code", "prose", "markup"]
    assert t.group_weights().tolist() == pytest.approx([1 / 3] * 3)
    for b in t.batches(6):  # every target batch holds the groups in equal numbers
        assert np.bincount(b["tokens"][:, 0].numpy() % 3).max() <= 6
    with pytest.raises(ValueError, match="no complete sequence"):
        target_from_texts({"a": ["tiny"]}, 64)
    with pytest.raises(ValueError, match="no sequence"):
        TargetSet(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long), ["a"])


def test_question_answer_targets_score_the_answer_only(tmp_path):
    (tmp_path / "qa").mkdir()
    pq.write_table(pa.table({"question": ["what is two?", "and three?"], "answer": ["2", "3!"]}),
                   tmp_path / "qa" / "part.parquet")
    t = load_target(str(tmp_path / "qa"), 20, answer_field="answer", seed=0)
    assert len(t) == 2 and t.loss_mask is not None
    for n in range(2):
        ids = t.tokens[n].tolist()
        q_len = ids.index(ord("?")) + 1
        answer = "2" if bytes(ids[:q_len]) == b"what is two?" else "3!"
        # predictions of the answer bytes and of the end-of-document id after them, nothing else
        assert t.loss_mask[n].nonzero().flatten().tolist() == list(range(q_len - 1, q_len + len(answer)))
        assert bytes(ids[q_len : q_len + len(answer)]).decode() == answer and ids[q_len + len(answer)] == 256
    assert sorted(t.scored().tolist()) == [2.0, 3.0]


def test_pack_texts_matches_the_stream_packing(corpus):
    assert pack_texts(["ab", "cde"], seq_len=2).tolist() == [[97, 98, 256], [99, 100, 101]]
    cfg = TrainConfig(batch_size=4, seq_len=16)
    stream = make_stream({"code": sources(corpus)["code"]}, {"code": 1.0}, cfg, shuffle=False)
    batch = next(iter(stream))
    rows = pq.read_table(corpus / "train" / "code" / "part-00000.parquet").column("text").to_pylist()
    assert torch.equal(batch["tokens"], pack_texts(rows, 16)[:4])


def test_target_batches_rotate_through_fresh_orders_and_resume():
    t = target_from_texts({"a": ["x" * 100], "b": ["y" * 100]}, 9)
    rot = TargetBatches(t, 4, seed=3)
    first_pass = torch.cat([rot.next()["tokens"] for _ in range(5)])  # 20 sequences = one pass
    assert sorted(map(tuple, first_pass.tolist())) == sorted(map(tuple, t.tokens.tolist()))
    state = rot.state_dict()
    nxt = rot.next()["tokens"]
    assert state["epoch"] == 0 and rot.epoch == 1
    again = TargetBatches(t, 4, seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.next()["tokens"], nxt)


def test_every_method_reads_the_same_target(corpus, tmp_path):
    """The target every method optimises is the one load_target gives (same fingerprint)."""
    expected = load_target(str(corpus / "planted"), 32, max_seqs=24).fingerprint()
    seen = set()
    for m in ("fastmix", "mixmin", "aioli"):
        cfg = tiny_config(m, steps=24 if m == "aioli" else 8)
        r = run_method(cfg, sources=sources(corpus), target=str(corpus / "planted"))
        seen.add(r.details["target"]["fingerprint"])
    assert seen == {expected}
