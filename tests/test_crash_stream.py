"""SIGKILL of a streaming job (2 ranks as separate gloo processes x 2 DataLoader workers each, live
weights) at a random point, then a resume from the last checkpoint both ranks wrote.

What the resumed job serves, after what the killed job served up to that checkpoint, is exactly the
pure plan's sequence under the final weight history (what an uninterrupted job with that history
serves: every rank a disjoint slice, nothing lost or repeated); every checkpoint file is whole (no
partial file visible); and the killed processes' leftovers (weight channel, shared-memory rings,
temporary files) are gone once the resumed job has started.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
from fuzzkit import KillPoints, kill_group, lines, our_leftovers, start, wait_for
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data import MixtureStream

PROGRAM = os.path.join(os.path.dirname(__file__), "crash_programs.py")
B, TOTAL, CKPT_EVERY, WORLD = 3, 24, 4, 2
W0 = {"a": 0.6, "b": 0.4}
SCHEDULE = {"3": {"a": 0.2, "b": 0.8}, "9": {"a": 0.9, "b": 0.1}, "15": {"a": 0.5, "b": 0.5}, "20": {"a": 0.1, "b": 0.9}}


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-src")
    write_parquet_source(root / "a", make_docs(70, seed=1, prefix="a"), shards=4)
    write_wds_source(root / "b", make_docs(50, seed=2, prefix="b"), shards=3)
    return {"a": str(root / "a"), "b": str(root / "b" / "*.tar")}


def _launch(srcs, out, tmp, launch: int, resume: int | None):
    os.makedirs(os.path.join(out, "ckpt"), exist_ok=True)
    env = {"TMPDIR": tmp, "FASTMIX_DATA_CACHE": os.path.join(out, "cache")}
    procs = []
    for rank in range(WORLD):
        args = {"rank": rank, "world": WORLD, "init": os.path.join(out, f"init-{launch}"), "sources": srcs,
                "weights": W0, "batch_size": B, "seed": 13, "schedule": SCHEDULE, "ckpt_every": CKPT_EVERY,
                "total": TOTAL, "out": out, "resume": resume}  # fmt: skip
        procs.append(start([PROGRAM, "stream", json.dumps(args)], env=env, log=os.path.join(out, f"log-{launch}-{rank}")))
    return procs


def _served(out: str, rank: int) -> list[dict]:
    with open(os.path.join(out, f"served-{rank}.jsonl")) as f:
        return [json.loads(line) for line in f.read().splitlines() if line.endswith("}")]


def _complete_checkpoints(out: str) -> list[int]:
    """Steps for which every rank has a checkpoint; each file must parse (atomic writes)."""
    steps: dict[int, int] = {}
    for path in glob.glob(os.path.join(out, "ckpt", "step-*-rank-*.json")):
        with open(path) as f:
            json.load(f)  # a partial file would fail here
        step = int(os.path.basename(path).split("-")[1])
        steps[step] = steps.get(step, 0) + 1
    return sorted(s for s, n in steps.items() if n == WORLD)


def _reference(srcs, history, n):
    ref = MixtureStream(srcs, W0, batch_size=WORLD * B, seed=13, world_size=1, rank=0)
    state = ref.state_dict()
    state["history"] = [dict(h, position=h["batch"] * WORLD * B) for h in history]
    ref.load_state_dict(state, allow_fingerprint_mismatch=True)
    out = [list(zip(*(b[k].tolist() for k in ("source", "shard", "item", "epoch")))) for _, b in zip(range(n), ref)]
    ref.close()
    return out


def _one_crash(srcs, out, kill_after: int):
    tmp = os.path.join(out, "tmp")
    os.makedirs(tmp)
    first = _launch(srcs, out, tmp, 0, None)
    try:
        wait_for(lambda: lines(os.path.join(out, "served-0.jsonl")) >= kill_after, 240, first[0], f"{kill_after} batches")
    finally:
        for p in first:
            kill_group(p)
    dead = [p.pid for p in first]
    assert all(our_leftovers(tmp, pid) for pid in dead)  # a SIGKILL leaves the weight channel behind
    steps = _complete_checkpoints(out)
    resume = max(steps) if steps else None
    before = [[r for r in _served(out, rank) if resume is not None and r["step"] < resume] for rank in range(WORLD)]
    for rank in range(WORLD):  # the resumed job appends to a fresh log
        os.replace(os.path.join(out, f"served-{rank}.jsonl"), os.path.join(out, f"killed-{rank}.jsonl"))
    second = _launch(srcs, out, tmp, 1, resume)
    for p in second:
        assert p.wait(timeout=300) == 0, open(os.path.join(out, f"log-1-{second.index(p)}")).read()[-3000:]
    after = [_served(out, rank) for rank in range(WORLD)]
    with open(os.path.join(out, "final-0.json")) as f:
        final = json.load(f)
    return dead, resume, before, after, final


@pytest.mark.slow
def test_sigkill_then_resume_serves_the_uninterrupted_sequence(srcs, tmp_path):
    points = KillPoints(1, 4, default_seed=17)
    for point in points:
        kill_after = points.rng.randrange(CKPT_EVERY + 1, TOTAL - 6)
        print(f"FASTMIX_CRASH_SEED={points.seed}: kill after {kill_after} batches")
        out = str(tmp_path / f"run{point}")
        dead, resume, before, after, final = _one_crash(srcs, out, kill_after)
        if resume is None or resume >= TOTAL:  # a loaded machine ran past the kill point: try another
            continue
        points.landed()
        for rank in range(WORLD):
            steps = [r["step"] for r in before[rank] + after[rank]]
            assert steps == list(range(TOTAL)), (rank, kill_after, resume)  # nothing lost, nothing twice
        ref = _reference(srcs, final["history"], TOTAL)
        for g in range(TOTAL):
            r0, r1 = (before[rank] + after[rank] for rank in range(WORLD))
            assert r0[g]["batch"] == r1[g]["batch"] == g
            versions = [h["version"] for h in final["history"] if h["batch"] <= g]
            assert r0[g]["version"] == r1[g]["version"] == versions[-1], g
            assert [tuple(x) for x in r0[g]["items"] + r1[g]["items"]] == ref[g], (g, kill_after, resume)
        for pid in dead:  # the killed ranks' leftovers were removed when the resumed job started
            assert our_leftovers(os.path.join(out, "tmp"), pid) == []
            assert our_leftovers("/dev/shm", pid) == []
            assert our_leftovers(os.path.join(out, "ckpt"), pid) == []
        assert not glob.glob(os.path.join(out, "tmp", "fastmix-*"))  # the resumed job cleaned up after itself
