"""MixtureStream on real Parquet / WebDataset / MDS / HF shards: determinism, live weights, probes,
resume (via the shared conformance check), packing, exhaustion, telemetry, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conformance import batch_key, check_resume, check_stream_resume
from shardgen import make_docs, write_hf_source, write_mds_source, write_parquet_source, write_wds_source

from fastmix_data import MixtureStream
from fastmix_data.errors import ConfigError, StateError, WeightsError
from fastmix_data.stream.tokenize import BYTE_EOS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_parquet_source(root / "code", make_docs(120, seed=1, prefix="code"), shards=3)
    write_wds_source(root / "web", make_docs(90, seed=2, prefix="web"), shards=3)
    write_parquet_source(root / "small", make_docs(7, seed=3, prefix="small"), shards=1)
    return root


def sources(root):
    return {"code": str(root / "code"), "web": str(root / "web" / "*.tar"), "small": str(root / "small")}


W = {"code": 0.5, "web": 0.4, "small": 0.1}


def key(batch):
    return batch_key(batch, "text")


def take(it, n):
    out = []
    for b in it:
        out.append(key(b))
        if len(out) == n:
            break
    return out


def test_batches_identical_for_any_num_workers_and_prefetch(data):
    ref = take(iter(MixtureStream(sources(data), W, batch_size=8, seed=3)), 24)
    for workers, prefetch, per_item in [(1, 2, 2), (2, 1, 2), (2, 4, 1), (2, 2, 3), (4, 2, 2), (3, 5, 4)]:
        stream = MixtureStream(sources(data), W, batch_size=8, seed=3)
        got = take(stream.loader(num_workers=workers, prefetch_factor=prefetch, batches_per_item=per_item), 24)
        assert got == ref, (workers, prefetch, per_item)
    assert [k[0] for k in ref] == list(range(24))


def test_realised_shares_within_the_stated_bound(data):
    stream = MixtureStream(sources(data), W, batch_size=10, seed=0)
    src = np.concatenate([b["source"].numpy() for b in take_raw(iter(stream), 50)])
    w = np.array([W["code"], W["web"], W["small"]])
    for start in range(0, len(src) - 100, 37):
        counts = np.bincount(src[start : start + 100], minlength=3)
        assert np.all(np.abs(counts - w * 100) <= 1 + w * 3)
    st = stream.stats()
    assert st["batches"] == 50 and st["items"] == 500
    assert abs(st["sources"]["small"]["realised_share"] - 0.1) <= 1.5 / 500


def take_raw(it, n):
    out = []
    for b in it:
        out.append(b)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("per_item", [1, 2, 3])
def test_set_weights_applies_at_returned_batch_and_is_reproducible(data, per_item):
    stream = MixtureStream(sources(data), W, batch_size=8, seed=1)
    loader = stream.loader(num_workers=2, prefetch_factor=2, batches_per_item=per_item)
    got, effective = [], None
    for b in loader:
        got.append(b)
        if len(got) == 3:
            effective = stream.set_weights({"code": 0.0, "web": 0.0, "small": 1.0})
        if len(got) == 20:
            break
    assert [b["batch_index"] for b in got] == list(range(20))
    # the documented bound: num_workers * batches_per_item * (ceil(prefetch_factor / batches_per_item) + 1)
    # the first batch the loop had not received, whatever the workers had built ahead
    assert effective == 3
    for b in got:
        if b["batch_index"] < effective:
            assert b["weight_version"] == 0
        else:
            assert b["weight_version"] == 1 and set(b["source"].tolist()) == {2}
    # The content is a pure function of the history: a fresh stream given the same state replays it.
    fresh = MixtureStream(sources(data), W, batch_size=8, seed=1)
    fresh.load_state_dict({**stream.state_dict(), "next_batch": 0})
    assert take(iter(fresh), 20) == [key(b) for b in got]
    upd = stream.stats()["weight_updates"]
    assert upd[0]["effective_batch"] == effective and upd[0]["latency_seconds"] is not None


@pytest.mark.parametrize("block", [1, 3, 64])
def test_block_size_changes_neither_content_nor_weight_latency(data, block):
    """Batches are built ahead in blocks; a weight change still applies at the very next batch in
    process, and what was built ahead under the old weights is never served."""
    ref_stream = MixtureStream(sources(data), W, batch_size=8, seed=2, block_batches=1, max_items=8 * 13 + 3)
    stream = MixtureStream(sources(data), W, batch_size=8, seed=2, block_batches=block, max_items=8 * 13 + 3)
    new = {"code": 0.0, "web": 1.0, "small": 0.0}
    runs = []
    for s in (ref_stream, stream):
        it = iter(s)
        first = take(it, 5)
        assert s.set_weights(new) == 5
        runs.append(first + take(it, 100))
    assert runs[0] == runs[1]
    assert [k[0] for k in runs[1]] == list(range(13))  # ends at the last whole batch of the budget
    assert all(k[1] == (k[0] >= 5) for k in runs[1])
    assert all(set(k[2]) == {1} for k in runs[1][5:])


def test_iter_of_loader_starts_its_workers_like_a_dataloader(data):
    """``iter(stream.loader(...))`` starts the worker processes at once (as ``iter(DataLoader)``
    does), so they can work while the caller prepares; the batches are unchanged."""
    import multiprocessing

    ref = take(iter(MixtureStream(sources(data), W, batch_size=8, seed=3)), 6)
    stream = MixtureStream(sources(data), W, batch_size=8, seed=3)
    before = {p.pid for p in multiprocessing.active_children()}
    it = iter(stream.loader(num_workers=2))
    assert len([p for p in multiprocessing.active_children() if p.pid not in before]) >= 2
    assert take(it, 6) == ref
    del it
    stream.close()


def test_first_batch_reads_only_its_own_shards(tmp_path, monkeypatch):
    """A worker's first block is small (it doubles from there), so the first batch does not wait for
    the shards of a whole block."""
    from fastmix_data.stream import items

    write_parquet_source(tmp_path / "many", make_docs(200, seed=4, prefix="many"), shards=20)
    reads = []
    real_read = items.ItemSource._read
    monkeypatch.setattr(
        items.ItemSource, "_read", lambda self, shard, groups: reads.append(shard) or real_read(self, shard, groups)
    )
    stream = MixtureStream({"many": str(tmp_path / "many")}, {"many": 1.0}, batch_size=4, seed=0, block_batches=64)
    it = iter(stream)
    first = next(it)
    assert len(reads) <= 2  # the 8 rows of the first 2 batches lie in at most 2 shards of 10 rows
    assert set(first["shard"].tolist()) <= set(reads)
    rest = [next(it) for _ in range(49)]  # 200 rows: the whole epoch (later blocks read ahead into the next)
    assert sorted(reads[:20]) == list(range(20))  # each shard decoded once in the epoch
    assert sorted(t for b in [first, *rest] for t in b["text"]) == sorted(make_docs(200, seed=4, prefix="many"))


def test_resume_in_process_conformance(data):
    check_stream_resume(lambda: MixtureStream(sources(data), W, batch_size=6, seed=7), iter, key, 11, 9)


def test_resume_with_weight_change_and_workers_conformance(data):
    check_stream_resume(lambda: MixtureStream(sources(data), W, batch_size=6, seed=7),
                        lambda s: s.loader(num_workers=2), key, 8, 10,
                        change={"code": 0.2, "web": 0.2, "small": 0.6})  # fmt: skip


def test_resume_with_stateful_dataloader(data):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        s = MixtureStream(sources(data), W, batch_size=5, seed=2)
        s._dl = StatefulDataLoader(s, batch_size=None, num_workers=2)
        s._it = iter(s._dl)
        return s

    def restore(s, state):
        s._dl.load_state_dict(state)
        s._it = iter(s._dl)

    check_resume(make, lambda s, n: take(s._it, n), lambda s: s._dl.state_dict(), restore, 7, 8, lambda a, b: a == b)


def test_state_is_small_versioned_json_and_refuses_other_streams(data):
    stream = MixtureStream(sources(data), W, batch_size=4, seed=0)
    take(iter(stream), 3)
    state = stream.state_dict()
    text = json.dumps(state)
    assert len(text) < 4000 and state["version"] == 3 and state["next_batch"] == 3
    other = MixtureStream(sources(data), W, batch_size=4, seed=1)
    with pytest.raises(StateError, match="seed: 0 -> 1"):
        other.load_state_dict(state)
    other.load_state_dict(state, allow_fingerprint_mismatch=True)
    with pytest.raises(StateError, match="version"):
        stream.load_state_dict({**state, "version": 99})


def test_probe_leaves_main_stream_intact(data):
    plain = MixtureStream(sources(data), W, batch_size=8, seed=4)
    expected = take(iter(plain), 10)
    stream = MixtureStream(sources(data), W, batch_size=8, seed=4)
    it = iter(stream)
    first = take(it, 4)
    probe = list(stream.probe({"code": 0.0, "web": 1.0, "small": 0.0}, steps=3))
    assert len(probe) == 3 and all(set(b["source"].tolist()) == {1} for b in probe)
    rest = take(it, 6)
    assert first + rest == expected
    assert stream.state_dict()["probes"][0]["steps"] == 3 and len(stream.state_dict()["history"]) == 1


def test_packing_one_source_per_sequence_and_documents_intact(data):
    stream = MixtureStream(sources(data), {"code": 1, "web": 1, "small": 1}, batch_size=6, seq_len=31, seed=0)
    batches = take_raw(iter(stream), 10)
    docs = {n: set(make_docs(c, seed=s, prefix=n)) for n, c, s in [("code", 120, 1), ("web", 90, 2), ("small", 7, 3)]}
    for b in batches:
        assert b["tokens"].shape == (6, 32) and b["tokens"].dtype == torch.int64
        for row, src in zip(b["tokens"].numpy(), b["source"].tolist()):
            name = stream.source_names[src]
            pieces = bytes(int(t) if t != BYTE_EOS else 0 for t in row).split(b"\x00")
            for piece in pieces[1:-1]:  # whole documents between two end-of-document tokens
                assert piece.decode() in docs[name]
    counts = np.bincount(np.concatenate([b["source"].numpy() for b in batches]), minlength=3)
    assert np.all(np.abs(counts - 20) <= 2)


@pytest.mark.parametrize("how", ["loader", "plain DataLoader"])
def test_workers_serve_the_in_process_batches_as_tensors(data, how):
    """Both ways through worker processes give the in-process batches, as tensors (packing mode)."""

    def make():
        return MixtureStream(sources(data), W, batch_size=4, seq_len=15, seed=5, block_batches=3)

    def as_lists(batches):
        return [(b["batch_index"], b["tokens"].tolist(), b["doc_start"].tolist(), b["source"].tolist(),
                 b["num_tokens"].tolist()) for b in batches]

    ref = take_raw(iter(make()), 9)
    stream = make()
    if how == "loader":
        loader = stream.loader(num_workers=2, prefetch_factor=2)
    else:
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=2)
    got = take_raw(loader, 9)
    assert all(isinstance(b[k], torch.Tensor) for b in got for k in ("tokens", "doc_start", "source", "num_tokens"))
    assert as_lists(got) == as_lists(ref)


def test_token_weights_in_packing_mode_are_exact(data):
    stream = MixtureStream(sources(data), {"code": 0.7, "web": 0.2, "small": 0.1}, batch_size=10, seq_len=15,
                           weight_units="tokens")
    take(iter(stream), 20)
    st = stream.stats()["sources"]
    assert abs(st["code"]["realised_token_share"] - 0.7) < 0.02


def test_exhaustion_drop_and_stop(data):
    stream = MixtureStream(sources(data), W, batch_size=10, seed=0, exhaustion={"small": "drop"})
    batches = take_raw(iter(stream), 40)
    small = [(b["shard"][i].item(), b["item"][i].item()) for b in batches for i in range(10) if b["source"][i] == 2]
    assert sorted(small) == [(0, i) for i in range(7)]
    stopping = MixtureStream(sources(data), W, batch_size=10, seed=0, exhaustion={"small": "stop"})
    got = take_raw(iter(stopping), 1000)
    assert 0 < len(got) < 100 and stopping.plan.end is not None


def test_other_formats_mix_with_parquet(tmp_path, streaming_module):
    write_mds_source(tmp_path / "mds", make_docs(25, prefix="mds"), shards=2)
    write_hf_source(tmp_path / "hf", make_docs(25, prefix="hf"), shards=2)
    write_parquet_source(tmp_path / "pq", make_docs(25, prefix="pq"), shards=1)

    def make():
        return MixtureStream(
            {"mds": str(tmp_path / "mds"), "hf": str(tmp_path / "hf"), "pq": str(tmp_path / "pq")},
            {"mds": 1, "hf": 1, "pq": 1}, batch_size=5, seed=0, shuffle=False,
        )

    texts = [t for b in take_raw(iter(make()), 15) for t in b["text"]]
    assert len(texts) == len(set(texts)) == 75  # one epoch of each source, nothing twice
    assert set(texts) == set(make_docs(25, prefix="mds")) | set(make_docs(25, prefix="hf")) | set(make_docs(25, prefix="pq"))
    # 3 workers (decoding each shard once between them, through shared memory) serve the same
    stream = make()
    assert [t for b in take_raw(stream.loader(num_workers=3), 15) for t in b["text"]] == texts
    stream.close()


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"code": float("nan"), "web": 1, "small": 1}, "'code' is nan"),
        ({"code": -1, "web": 1, "small": 1}, "'code' is negative"),
        ({"code": 0, "web": 0, "small": 0}, "all weights are zero"),
        ({"code": 1, "web": 1, "small": 1, "nope": 1}, r"unknown sources \['nope'\]"),
        ({"code": 1, "web": 1}, r"missing for sources \['small'\]"),
        ([1, 2], "got 2 weights for 3 sources"),
    ],
)
def test_bad_weights_name_the_value(data, weights, message):
    with pytest.raises(WeightsError, match=message):
        MixtureStream(sources(data), weights, batch_size=4)
    stream = MixtureStream(sources(data), W, batch_size=4)
    with pytest.raises(WeightsError, match=message):
        stream.set_weights(weights)
    assert stream.weights == pytest.approx(W)  # nothing lost


def test_bad_units_and_exhaustion_are_named_before_anything_opens(data, tmp_path):
    """The spec checks these once (MixtureSpec.validate, through open): the value and the names."""
    missing = {**sources(data), "gone": str(tmp_path / "no-such-dir")}  # never opened: the check comes first
    with pytest.raises(WeightsError, match="unknown weight_units 'bytes!'"):
        MixtureStream(missing, None, batch_size=4, weight_units="bytes!")
    with pytest.raises(ConfigError, match=r"exhaustion names unknown sources \['nope'\]; sources are \['code'"):
        MixtureStream(missing, None, batch_size=4, exhaustion={"nope": "stop"})
    with pytest.raises(ConfigError, match="exhaustion must be a mapping"):
        MixtureStream(sources(data), None, batch_size=4, exhaustion=["code"])


def test_packing_with_a_tokenizers_tokenizer(data):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[EOS]": 1}
    for w in "alpha beta gamma delta naïve café x zeta tab".split():
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    stream = MixtureStream(sources(data), W, batch_size=4, seq_len=16, tokenizer=tok, eos_id=1, seed=0)
    assert stream.vocab_size == len(vocab)
    batch = next(iter(stream))
    assert batch["tokens"].shape == (4, 17)
    assert int(batch["tokens"].max()) < len(vocab) and (batch["tokens"] == 1).any()
    # the token counts were computed by tokenizing once, then cached for the next stream
    again = MixtureStream(sources(data), W, batch_size=4, seq_len=16, tokenizer=tok, eos_id=1, seed=0)
    assert torch.equal(next(iter(again))["tokens"], batch["tokens"])


def test_skip_corrupt_shards_is_reported(tmp_path):
    paths = write_parquet_source(tmp_path / "a", make_docs(30, prefix="a"), shards=3)
    with open(paths[1], "r+b") as f:
        f.truncate(100)
    stream = MixtureStream({"a": str(tmp_path / "a")}, {"a": 1}, batch_size=4, on_corrupt="skip")
    texts = [t for b in take_raw(iter(stream), 5) for t in b["text"]]
    assert set(texts) <= set(make_docs(30, prefix="a")[:10] + make_docs(30, prefix="a")[20:])
    skipped = stream.stats()["sources"]["a"]["skipped_shards"]
    assert len(skipped) == 1 and skipped[0][0].endswith("part-00001.parquet")


@pytest.mark.parametrize("how", ["in-process", "loader", "loader, 1 batch per item", "plain DataLoader + observe"])
def test_received_samples_and_tokens_match_the_served_batches(data, how):
    stream = MixtureStream(sources(data), W, batch_size=8, seed=6)
    if how == "in-process":
        it = iter(stream)
    elif how.startswith("loader"):
        it = iter(stream.loader(num_workers=2, batches_per_item=1 if "1 batch" in how else 2))
    else:
        it = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
    samples, tokens = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64)
    for _ in range(11):
        b = next(it)
        if how.startswith("plain"):
            stream.observe(b)
        src, ntok = b["source"].numpy(), b["num_tokens"].numpy()
        samples += np.bincount(src, minlength=3)
        tokens += np.bincount(src, weights=ntok, minlength=3).astype(np.int64)
    st = stream.stats()
    assert st["batches"] == 11
    assert [st["sources"][n]["samples_received"] for n in ("code", "web", "small")] == samples.tolist()
    assert [st["sources"][n]["tokens_received"] for n in ("code", "web", "small")] == tokens.tolist()
    assert samples.sum() == 88 and tokens.min() > 0
    stream.close()
