"""`set_weights` from several threads at once, while the training thread iterates (workers 0, 2, 4).

Calls are serialised: each returns its own effective batch, the history holds exactly the changes
that were returned (one per effective batch: a later call at the same batch replaces an earlier
one), every served batch carries the version the history gives it, and the saved state replays to
exactly what was served and continues it.
"""

from __future__ import annotations

import threading

import pytest
from conformance import batch_key
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data import MixtureStream

B = 4
THREADS = 4
CALLS = 6  # per thread


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    write_parquet_source(root / "a", make_docs(80, seed=1, prefix="a"), shards=4)
    write_wds_source(root / "b", make_docs(60, seed=2, prefix="b"), shards=3)
    write_parquet_source(root / "c", make_docs(30, seed=3, prefix="c"), shards=2)
    return {"a": str(root / "a"), "b": str(root / "b" / "*.tar"), "c": str(root / "c")}


def _key(batch):
    return batch_key(batch, "epoch")


def _weights(thread: int, call: int) -> dict[str, float]:
    # distinct per call, so the history tells which call an entry came from
    return {"a": 1.0 + thread, "b": 1.0 + call, "c": 0.5 + 0.25 * ((thread * CALLS + call) % 5)}


def _normalised(w):
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


@pytest.mark.parametrize("workers", [0, 2, 4])
def test_concurrent_set_weights_are_serialised_and_the_state_matches_what_was_served(srcs, workers):
    stream = MixtureStream(srcs, {"a": 1, "b": 1, "c": 1}, batch_size=B, seed=11)
    loader = stream.loader(num_workers=workers, prefetch_factor=2) if workers else stream
    served, returned, errors = [], [], []
    started = threading.Barrier(THREADS + 1)
    progress = threading.Condition()

    def caller(t: int) -> None:
        try:
            started.wait()
            for c in range(CALLS):
                with progress:  # spread the calls over the run, several threads at a time
                    progress.wait_for(lambda c=c: len(served) >= 3 * c + 1 or len(served) > 60, timeout=30)
                w = _weights(t, c)
                returned.append((stream.set_weights(w), _normalised(w)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    started.wait()
    for batch in loader:
        with progress:
            served.append(_key(batch))
            progress.notify_all()
        if len(served) >= 40 and not any(th.is_alive() for th in threads):
            break
    for th in threads:
        th.join()
    assert not errors, errors
    state = stream.state_dict()
    stream.close()

    history = state["history"]
    versions = [h["version"] for h in history]
    assert versions == sorted(set(versions)) and versions[0] == 0, "versions increase"
    assert versions[-1] <= THREADS * CALLS
    batches = [h["batch"] for h in history]
    assert batches == sorted(set(batches)), "one entry per effective batch, in order"
    # every entry after the first is a returned call, at the batch that call returned
    by_batch: dict[int, list[dict]] = {}
    for e, w in returned:
        by_batch.setdefault(e, []).append(w)
    assert set(batches[1:]) == set(by_batch)
    for h in history[1:]:
        assert any(h["requested"] == pytest.approx(w) for w in by_batch[h["batch"]])
    # each served batch has the version of the last change at or before it
    for g, version, *_ in served:
        assert version == max(h["version"] for h in history if h["batch"] <= g), g
    assert state["next_batch"] == served[-1][0] + 1

    # The saved history replays to exactly what was served, and a resume continues it.
    ref = MixtureStream(srcs, {"a": 1, "b": 1, "c": 1}, batch_size=B, seed=11)
    s0 = ref.state_dict()
    s0["history"] = history
    ref.load_state_dict(s0)
    replay = [_key(b) for _, b in zip(range(len(served) + 10), ref)]
    assert replay[: len(served)] == served
    resumed = MixtureStream(srcs, {"a": 1, "b": 1, "c": 1}, batch_size=B, seed=11)
    resumed.load_state_dict(state)
    assert [_key(b) for _, b in zip(range(10), resumed)] == replay[len(served) :]
