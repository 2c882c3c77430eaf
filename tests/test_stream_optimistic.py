"""Optimistic building: `loader()` workers build ahead without claims, `set_weights` applies at the
first batch the training loop has not received, and a batch built under an older history is built
again, never served (docs/stream.md, Live weights). Real worker processes, real shards."""

from __future__ import annotations

import random
import time

import pytest
from conformance import batch_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shardgen import make_docs, write_ab_sources, write_parquet_source, write_wds_source

from fastmix_data import MixtureStream
from fastmix_data.live import Follow, WeightPublisher

B = 4
W0 = {"a": 1.0, "b": 1.0, "c": 1.0}


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimistic")
    write_parquet_source(root / "a", make_docs(90, seed=1, prefix="a"), shards=3)
    write_wds_source(root / "b", make_docs(70, seed=2, prefix="b"), shards=2)
    write_parquet_source(root / "c", make_docs(40, seed=3, prefix="c"), shards=2)
    return {"a": str(root / "a"), "b": str(root / "b" / "*.tar"), "c": str(root / "c")}


def _key(batch) -> tuple:
    return batch_key(batch, "epoch")


def _replay(srcs, history: list, n: int, **kw) -> list:
    """What ``num_workers=0`` serves under ``history``: the first ``n`` batches."""
    ref = MixtureStream(srcs, W0, batch_size=B, seed=3, **kw)
    ref.load_state_dict({**ref.state_dict(), "history": history})
    return [_key(b) for _, b in zip(range(n), ref)]


def _run(srcs, workers: int, prefetch: int, per_item: int, changes: dict[int, list], n: int, settle: float = 0.0,
         **kw) -> tuple[list, list, MixtureStream]:
    """Serve up to ``n`` batches through ``loader()``, calling ``set_weights`` with each weight of
    ``changes[k]`` after k batches (after ``settle`` s, so the workers have built ahead)."""
    stream = MixtureStream(srcs, W0, batch_size=B, seed=3, **kw)
    got, effective = [], []
    loader = stream.loader(num_workers=workers, prefetch_factor=prefetch, batches_per_item=per_item)
    for batch in loader:
        got.append(_key(batch))
        for w in changes.get(len(got), []):
            time.sleep(settle)
            effective.append((len(got), stream.set_weights(w)))
        if len(got) == n:
            break
    return got, effective, stream


@pytest.mark.parametrize("workers, prefetch, per_item", [(2, 2, 1), (2, 4, 2), (2, 3, 8), (4, 2, 2), (4, 4, 4)])
def test_set_weights_applies_at_the_next_batch_and_stale_batches_are_rebuilt(srcs, workers, prefetch, per_item):
    rng = random.Random(100 * workers + 10 * prefetch + per_item)
    steps = sorted(rng.sample(range(1, 30), 4))
    changes = {s: [{"a": rng.random(), "b": rng.random(), "c": 0.1 + rng.random()}] for s in steps}
    got, effective, stream = _run(srcs, workers, prefetch, per_item, changes, 36, settle=0.3)
    assert [k[0] for k in got] == list(range(36))
    assert effective == [(s, s) for s in steps]  # E = last received + 1, whatever the workers built
    history = stream.state_dict()["history"]
    assert [h["batch"] for h in history[1:]] == steps
    assert got == _replay(srcs, history, 36)  # identical to num_workers=0 under the same history
    # the workers had built past each change (they had time to): those batches were built again
    assert stream.stats()["rebuilt_batches"] >= len(steps)
    stream.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    workers=st.sampled_from([2, 4]),
    prefetch=st.integers(2, 4),
    per_item=st.sampled_from([1, 2, 4, 8]),
    budget=st.sampled_from([None, 23]),
)
def test_any_change_points_serve_what_num_workers_0_serves(srcs, data, workers, prefetch, per_item, budget):
    """Random change points (several at one step: the last wins), with and without an end of the
    stream close after them (a worker may end before it learns of a change: the training process
    builds what is missing)."""
    n = 23 if budget else 30
    steps = data.draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=4))
    changes: dict[int, list] = {}
    for s in steps:
        changes.setdefault(s, []).append({"a": data.draw(st.floats(0.05, 1)), "b": 0.3, "c": 0.5})
    kw = {"max_items": B * budget} if budget else {}
    got, effective, stream = _run(srcs, workers, prefetch, per_item, changes, n + 5, **kw)
    assert all(e == s for s, e in effective)
    history = stream.state_dict()["history"]
    assert got == _replay(srcs, history, n + 5, **kw) and len(got) == (budget or n + 5)
    stream.close()


def test_follower_with_workers_switches_within_one_batch_plus_the_lookahead(tmp_path):
    """The grant gates what the training process serves, not what the workers build: a change
    decided while the loop holds batch c applies at E <= c + 1 + lookahead whatever the workers
    and prefetch (the claims of the workers made it c + num_workers * prefetch + lookahead)."""
    srcs = write_ab_sources(tmp_path, 120, 120, shards_a=3)
    lookahead = 4
    for workers, prefetch in ((2, 4), (4, 3)):
        uri = str(tmp_path / f"pub{workers}")  # a publisher per job: no update of the previous one
        pub = WeightPublisher(uri, units="samples", heartbeat_s=0.1)
        stream = MixtureStream(srcs, {"a": 0.5, "b": 0.5}, batch_size=B, seed=3,
                               follow=Follow(uri, poll_s=0.02, lookahead=lookahead))
        it = iter(stream.loader(num_workers=workers, prefetch_factor=prefetch))
        got = [next(it) for _ in range(5)]
        time.sleep(0.3)  # the workers fill their prefetch
        before = len(stream.state_dict()["history"])
        pub.set_weights({"a": 0.9, "b": 0.1})
        deadline = time.monotonic() + 60
        while len(stream.state_dict()["history"]) == before:  # the loop holds batch 4 meanwhile
            assert time.monotonic() < deadline, "the change was never decided"
            time.sleep(0.01)
        effective = stream.state_dict()["history"][-1]["batch"]
        assert 5 <= effective <= 4 + 1 + lookahead
        got += [next(it) for _ in range(effective + 4 - len(got))]
        assert [b["weight_version"] for b in got] == [int(b["batch_index"] >= effective) for b in got]
        ref = MixtureStream(srcs, {"a": 0.5, "b": 0.5}, batch_size=B, seed=3)
        ref.load_state_dict({**ref.state_dict(), "history": stream.state_dict()["history"]})
        assert [batch_key(b) for b in got] == [batch_key(b) for _, b in zip(range(len(got)), ref)]
        assert stream.stats()["rebuilt_batches"] > 0  # what the workers had built past E was rebuilt
        stream.close()
        pub.close()
