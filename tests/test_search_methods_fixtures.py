"""A tiny three-domain Parquet corpus for the mixture-method tests (importable helpers), and tests of
the shared layer: target packing, target averaging, the static run and its cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from fastmix_data.search.train_static import (
    TargetSet,
    TrainConfig,
    as_target,
    evaluate,
    make_stream,
    pack_texts,
    target_from_texts,
    train_static,
)

DOMAINS = ("code", "prose", "markup")
WORDS = ["the", "data", "mixture", "model", "river", "stone", "light", "quiet", "garden", "paper"]


def _doc(domain: str, rng: np.random.Generator) -> str:
    n = int(rng.integers(4, 9))
    if domain == "code":
        return "".join(f"def f{rng.integers(100)}(x):\n    return x * {rng.integers(10)} + {rng.integers(10)}\n"
                       for _ in range(n))
    if domain == "prose":
        return " ".join(" ".join(rng.choice(WORDS, size=6)).capitalize() + "." for _ in range(n)) + "\n"
    return "".join(f'<item id="{rng.integers(1000)}"><v>{rng.integers(99)}</v></item>\n' for _ in range(n))


def write_tiny_corpus(root: Path, docs: int = 40, seed: int = 0) -> Path:
    """``root/{train,validation}/<domain>/part-00000.parquet`` (columns text, domain) and a
    ``root/planted/part-00000.parquet`` mixing the validation docs (code 60 %, prose 30 %, markup 10 %)."""
    rng = np.random.default_rng(seed)
    planted_texts, planted_dom = [], []
    for d in DOMAINS:
        for split, n in (("train", docs), ("validation", max(6, docs // 4))):
            texts = [_doc(d, rng) for _ in range(n)]
            out = root / split / d
            out.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": texts, "domain": [d] * n}), out / "part-00000.parquet")
            if split == "validation":
                k = {"code": 6, "prose": 3, "markup": 1}[d] * 2
                planted_texts += [texts[i % n] for i in range(k)]
                planted_dom += [d] * k
    (root / "planted").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": planted_texts, "domain": planted_dom}), root / "planted" / "part-00000.parquet")
    return root


def sources(root: Path) -> dict[str, str]:
    return {d: str(root / "train" / d) for d in DOMAINS}


def validation(root: Path) -> dict[str, str]:
    return {d: str(root / "validation" / d) for d in DOMAINS}


def tiny_train(**kw) -> dict:
    base = dict(model="tiny", batch_size=6, seq_len=32, max_tokens=6 * 32 * 12, warmup_steps=2, lr=3e-3)
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))


# ---------------------------------------------------------------------------------------- tests


def test_pack_texts_matches_byte_packing():
    t = pack_texts(["ab", "cde"], seq_len=2)
    # a b EOS c d e EOS -> sequences of 3 tokens, tail dropped
    assert t.tolist() == [[97, 98, 256], [99, 100, 101]]
    assert pack_texts([], seq_len=4).shape == (0, 5)


def test_pack_texts_with_user_tokenizers():
    """A tokenizer packs as in the stream: its ids, then its end-of-document id if it has one; a
    `tokenizers`-style encode returning an object with ``.ids`` works too."""

    class WithEos:
        eos_id = 9

        def encode(self, text):
            return [len(text), 1]

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    class NoEos:
        def encode(self, text):
            return Encoding([ord(c) - 96 for c in text])

    assert pack_texts(["ab", "cde"], seq_len=2, tokenizer=WithEos()).tolist() == [[2, 1, 9], [3, 1, 9]]
    assert pack_texts(["ab", "cdef"], seq_len=2, tokenizer=NoEos()).tolist() == [[1, 2, 3], [4, 5, 6]]


def test_pack_texts_matches_the_stream_packing(corpus):
    """A one-source, unshuffled stream packs the shard exactly as pack_texts packs its rows."""
    cfg = TrainConfig(model="tiny", batch_size=4, seq_len=16)
    stream = make_stream({"code": sources(corpus)["code"]}, {"code": 1.0}, cfg, shuffle=False)
    batch = next(iter(stream))
    rows = pq.read_table(corpus / "train" / "code" / "part-00000.parquet").column("text").to_pylist()
    assert torch.equal(batch["tokens"], pack_texts(rows, 16)[:4])


def test_target_averages_tokens_or_groups():
    short = ["x" * 40] * 1  # 41 tokens -> 2 sequences of 17 at seq_len 16
    long = ["y" * 200] * 1  # 201 tokens -> 11 sequences
    t = target_from_texts({"a": short, "b": long}, 16, average="tokens")
    assert t.counts().tolist() == [2, 11]
    losses = torch.cat([torch.full((2,), 1.0), torch.full((11,), 3.0)]).double()
    assert t.loss(losses) == pytest.approx((2 * 1 + 11 * 3) / 13)
    g = target_from_texts({"a": short, "b": long}, 16, average="groups")
    assert g.loss(losses) == pytest.approx(2.0)
    assert g.group_weights().tolist() == pytest.approx([0.5, 0.5])
    # groups stay balanced in every target batch
    for b in g.batches(4):
        a = int((b["tokens"][:, 0] == ord("x")).sum())
        assert abs(a - (len(b["tokens"]) - a)) <= 1


def test_as_target_specs(corpus):
    planted = as_target(str(corpus / "planted"), 32)
    assert planted.average == "tokens" and set(planted.group_names) == set(DOMAINS)
    assert planted.shares()["code"] > planted.shares()["prose"] > planted.shares()["markup"]
    t1 = as_target(validation(corpus), 32, max_seqs=30)
    assert t1.average == "groups" and len(t1) <= 30 and t1.group_names == list(DOMAINS)
    with pytest.raises(TypeError, match="target must be"):
        as_target(3.5, 32)
    fit, rep = t1.split(0.8, seed=1)
    assert len(fit) + len(rep) == len(t1) and set(rep.group.tolist()) == {0, 1, 2}


def test_train_static_is_deterministic_and_cached(corpus, tmp_path):
    t1 = as_target(validation(corpus), 32, max_seqs=30)
    cfg = TrainConfig(**tiny_train())
    w = {"code": 0.5, "prose": 0.5, "markup": 0.0}
    a = train_static(sources(corpus), w, {"t1": t1}, cfg, cache_dir=tmp_path)
    assert not a.cached and a.compute["tokens"]["train"] == cfg.total_steps * 6 * 32
    assert a.compute["flops"]["eval"] == 2 * a.compute["n_params_flops"] * t1.num_tokens
    b = train_static(sources(corpus), w, {"t1": t1}, cfg, cache_dir=tmp_path)
    assert b.cached and b.loss("t1") == a.loss("t1")
    c = train_static(sources(corpus), w, {"t1": t1}, cfg)
    assert c.loss("t1") == pytest.approx(a.loss("t1"), abs=1e-6)
    assert evaluate(c.model, t1).loss == pytest.approx(a.loss("t1"), abs=1e-6)


def test_target_set_validates():
    with pytest.raises(ValueError, match="no sequence"):
        TargetSet(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="no complete sequence"):
        target_from_texts({"a": ["tiny"]}, 64)
