"""The proxy's vocabulary from a real BPE (trained here with the tokenizers library on local text)
and from pre-tokenized ids columns; MixtureStream packs the BPE's ids."""

from __future__ import annotations

import pickle

import pytest
import torch
from shardgen import make_docs, write_parquet_source

from fastmix_data.errors import TokenizerError
from fastmix_data.search.vocab import (
    check_ids,
    ids_vocabulary,
    load_tokenizer,
    resolve_vocabulary,
)
from fastmix_data.sources import open_source
from fastmix_data.stream import MixtureStream

EOS = "<|endoftext|>"


def train_bpe(path, texts, vocab_size=400, specials=(EOS,)):
    """A byte-level BPE trained on ``texts``, saved as a tokenizers JSON file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def corpus():
    return make_docs(300, seed=1) + [f"the word number {i} repeats and repeats" for i in range(200)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, corpus):
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", corpus)


def test_load_tokenizer_takes_size_and_eos_from_the_file(bpe):
    voc = load_tokenizer(bpe)
    assert voc.size == 400 and voc.eos_id == 0  # the special token is the first id
    assert voc.padded(128) == 512 and voc.padded(1) == 400
    assert voc.tokenizer.vocab_size == 400 and voc.tokenizer.eos_id == 0
    ids = voc.tokenizer.encode("the word number 7 repeats")
    assert len(ids) < len("the word number 7 repeats") and ids.max() < 400  # merges, not bytes
    assert EOS not in "".join(map(str, ids))  # no post-processor specials
    # workers get it by pickling
    clone = pickle.loads(pickle.dumps(voc.tokenizer))
    assert clone.encode("café 日本語").tolist() == voc.tokenizer.encode("café 日本語").tolist()
    assert voc.to_dict() == {"size": 400, "eos_id": 0, "origin": f"tokenizer file {bpe}"}


def test_mixture_stream_packs_bpe_ids(tmp_path, bpe, corpus):
    voc = load_tokenizer(bpe)
    write_parquet_source(tmp_path / "a", corpus[:250], shards=2)
    write_parquet_source(tmp_path / "b", corpus[250:], shards=2)
    srcs = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    def stream_():
        return MixtureStream(srcs, {"a": 1, "b": 1}, batch_size=4, seq_len=64, seed=0, tokenizer=voc.tokenizer)

    stream = stream_()
    assert stream.vocab_size == voc.size
    batches = [b for _, b in zip(range(6), stream)]
    toks = torch.cat([b["tokens"] for b in batches])
    assert toks.shape[1] == 65 and int(toks.max()) < voc.size
    assert int(toks.max()) > 256  # BPE merges, not bytes
    assert (toks == voc.eos_id).any()  # documents separated by the tokenizer's end-of-text id
    check_ids(toks, voc.size, "the search stream")
    # a DataLoader worker (the tokenizer is pickled into it) packs the same ids
    with_worker = [b for _, b in zip(range(2), stream_().loader(num_workers=1))]
    assert torch.equal(with_worker[0]["tokens"], batches[0]["tokens"])


def test_tokenizer_errors_name_the_file(tmp_path, bpe):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json is not a tokenizers JSON file"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="no token '</eos>'"):
        load_tokenizer(bpe, eos_token="</eos>")
    with pytest.raises(TokenizerError, match="smaller than tokenizer"):
        resolve_vocabulary(bpe, vocab_size=300)


def test_ids_columns_declared_or_scanned(tmp_path):
    docs = make_docs(40, seed=2)
    ids = [[(i * 13 + j) % 900 for j in range(5 + i % 7)] for i in range(40)]
    write_parquet_source(tmp_path / "a", docs, shards=2, text_col=None, ids_col="input_ids", ids=ids)
    write_parquet_source(tmp_path / "b", docs[:10], shards=1, text_col=None, ids_col="input_ids", ids=[[5, 1234]] * 10)
    srcs = {n: open_source(n, str(tmp_path / n)) for n in ("a", "b")}
    scanned = ids_vocabulary(srcs)
    assert scanned.size == 1235 and "largest id 1234" in scanned.origin and scanned.tokenizer is None
    assert ids_vocabulary(srcs, vocab_size=2048).size == 2048
    assert resolve_vocabulary(sources=srcs).size == 1235
    with pytest.raises(TokenizerError, match="vocab_size must be a positive integer"):
        ids_vocabulary(srcs, vocab_size=0)
    write_parquet_source(tmp_path / "t", docs, shards=1)
    text = {"t": open_source("t", str(tmp_path / "t"))}
    with pytest.raises(TokenizerError, match="source 't' has no pre-tokenized ids column"):
        ids_vocabulary(text)
    assert resolve_vocabulary(sources=text).origin == "bytes"  # text without a tokenizer file: bytes


def test_check_ids_names_where_and_the_id():
    check_ids(torch.tensor([[0, 5, 9]]), 10, "batch 3")
    with pytest.raises(TokenizerError, match="batch 3 holds token id 10, outside the proxy's vocabulary"):
        check_ids(torch.tensor([[0, 10]]), 10, "batch 3")
    with pytest.raises(TokenizerError, match="id -1"):
        check_ids(torch.tensor([-1, 2]), 10, "the target")


# ---------------------------------------------------------------------------------------- in the search


def _search_cfg(method="fastmix", **train):
    from search_corpus import tiny_config

    cfg = tiny_config(method, steps=12)
    cfg["train"] = {**cfg["train"], **train}
    return cfg


def test_search_trains_on_the_tokenizers_ids(tmp_path, bpe):
    """train.tokenizer: the stream and the target are BPE-encoded and the proxy's vocabulary is the
    tokenizer's (recorded in search_config.json); the static methods' proxies get it too."""
    import json

    from search_corpus import sources, write_tiny_corpus

    from fastmix_data.search import run_method

    root = write_tiny_corpus(tmp_path / "c", docs=30)
    seen = []
    r = run_method(_search_cfg(tokenizer=str(bpe)), sources=sources(root), target=str(root / "planted"),
                   out_dir=tmp_path / "run", sink=seen.append)
    assert r.model.head.out_features == r.model.embed.num_embeddings == 400
    resolved = json.loads((tmp_path / "run" / "search_config.json").read_text())["resolved"]
    assert resolved["vocabulary"] == {"size": 400, "eos_id": 0, "origin": f"tokenizer file {bpe}"}
    assert r.compute["tokens"]["scored"] > 0 and len(seen) > 2
    m = run_method(_search_cfg("mixmin", tokenizer=str(bpe)), sources=sources(root), target=str(root / "planted"))
    assert abs(sum(m.weights.values()) - 1) < 1e-9


def test_search_on_ids_columns_takes_their_vocabulary(tmp_path):
    """Sources that are pre-tokenized ids columns: the proxy's vocabulary is the declared size (the
    proxy's vocab_size) or, undeclared, the largest id + 1 (scanned)."""
    from fastmix_data.search import run_method

    for name, off in (("a", 0), ("b", 300)):
        ids = [[(off + i * 7 + j) % 600 for j in range(40)] for i in range(30)]
        ids[3][5] = 599  # the largest id
        write_parquet_source(tmp_path / name, [""] * 30, shards=1, text_col=None, ids_col="input_ids", ids=ids)
    srcs = {n: str(tmp_path / n) for n in ("a", "b")}
    cfg = _search_cfg("stratified")
    r = run_method(cfg, sources=srcs)
    assert r.weights == {"a": 0.5, "b": 0.5}
    from fastmix_data.search import SearchConfig
    from fastmix_data.search.methods import with_vocabulary
    from fastmix_data.search.vocab import search_vocabulary

    c = SearchConfig.from_dict(cfg)
    assert search_vocabulary(c.train, srcs).size == 600
    assert with_vocabulary(c, 600).train.proxy.shape().vocab_size == 600
    declared = c.replace(**{"train.proxy": "tiny,vocab_size=1024"})
    assert search_vocabulary(declared.train, srcs).size == 1024
    r = run_method({**cfg, "method": "fastmix", "fastmix": {"hypergrad": "none"}}, sources=srcs)
    assert r.model.head.out_features == 600


def test_search_refuses_ids_beyond_the_proxys_vocabulary_by_name(tmp_path):
    """A proxy declared smaller than the data's ids: the search's own loop stops on the first batch
    holding such an id, with the micro-batch and the id named (not an embedding lookup failing in
    torch); a target with such an id is named too."""
    from fastmix_data.search import run_method
    from fastmix_data.search.proxy.trainer import evaluate
    from fastmix_data.search.targets import TargetSet

    ids = [[300 + (i * 7 + j) % 300 for j in range(40)] for i in range(30)]  # every id >= 300
    write_parquet_source(tmp_path / "a", [""] * 30, shards=1, text_col=None, ids_col="input_ids", ids=ids)
    cfg = {**_search_cfg("fastmix"), "fastmix": {"hypergrad": "none"}}
    cfg["train"] = {**cfg["train"], "proxy": "tiny,vocab_size=256"}
    with pytest.raises(TokenizerError, match=r"search batch 1 holds token id \d+, outside .* \[0, 256\)"):
        run_method(cfg, sources={"a": str(tmp_path / "a")})
    r = run_method({**cfg, "train": {**cfg["train"], "proxy": "tiny,vocab_size=600"}}, sources={"a": str(tmp_path / "a")})
    bad = TargetSet(torch.tensor([[1, 2, 3], [4, 700, 5]]), torch.zeros(2, dtype=torch.long), ["x"], name="held-out")
    with pytest.raises(TokenizerError, match="target 'held-out' holds token id 700"):
        evaluate(r.model, bad)
    from fastmix_data.search import SearchConfig
    from fastmix_data.search.proxy.trainer import ProxyTrainer

    # DoReMi runs its reference model on each batch before training on it: checked before that too
    good = [[(i * 7 + j) % 250 for j in range(40)] for i in range(30)]
    write_parquet_source(tmp_path / "g", [""] * 30, shards=1, text_col=None, ids_col="input_ids", ids=good)
    dr = {**_search_cfg("doremi"), "cache_dir": str(tmp_path / "cache"),
          "doremi": {"reference_weights": {"g": 1.0, "a": 0.0}}}
    dr["train"] = {**dr["train"], "proxy": "tiny,vocab_size=256"}
    with pytest.raises(TokenizerError, match=r"training micro-batch \d+ holds token id \d+, outside"):
        run_method(dr, sources={"g": str(tmp_path / "g"), "a": str(tmp_path / "a")})
    trainer = ProxyTrainer(SearchConfig.from_dict(cfg).train, 10)  # the methods' common trainer
    trainer.step(torch.full((2, 9), 255))
    with pytest.raises(TokenizerError, match="training micro-batch 2 holds token id 256"):
        trainer.step(torch.full((2, 9), 256))
