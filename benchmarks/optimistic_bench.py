"""Optimistic building (issue 16, option 2): CPU per sample by batches per DataLoader item, and the
stall of a weight change, against the claiming protocol of ``--baseline`` (a checkout of main).

On the partition benchmark's data (`partition_bench.prepare`, sample mode, batches of 32 texts):

* *steady*: `partition_bench.measure` over ``--steady-n`` samples per cell (CPU seconds per 1,000
  served samples summed over the training process and its workers), in-process and with
  ``--workers`` workers, for ``batches_per_item`` in ``--per-item``; the baseline's cells with its
  default (2). Cells interleaved in a seeded random order per repetition, each in a fresh child.
* *stall*: ``--stall-batches`` batches through ``loader(num_workers=W)`` with ``set_weights`` every
  ``--every`` batches (alternating two mixtures): per change, the seconds of the ``set_weights`` call
  plus the wait for the next batch, against the median wait for a batch between changes; the batches
  by which E trails the last received one; and the batches rebuilt per change.

Both run in child processes (the baseline's with its checkout first on the path).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import partition_bench as pb  # noqa: E402

ALT = {"code": 0.1, "docstrings": 0.3, "tests": 0.2, "prose": 0.3, "markup": 0.1}


def _stream(data: dict, seed: int):
    from fastmix_data import MixtureStream

    return MixtureStream(data["text"], pb.WEIGHTS, batch_size=pb.BATCH, seed=seed,
                         cache_dir=os.environ["BENCH_CACHE"])  # fmt: skip


def steady_child(data: dict, seed: int, workers: int, per_item: int, n: int) -> dict:
    def open_fn(data, seed, workers):
        stream = _stream(data, seed)
        it = iter(stream.loader(num_workers=workers, prefetch_factor=2, batches_per_item=per_item) if workers else stream)
        return ((b["text"], b["source"].numpy()) for b in it)

    return pb.measure(open_fn, data, seed, workers, n)


def stall_child(data: dict, seed: int, workers: int, per_item: int, batches: int, every: int,
                step_ms: float = 0.0) -> dict:
    """The stall cell; ``step_ms``: the loop sleeps that long after each batch (a training step, during
    which the workers fill their queues), outside the timed waits."""
    stream = _stream(data, seed)
    it = iter(stream.loader(num_workers=workers, prefetch_factor=2, batches_per_item=per_item))
    waits, changes, lag = [], [], []
    for i in range(batches):
        t0 = time.perf_counter()
        if i and i % every == 0:
            received = stream._next_batch
            lag.append(stream.set_weights(ALT if (i // every) % 2 else pb.WEIGHTS) - received)
            next(it)
            changes.append(time.perf_counter() - t0)
        else:
            next(it)
            if i > every:  # past start-up
                waits.append(time.perf_counter() - t0)
        if step_ms:
            time.sleep(step_ms / 1000)
    st = stream.stats()
    return {"batch_ms": 1000 * statistics.median(waits), "change_ms": [1000 * c for c in changes], "lag": lag,
            "rebuilt": st.get("rebuilt_batches", 0), "changes": len(changes)}  # fmt: skip


def run_child(args, baseline: str | None, kind: str, workers: int, per_item: int, seed: int) -> dict:
    env = dict(os.environ, **({"PYTHONPATH": baseline} if baseline else {}))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--workdir", args.workdir, "--seed", str(seed),
           "--workers", str(workers), "--per-item", str(per_item), "--steady-n", str(args.steady_n),
           "--stall-batches", str(args.stall_batches), "--every", str(args.every), "--shard-mb", str(args.shard_mb),
           "--files", str(args.files), "--step-ms", str(args.step_ms)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=900, cwd=args.workdir)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/perf-bench")
    p.add_argument("--out", default="benchmarks/results/optimistic.md")
    p.add_argument("--baseline", default=None, help="a checkout of main (the claiming protocol)")
    p.add_argument("--workers", default="2")
    p.add_argument("--per-item", default="2,8,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steady-n", type=int, default=300_000)
    p.add_argument("--stall-batches", type=int, default=2_000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="stall cells: the loop sleeps this long after each batch (a training step)")
    p.add_argument("--shard-mb", type=int, default=22)
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("BENCH_CACHE", os.path.join(args.workdir, "index-cache"))
    data = pb.prepare(args.workdir, args.shard_mb, args.files)
    if args.child:
        w, r = int(args.workers), int(args.per_item)
        res = (steady_child(data, args.seed, w, r, args.steady_n) if args.child == "steady"
               else stall_child(data, args.seed, w, r, args.stall_batches, args.every, args.step_ms))  # fmt: skip
        print(json.dumps(res))
        return 0
    pb.index_once(data)
    workers = [int(w) for w in args.workers.split(",")]
    per_items = [int(r) for r in args.per_item.split(",")]
    load0, started, t0 = os.getloadavg(), _common.today(), time.perf_counter()
    cells: dict = {}
    for rep in range(args.repeats):
        plan = [("this", "steady", 0, 1)] + [("this", k, w, r) for k in ("steady", "stall") for w in workers
                                             for r in per_items]
        if args.baseline:
            plan += [("main", k, w, 2) for k in ("steady", "stall") for w in workers] + [("main", "steady", 0, 1)]
        random.Random(args.seed + rep).shuffle(plan)
        for code, kind, w, r in plan:
            res = run_child(args, args.baseline if code == "main" else None, kind, w, r, args.seed + rep)
            cells.setdefault((code, kind, w, r), []).append(res)
            print(rep, code, kind, w, r, json.dumps(res)[:200], flush=True)
    text = render(args, cells, load0, os.getloadavg(), started, time.perf_counter() - t0)
    _common.write_atomic(args.out, text + _common.kept_analysis(args.out))
    print(text)
    return 0


def render(args, cells, load0, load1, started, wall) -> str:
    m = _common.machine_info()
    steady_rows, stall_rows = [], []
    base = {rep: c["cpu_per_1k"] for rep, c in enumerate(cells.get(("this", "steady", 0, 1), []))}
    for (code, kind, w, r), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0], kv[0][3])):
        label = f"{'main (claims)' if code == 'main' else 'this branch'}"
        if kind == "steady":
            cpu = _common.Summary.of(x["cpu_per_1k"] for x in runs)
            ratio = _common.Summary.of(x["cpu_per_1k"] / base[i] for i, x in enumerate(runs) if i in base)
            main_cpu = _common.Summary.of(x["main_per_1k"] for x in runs)
            steady_rows.append([label, w, r if w else "–", _common.Summary.of(x["samples_s"] for x in runs).fmt(),
                                cpu.fmt(digits=4), main_cpu.fmt(digits=4), ratio.fmt(digits=2) if w else "–"])
        else:
            change = _common.Summary.of(c for x in runs for c in x["change_ms"])
            batch = _common.Summary.of(x["batch_ms"] for x in runs)
            lag = _common.Summary.of(v for x in runs for v in x["lag"])
            rebuilt = sum(x["rebuilt"] for x in runs) / max(sum(x["changes"] for x in runs), 1)
            stall_rows.append([label, w, r, batch.fmt(digits=2), change.fmt(digits=1), lag.fmt(), f"{rebuilt:.1f}"])
    steady = _common.markdown_table(
        ["code", "workers", "batches per item", "samples/s", "CPU s / 1k samples (all processes)",
         "of which training process", "/ in-process (paired)"], steady_rows)  # fmt: skip
    stall = _common.markdown_table(
        ["code", "workers", "batches per item", "batch wait ms (between changes)",
         "set_weights + next batch ms", "E - (last received + 1)", "rebuilt per change"], stall_rows)  # fmt: skip
    return f"""# Optimistic building: CPU per sample by batches per item, and the stall of a weight change

Command: `{_common.command_line()}`
Date: {started}; fastmix_data {_common.git_revision('.')}; {wall:.0f} s
Machine: {m['cpu']}, {m['cores']}, {m['ram']}, {m['os']}, {m['python']}
Load (1/5/15 min): {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at start, {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at end.
Data: the partition benchmark's ({args.shard_mb} MB Parquet shards, {args.files} per domain, batches of {pb.BATCH}
texts); cells median (min–max) over {args.repeats} interleaved repetitions, each cell a fresh process.

## Steady state: {args.steady_n:,} samples per cell

{steady}

## Stall of a weight change: {args.stall_batches:,} batches, `set_weights` every {args.every}, a step of {args.step_ms:g} ms after each batch

{stall}

* *batch wait*: the median wall time of `next()` between changes; *set_weights + next batch*: the
  `set_weights` call and the wait for the batch after it, per change.
* *E - (last received + 1)*: 0 means the change applied at the next batch the loop received.
"""


if __name__ == "__main__":
    sys.exit(main())
