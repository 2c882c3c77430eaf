"""Latency of followed weights: from publish to the first batch served under them, on every rank.

Usage:
    python benchmarks/live_latency.py [--workers 0,2,4] [--updates 8] [--repeats 2] [--step-ms 20]
        [--transport tcp|file] [--backend auto|gloo|nccl] [--out benchmarks/results/live_latency.md]

A 2-rank job (``torch.multiprocessing`` spawn; DataLoader workers forked, as under torchrun) trains
in lockstep: each step receives a batch from ``stream.loader(num_workers=W)``, sleeps ``--step-ms``
(the model's step) and takes one ``all_reduce`` on the training group (gloo on CPU; NCCL with a CUDA
tensor when ``--backend nccl`` or auto with CUDA present), which also decides when to stop. The
stream follows a ``WeightPublisher`` in this process, which publishes ``--updates`` mixtures, each
after the previous one reached every rank plus a seeded random gap.

Per update and rank it reports, from the batches' receive times and the recorded history:
* batches: the first batch index served under the update minus the last one received before the
  publish (what the training loop sees), and E - c_dec: the effective batch minus the last batch
  the rank had received when the job decided it (what the bound in docs/live.md speaks of);
* milliseconds from the publish to the receipt of that first batch.
The documented bound is E - c_dec <= P + L, P = 1 with ``loader()`` whatever its workers (optimistic
building: the training process gates what it serves; before it, W * R * (ceil(prefetch / R) + 1)
with W workers), L = the follower's lookahead; from the publish add the batches the loop takes
during one poll interval. The target is that bound plus
one batch. Settings run in a seeded random order in each repeat.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common  # noqa: E402

from fastmix_data import MixtureStream  # noqa: E402
from fastmix_data.live import Follow, WeightPublisher  # noqa: E402

NAMES = ("code", "prose", "web")
BATCH, SEQ = 8, 64


def make_corpus(root: Path, seed: int = 0) -> dict[str, str]:
    """Three Parquet sources of random-word documents (written once, reused)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = [f"{c}{i}" for c in "abcdefghij" for i in range(50)]
    out = {}
    for k, name in enumerate(NAMES):
        d = root / name
        out[name] = str(d)
        if d.exists():
            continue
        d.mkdir(parents=True)
        for s in range(4):
            docs = [" ".join(rng.choice(words[k * 100:]) for _ in range(rng.randint(20, 120))) for _ in range(200)]
            pq.write_table(pa.table({"text": docs}), d / f"part-{s}.parquet")
    return out


def digest(tokens: torch.Tensor) -> str:
    return hashlib.sha1(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def verify(srcs, history: list, ranks: list[dict]) -> int:
    """Check every batch each rank received against one process replaying the recorded history;
    return how many were checked (raises AssertionError on a difference)."""
    ref = MixtureStream(srcs, dict.fromkeys(NAMES, 1.0), batch_size=2 * BATCH, seq_len=SEQ, seed=0, world_size=1,
                        rank=0, chunk_items=BATCH)  # a rank's batch is one chunk of a partition
    ref.load_state_dict({**ref.state_dict(), "history": history}, allow_fingerprint_mismatch=True)
    want = {g: r for r in ranks for (_, g, _, _) in r["rows"]}
    checked = 0
    for batch in ref:
        g = batch["batch_index"]
        for k, rank in enumerate(ranks):
            for _, bg, version, d in rank["rows"]:
                if bg == g:
                    assert d == digest(batch["tokens"][k * BATCH:(k + 1) * BATCH]), f"rank {k}, batch {g} differs"
                    assert version == batch["weight_version"], f"rank {k}, batch {g}: version {version}"
                    checked += 1
        if g >= max(want):
            return checked
    return checked


def bound(lookahead: int) -> int:
    """P + L (docs/live.md): P = 1 with ``loader()``, whatever its workers."""
    return 1 + lookahead


def _rank(rank, world, port, backend, srcs, uri, workers, step_s, lookahead, poll_s, updates, out):
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    stream = MixtureStream(srcs, dict.fromkeys(NAMES, 1.0), batch_size=BATCH, seq_len=SEQ, seed=0,
                           follow=Follow(uri, poll_s=poll_s, lookahead=lookahead))
    extra = {"multiprocessing_context": "fork"} if workers else {}
    rows, after_last = [], 0
    for batch in stream.loader(num_workers=workers, **extra):
        rows.append((time.time(), batch["batch_index"], batch["weight_version"], digest(batch["tokens"])))
        store.set(f"progress/{rank}", json.dumps([len(rows), batch["weight_version"]]))
        after_last += batch["weight_version"] == updates
        time.sleep(step_s)  # the model's step
        flag = torch.tensor([1 if after_last >= 3 else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # lockstep, and every rank stops at the same step
        if flag.item():
            break
    history = stream.state_dict()["history"]
    stream.close()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"rows": rows, "history": history}, f)
    dist.destroy_process_group()


def run_one(srcs, workers: int, args, rng: random.Random, workdir: Path) -> dict:
    """One 2-rank job; returns per-update, per-rank latencies."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pub_uri = "tcp://127.0.0.1:0" if args.transport == "tcp" else str(out / "pub")
    pub = WeightPublisher(pub_uri, units="samples", heartbeat_s=0.5)
    procs = mp.start_processes(_rank, args=(2, server.port, args.backend, srcs, pub.uri, workers, args.step_ms / 1000,
                                            args.lookahead, args.poll_s, args.updates, str(out)),
                               nprocs=2, join=False, start_method="spawn")

    def progress(r):
        key = f"progress/{r}"
        return json.loads(server.get(key)) if server.check([key]) else [0, 0]

    published = []
    for k in range(args.updates):
        while not all(progress(r)[1] >= k and progress(r)[0] >= 5 for r in range(2)):
            if not all(p.is_alive() for p in procs.processes):
                procs.join()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.2, 0.6))
        w = [rng.uniform(0.1, 1.0) for _ in NAMES]
        published.append(time.time())
        pub.set_weights(dict(zip(NAMES, w)))
    procs.join()
    pub.close(linger_s=0)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    hist = ranks[0]["history"]
    assert [h["batch"] for h in hist] == [h["batch"] for h in ranks[1]["history"]], "ranks disagree"
    result = {"batches": [], "ms": [], "dec": [], "steps": [], "verified": [verify(srcs, hist, ranks)]}
    for rank in ranks:
        rows = rank["rows"]
        result["steps"] += [b[0] - a[0] for a, b in zip(rows, rows[1:])]
        for v, (t_pub, entry) in enumerate(zip(published, hist[1:]), start=1):
            before = [r for r in rows if r[0] < t_pub]
            decided = [r for r in rows if r[0] < entry["time"]]
            first = next(r for r in rows if r[2] >= v)
            c = before[-1][1] if before else -1
            result["batches"].append(first[1] - c)
            result["ms"].append((first[0] - t_pub) * 1000)
            result["dec"].append(entry["batch"] - (decided[-1][1] if decided else -1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="0,2,4")
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=20.0)
    p.add_argument("--poll-s", type=float, default=0.2)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--transport", choices=("tcp", "file"), default="tcp")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastmix_bench", "live"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "live_latency.md"))
    args = p.parse_args()
    if args.backend == "auto":
        args.backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    workers = [int(w) for w in args.workers.split(",")]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    srcs = make_corpus(workdir / "corpus")
    started, rev, load_start = _common.today(), _common.git_revision(), os.getloadavg()
    rng = random.Random(args.seed)
    results = {w: {"batches": [], "ms": [], "dec": [], "steps": [], "verified": []} for w in workers}
    for rep in range(args.repeats):
        order = workers[:]
        rng.shuffle(order)
        for w in order:
            print(f"repeat {rep + 1}/{args.repeats}: {w} workers", flush=True)
            for key, vals in run_one(srcs, w, args, rng, workdir).items():
                results[w][key] += vals
    load_end = os.getloadavg()
    write_report(args, workers, results, started, rev, load_start, load_end)


def write_report(args, workers, results, started, rev, load_start, load_end) -> None:
    rows = []
    for w in workers:
        r = results[w]
        step = _common.Summary.of(r["steps"]).median
        b_dec = bound(args.lookahead)
        b_pub = b_dec + math.ceil(args.poll_s / step)
        met = max(r["batches"]) <= b_pub + 1
        rows.append([w, _common.Summary.of(r["batches"]).fmt(), _common.Summary.of(r["dec"]).fmt(), b_dec,
                     _common.Summary.of(r["ms"]).fmt(), f"{step * 1000:.0f}", b_pub,
                     "met" if met else "NOT met", len(r["ms"]), sum(r["verified"])])
    table = _common.markdown_table(
        ["workers", "batches from publish", "E - c_dec", "bound P+L", "ms from publish", "step ms",
         "bound from publish (P+L+poll)", "target (bound + 1)", "n (updates x ranks)",
         "batches checked against a replay"], rows)
    m = _common.machine_info()
    text = f"""# Followed weights: latency from publish to the first batch under them, on every rank

Command: `{_common.command_line()}`
Date: {started}; fastmix_data {rev}; backend {args.backend}; transport {args.transport}; torch {torch.__version__}
Machine: {m['cpu']}, {m['cores']}, {m['ram']}, {m['os']}, {m['python']}
Load (1/5/15 min): {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} at start,
{load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at end. No wait for a quiet machine: latency is
measured in the job's own batches and against its own clock, and the report says how loaded it was.

2 ranks, lockstep steps of {args.step_ms:.0f} ms + one all_reduce, batch {BATCH} x {SEQ + 1} tokens per rank,
{args.updates} updates per job x {args.repeats} jobs per setting; poll_s={args.poll_s}, lookahead L={args.lookahead}.
Cells: median (min-max) over every update on both ranks.

{table}

* *batches from publish*: first batch index served under the update minus the last batch index the
  rank had received when it was published; *ms from publish*: until that batch was received.
* *E - c_dec*: the recorded effective batch minus the last batch the rank had received when the
  job decided the update; docs/live.md bounds it by P + L (P = 1 with `loader()`, whatever the
  workers).
* *bound from publish*: P + L plus the batches one poll interval holds at the measured step time.
* *batches checked*: every batch each rank received, compared with one process replaying the
  recorded weight history (content and weight version); a difference stops the benchmark.
"""
    _common.write_atomic(args.out, text + _common.kept_analysis(args.out))
    print(text)


if __name__ == "__main__":
    main()
