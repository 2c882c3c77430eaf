"""One rank following published weights: the recorded switch, resume, versioning, validation, a dead
and a restarted publisher, and the search's --publish flag."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shardgen import make_docs, write_ab_sources, write_parquet_source

from fastmix_data import MixtureStream
from fastmix_data.errors import PublishError, WeightsError
from fastmix_data.live import Follow, WeightPublisher, wire
from fastmix_data.live.transport import FileTransport

W = {"a": 0.5, "b": 0.5}
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    return write_ab_sources(tmp_path_factory.mktemp("live-data"), 80, 80, shards_a=3)


def _items(batch) -> list:
    return list(zip(batch["source"].tolist(), batch["shard"].tolist(), batch["item"].tolist()))


def _until(cond, what: str, timeout: float = 60.0, step=None):
    """Call ``step`` (or sleep) until ``cond()``; fail after ``timeout`` s (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        step() if step is not None else time.sleep(0.01)


def _take(it, out: list) -> None:
    """One more batch, at the pace of a (very short) training step."""
    out.append(next(it))
    time.sleep(0.005)


def _replay(srcs, history, n, **kw):
    """The first ``n`` batches of a plain stream given ``history``: what a follower must serve."""
    ref = MixtureStream(srcs, W, batch_size=4, seed=3, **kw)
    ref.load_state_dict({**ref.state_dict(), "history": history})
    it = iter(ref)
    return [_items(next(it)) for _ in range(n)]


def test_switch_is_recorded_and_a_resume_replays_it_then_keeps_following(srcs, tmp_path):
    uri = str(tmp_path / "pub")
    pub = WeightPublisher(uri, units="samples", heartbeat_s=0.1)
    stream = MixtureStream(srcs, W, batch_size=4, seed=3, follow=Follow(uri, poll_s=0.02))
    it = iter(stream.loader(num_workers=2))
    got = [next(it) for _ in range(3)]
    pub.set_weights({"a": 0.9, "b": 0.1})
    _until(lambda: got[-1]["weight_version"] == 1, "the change to be served", step=lambda: _take(it, got))
    got += [next(it) for _ in range(2)]
    state = stream.state_dict()
    history = state["history"]
    change = history[-1]
    assert change["publisher"]["seq"] == 1 and change["requested"] == pytest.approx({"a": 0.9, "b": 0.1})
    assert [b["weight_version"] for b in got] == [int(b["batch_index"] >= change["batch"]) for b in got]
    assert [_items(b) for b in got] == _replay(srcs, history, len(got))  # a pure function of the history
    assert stream.stats()["follow"]["applied"] == 1

    after = [_items(next(it)) for _ in range(4)]  # what the job serves after the checkpoint
    resumed = MixtureStream(srcs, W, batch_size=4, seed=3, follow=Follow(uri, poll_s=0.02))
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rit = iter(resumed.loader(num_workers=2))
    again = [next(rit) for _ in range(4)]
    assert [_items(b) for b in again] == after
    pub.set_weights({"a": 0.2, "b": 0.8})  # the resumed job keeps following
    _until(lambda: again[-1]["weight_version"] == 2, "the next change", step=lambda: _take(rit, again))
    rhist = resumed.state_dict()["history"]
    assert rhist[:2] == history and rhist[2]["publisher"]["seq"] == 2
    assert resumed.stats()["follow"]["duplicates"] == 0  # re-reading seq 1 after the resume is not news
    for s in (stream, resumed):
        s.close()
    pub.close()


def _put(transport: FileTransport, seq: int, weights, run="r1", units="samples", token=None) -> None:
    doc = wire.update_document(run, seq, weights, time=time.time(), units=units)
    transport.write("latest", wire.sign(doc, token))


def test_updates_are_versioned_and_bad_ones_rejected_with_a_reason(srcs, tmp_path, caplog):
    uri = str(tmp_path / "pub")
    t = FileTransport(uri)
    stream = MixtureStream(srcs, W, batch_size=4, seed=3, follow=Follow(uri, poll_s=3600))
    it = iter(stream)
    next(it)  # the rank joins the ledger when it iterates
    follower = stream.follower
    counts = lambda: {k: follower.counts[k] for k in ("applied", "duplicates", "stale", "out_of_order", "rejected")}  # noqa: E731

    _put(t, 1, {"a": 0.7, "b": 0.3})
    follower.poll()
    follower.poll()  # the same update read again: nothing new
    assert counts() == {"applied": 1, "duplicates": 0, "stale": 0, "out_of_order": 0, "rejected": 0}
    assert follower.run_id == "r1"  # adopted from the first update
    _put(t, 1, {"a": 0.6, "b": 0.4})  # same seq, other content
    follower.poll()
    _put(t, 3, {"a": 0.1, "b": 0.9})
    follower.poll()
    _put(t, 2, {"a": 0.5, "b": 0.5})  # older than the applied one
    follower.poll()
    _put(t, 5, {"a": -1.0, "b": 2.0})  # seen, rejected ...
    follower.poll()
    _put(t, 4, {"a": 0.3, "b": 0.7})  # ... so 4 arrives out of order
    follower.poll()
    assert counts() == {"applied": 2, "duplicates": 1, "stale": 1, "out_of_order": 1, "rejected": 1}

    caplog.set_level(logging.WARNING, logger="fastmix_data.live.follower")
    bad = [
        (lambda: _put(t, 6, {"a": 0.5, "b": 0.5}, run="another"), "run id 'another'"),
        (lambda: _put(t, 7, {"a": 0.5, "b": 0.5, "c": 1.0}), "unknown sources"),
        (lambda: _put(t, 8, {"a": 1.0}), "missing"),
        (lambda: _put(t, 9, {"a": 0.0, "b": 0.0}), "all weights are zero"),
        (lambda: _put(t, 10, {"a": 0.5, "b": 0.5}, units="tokens"), "weight_units"),
        (lambda: t.write("latest", b'{"format": "fastmix_data/weights-update", "version": 1, "run_id": "r1", '
                                   b'"seq": 11, "weights": {"a": NaN, "b": 1}}'), "NaN"),
        (lambda: t.write("latest", b"\x80\x04pickle"), "never pickle"),
    ]
    for write, reason in bad:
        write()
        follower.poll()
        assert reason in follower.last_rejection
        assert any(reason in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)
    assert follower.counts["rejected"] == 1 + len(bad)
    history = stream.state_dict()["history"]
    assert [h["publisher"]["seq"] for h in history[1:]] == [1, 3]  # the job kept its weights
    assert stream.weights == pytest.approx({"a": 0.1, "b": 0.9})
    assert [h["batch"] for h in history] == sorted({h["batch"] for h in history})  # strictly later each time
    for _ in range(3):
        next(it)
    with pytest.raises(WeightsError, match="follows published weights"):
        stream.set_weights(W)
    stream.close()


def test_a_signed_run_rejects_unsigned_updates(srcs, tmp_path):
    uri = str(tmp_path / "pub")
    t = FileTransport(uri)
    stream = MixtureStream(srcs, W, batch_size=4, seed=3, follow=Follow(uri, poll_s=3600, token="s3cret"))
    next(iter(stream))
    _put(t, 1, {"a": 0.7, "b": 0.3})
    stream.follower.poll()
    assert "signature" in stream.follower.last_rejection
    _put(t, 2, {"a": 0.7, "b": 0.3}, token="s3cret")
    stream.follower.poll()
    assert stream.follower.counts["applied"] == 1
    stream.close()


def test_follow_settings_are_checked(srcs):
    for bad in (Follow(""), Follow("x", lookahead=0), Follow("x", poll_s=0)):
        with pytest.raises(PublishError):
            MixtureStream(srcs, W, batch_size=4, follow=bad)
    with pytest.raises(PublishError, match="token"):
        MixtureStream(srcs, W, batch_size=4, follow="tcp://10.9.8.7:29600")


def _start_publisher(uri: str, state: Path, control: Path) -> tuple[subprocess.Popen, str]:
    state_file = state / "publisher.json"
    before = state_file.stat().st_mtime_ns if state_file.exists() else -1
    proc = subprocess.Popen([sys.executable, str(HERE / "live_publisher.py"), uri, str(state), str(control)])
    _until(lambda: state_file.exists() and state_file.stat().st_mtime_ns != before, "the publisher to start")
    return proc, json.loads(state_file.read_text())["uri"]


@pytest.fixture
def processes():
    """Processes a test starts; whatever still runs at its end (a failed test) is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_dead_publisher_leaves_the_last_weights_and_a_restarted_one_continues(srcs, tmp_path, caplog, processes):
    caplog.set_level(logging.INFO, logger="fastmix_data.live.follower")
    state, control = tmp_path / "search", tmp_path / "control"
    control.mkdir()
    proc, uri = _start_publisher("tcp://127.0.0.1:0", state, control)
    processes.append(proc)
    stream = MixtureStream(srcs, W, batch_size=4, seed=3, weight_units="tokens",
                           follow=Follow(uri, poll_s=0.05, dead_after_s=2.0))
    it = iter(stream)
    got = [next(it)]
    (control / "publish-1.json").write_text(json.dumps({"a": 0.8, "b": 0.2}))
    _until(lambda: got[-1]["weight_version"] == 1, "seq 1 to be served", step=lambda: _take(it, got))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _until(lambda: stream.stats()["follow"]["publisher"] == "lost", "the publisher to be reported lost")
    assert any("no sign of the publisher" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    got += [next(it) for _ in range(5)]
    assert got[-1]["weight_version"] == 1 and stream.weights == pytest.approx({"a": 0.8, "b": 0.2})

    proc, uri2 = _start_publisher(uri, state, control)  # same address, same search directory
    processes.append(proc)
    assert uri2 == uri
    (control / "publish-2.json").write_text(json.dumps({"a": 0.3, "b": 0.7}))
    _until(lambda: got[-1]["weight_version"] == 2, "seq 2 to be served", step=lambda: _take(it, got))
    follow = stream.stats()["follow"]
    assert follow["applied_seq"] == 2 and follow["unreachable"] > 0
    assert any("publisher is back" in r.getMessage() for r in caplog.records)
    run = json.loads((state / "publisher.json").read_text())["run_id"]
    assert [(h["publisher"]["run_id"], h["publisher"]["seq"]) for h in stream.state_dict()["history"][1:]] == [
        (run, 1), (run, 2)]
    (control / "close").write_text("")
    proc.wait(30)
    stream.close()


def test_search_cli_publishes_and_a_resumed_search_continues_the_sequence(tmp_path):
    from fastmix_data.cli import main

    write_parquet_source(tmp_path / "a", make_docs(60, seed=1, prefix="alpha"), shards=2)
    write_parquet_source(tmp_path / "b", make_docs(60, seed=2, prefix="beta"), shards=2)
    write_parquet_source(tmp_path / "t", make_docs(30, seed=3, prefix="alpha"), shards=1)
    pub, out = tmp_path / "pub", tmp_path / "out"
    args = ["search", "--source", f"a={tmp_path / 'a'}", "--source", f"b={tmp_path / 'b'}", "--target",
            str(tmp_path / "t"), "--seq-len", "32", "--batch-size", "4", "--model", "tiny", "--warmup-steps", "2",
            "--outer-every", "2", "--checkpoint-every", "4", "--progress", "false", "--plot", "false",
            "--out", str(out), "--publish", str(pub)]
    assert main(args + ["--max-tokens", str(8 * 4 * 32)]) == 0
    first = json.loads((pub / "latest.json").read_text())
    run = json.loads((out / "publisher.json").read_text())["run_id"]
    assert first["run_id"] == run and first["seq"] >= 4 and first["units"] == "tokens"
    assert json.loads((pub / "alive.json").read_text())["closed"]
    assert main(args + ["--max-tokens", str(12 * 4 * 32), "--resume"]) == 0
    second = json.loads((pub / "latest.json").read_text())
    assert second["run_id"] == run and second["seq"] > first["seq"]
    digest = hashlib.sha256((pub / "latest.json").read_bytes()).hexdigest()
    assert json.loads((pub / "alive.json").read_text())["digest"] == digest
    assert not any(name.startswith(".") for name in os.listdir(pub))
