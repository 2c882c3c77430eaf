"""The example job, CI-sized: torchrun, 2 ranks x 2 workers (gloo), following a publisher process.

kill -9 of the whole job after a checkpoint, then --resume: the batches served again are the same;
kill -9 of the publisher: the job keeps running on the last weights, says so, and exits cleanly.
Every logged batch is checked against a one-process replay of the recorded weight history."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import alive, descendants
from shardgen import make_docs, write_ab_sources, write_parquet_source

from fastmix_data import MixtureStream

ROOT = Path(__file__).resolve().parents[1]
B, L = 4, 32


def _until(cond, what: str, procs=(), timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a process exited ({p.args[:3]}...) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _rows(job: Path, rank: int) -> list[dict]:
    path = job / f"rank{rank}.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # the half line of a killed run, or one being written
            pass
    return rows


def _served(job: Path, version: int) -> bool:
    return all(any(r["version"] >= version for r in _rows(job, rank)) for rank in (0, 1))


def _ckpt_step(job: Path) -> int:
    latest = job / "ckpt" / "latest"
    return int(latest.read_text()) if latest.exists() else -1


def _ckpt(job: Path, rank: int) -> dict:
    return torch.load(job / "ckpt" / f"step-{_ckpt_step(job):08d}" / f"rank{rank}.pt", weights_only=True)


def _job(srcs, uri, job: Path, log: Path, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "live_weights" / "train.py"), "--follow", uri, "--out", str(job),
           "--steps", "100000", "--stop-file", str(job / "stop"), "--workers", "2", "--batch-size", str(B),
           "--seq-len", str(L), "--checkpoint-every", "15", "--step-sleep-s", "0.01", "--poll-s", "0.05",
           "--dead-after-s", "1.5", *extra]
    for name, path in srcs.items():
        cmd += ["--source", f"{name}={path}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,  # noqa: SIM115
                            start_new_session=True)


def _publisher(state: Path, control: Path, uri="tcp://127.0.0.1:0") -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "live_publisher.py"), uri, str(state),
                             str(control)], env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _until(lambda: (state / "publisher.json").exists(), "the publisher", [proc])
    return proc, json.loads((state / "publisher.json").read_text())["uri"]


def _kill_job(proc: subprocess.Popen) -> None:
    """kill -9 of the whole job: the agent, the ranks and their DataLoader workers, at once (nothing
    when it has exited: torchrun waits for its ranks)."""
    if proc.poll() is not None:
        return
    pids = descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids if pid != proc.pid):
        assert time.monotonic() < deadline, "the job's processes did not die"
        time.sleep(0.05)


def _digest(tokens: torch.Tensor) -> str:
    return hashlib.sha1(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def _replay(srcs, history, upto: int) -> dict[int, list[str]]:
    """Per global batch, the digest of each rank's rows, from one process replaying ``history``."""
    ref = MixtureStream(srcs, {n: 1.0 for n in srcs}, batch_size=2 * B, seq_len=L, seed=0, weight_units="tokens",
                        world_size=1, rank=0)
    ref.load_state_dict({**ref.state_dict(), "history": history}, allow_fingerprint_mismatch=True)
    out = {}
    for batch in ref:
        out[batch["batch_index"]] = [_digest(batch["tokens"][r * B:(r + 1) * B]) for r in (0, 1)]
        if batch["batch_index"] >= upto:
            return out


@pytest.fixture
def processes():
    """Jobs and publishers a test starts; at its end (a failed test too) every process of theirs is
    killed, ranks and DataLoader workers included (they would train on, orphaned)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        _kill_job(proc)


@pytest.mark.slow
def test_example_job_survives_kill_and_resume_and_a_dead_publisher(tmp_path, processes):
    srcs = write_ab_sources(tmp_path, 120, 120, shards_a=3, shards_b=3)
    job, log, control, state = tmp_path / "job", tmp_path / "job.log", tmp_path / "control", tmp_path / "search"
    control.mkdir()
    pub, uri = _publisher(state, control)
    run1 = _job(srcs, uri, job, log)
    processes += [pub, run1]
    _until(lambda: len(_rows(job, 0)) >= 3, "the job to train", [run1, pub])
    (control / "publish-1.json").write_text(json.dumps({"a": 0.9, "b": 0.1}))
    _until(lambda: _served(job, 1), "v1 on both ranks", [run1, pub])
    (control / "publish-2.json").write_text(json.dumps({"a": 0.2, "b": 0.8}))
    _until(lambda: _served(job, 2), "v2 on both ranks", [run1, pub])
    first_v2 = min(r["step"] for r in _rows(job, 0) if r["version"] == 2)
    _until(lambda: _ckpt_step(job) >= first_v2, "a checkpoint after v2", [run1, pub])
    # a few steps past it, well before the next one (every 15 steps)
    _until(lambda: min(len(_rows(job, r)) for r in (0, 1)) >= _ckpt_step(job) + 3, "steps past it", [run1, pub])
    _kill_job(run1)
    before = {r: _rows(job, r) for r in (0, 1)}
    ckpt = {r: _ckpt(job, r) for r in (0, 1)}
    assert ckpt[0]["step"] == ckpt[1]["step"] >= first_v2

    run2 = _job(srcs, uri, job, log, "--resume")
    processes.append(run2)
    _until(lambda: min(len(_rows(job, r)) for r in (0, 1)) > max(len(before[r]) for r in (0, 1)) + 3,
           "the resumed job to train", [run2, pub])
    (control / "publish-3.json").write_text(json.dumps({"a": 0.5, "b": 0.5}))
    _until(lambda: _served(job, 3), "v3 on both ranks", [run2, pub])
    pub.send_signal(signal.SIGKILL)
    pub.wait()
    _until(lambda: "no sign of the publisher" in log.read_text(errors="replace"), "the lost publisher", [run2])
    (job / "stop").write_text("")
    assert run2.wait(120) == 0, log.read_text(errors="replace")[-3000:]

    finals = [json.loads((job / f"rank{r}-final.json").read_text()) for r in (0, 1)]
    strip = lambda h: [{k: v for k, v in e.items() if k != "time"} for e in h]  # noqa: E731
    history = finals[0]["history"]
    assert strip(history) == strip(finals[1]["history"])  # one decision per change, on both ranks
    assert [h["publisher"]["seq"] for h in history[1:]] == [1, 2, 3]
    assert strip(json.loads(ckpt[0]["stream"])["history"]) == strip(history[:3])  # resumed, replayed, followed on
    assert finals[0]["weights"] == pytest.approx({"a": 0.5, "b": 0.5})  # the last weights published
    assert finals[0]["follow"]["publisher"] == "lost" and finals[0]["follow"]["applied_seq"] == 3
    applied = log.read_text(errors="replace")
    for rank in (0, 1):
        logged = sorted({int(line.rsplit(" ", 1)[1]) for line in applied.splitlines()
                         if line.startswith(f"rank {rank} ") and "apply from global batch" in line})
        assert logged == [h["batch"] for h in history[1:]], rank  # every rank logs the same switches

    after = {r: _rows(job, r)[len(before[r]):] for r in (0, 1)}
    last = max(row["batch"] for r in (0, 1) for row in before[r] + after[r])
    known = history[:3]  # what run 1 knew when it was killed (it decided nothing after its checkpoint)
    for run, rows, hist in (("run 1", before, known), ("run 2", after, history)):
        expected = _replay(srcs, hist, last)
        for r in (0, 1):  # every batch a rank trained on is the replay of the recorded history
            for row in rows[r]:
                assert row["digest"] == expected[row["batch"]][r], (run, r, row)
                assert row["version"] == sum(row["batch"] >= h["batch"] for h in hist[1:]), (run, r, row)
    for r in (0, 1):  # the batches served again after the resume are the ones served before the kill
        again = {row["batch"]: row["digest"] for row in after[r]}
        redone = [row for row in before[r] if row["step"] > ckpt[r]["step"] and row["batch"] < history[3]["batch"]]
        assert redone and all(again[row["batch"]] == row["digest"] for row in redone)


@pytest.mark.slow
def test_example_job_with_the_search_embedded_on_rank_0(tmp_path, processes):
    """The same job with one flag changed: rank 0 starts the search itself; both ranks follow it and
    end on its final weights."""
    srcs = write_ab_sources(tmp_path, 80, 80)
    write_parquet_source(tmp_path / "target", make_docs(30, seed=3, prefix="a"), shards=1)
    search = ["--source", f"a={srcs['a']}", "--source", f"b={srcs['b']}", "--target", str(tmp_path / "target"),
              "--seq-len", str(L), "--batch-size", "4", "--model", "tiny", "--max-tokens", str(24 * 4 * L), "--warmup-steps", "4",
              "--outer-every", "4", "--progress", "false", "--plot", "false"]
    job, log = tmp_path / "job", tmp_path / "job.log"
    run = _job(srcs, "tcp://127.0.0.1:0", job, log, "--search", "embedded", "--search-args", shlex.join(search),
               "--steps", "5", "--until-publisher-done", "--workers", "0")
    processes.append(run)
    assert run.wait(300) == 0, log.read_text(errors="replace")[-3000:]
    finals = [json.loads((job / f"rank{r}-final.json").read_text()) for r in (0, 1)]
    # (a fast machine may finish this small search before the job's first batch: then one switch)
    assert finals[0]["switches"] == finals[1]["switches"] and len(finals[0]["switches"]) >= 1
    found = json.loads((job / "search" / "weights.json").read_text())
    found = found.get("weights", found)
    last = json.loads((job / "search" / "publisher.json").read_text())["seq"]
    for f in finals:  # the job ends with the search's final weights (updates a poll apart may be superseded)
        assert f["weights"] == pytest.approx(found)
        seqs = [h["publisher"]["seq"] for h in f["history"][1:]]
        assert seqs == sorted(set(seqs)) and seqs[-1] == last
