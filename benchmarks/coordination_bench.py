"""How the stream's ranks agree, measured: the c10d store (the choice) against a gloo side group.

Usage:
    python benchmarks/coordination_bench.py [--ranks 2,4] [--rounds 300] [--out benchmarks/results/coordination.md]

Per agreement of `set_weights` (every rank's claims and position, rank 0's weights):
* store: ``Coordinator.reduce`` -- each rank sets its JSON payload, rank 0 gathers and sets the result
  (what fastmix_data does, whatever the training's group is);
* gloo side group: one ``all_reduce(MAX)`` of [claimed, next batch] and one ``broadcast`` of the
  weights on a group made once with ``new_group(backend="gloo")`` (what the alternative would do;
  making the group is a collective every rank must enter at the same point, timed separately).
And per grant of a following stream: ``StoreLedger.extend`` (one compare-and-set on the store).
Ranks are local processes on one machine (loopback TCP); the rounds of the three are interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common  # noqa: E402

from fastmix_data.live.ledger import StoreLedger  # noqa: E402
from fastmix_data.stream.distributed import Coordinator, job_store  # noqa: E402

K = 8  # sources


def _agree(payloads):
    return {"effective": max(max(p["started"] for p in payloads) + 1, max(p["next"] for p in payloads)),
            "weights": payloads[0]["weights"]}


def _rank(rank, world, port, rounds, out):
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    t0 = time.perf_counter()
    side = dist.new_group(backend="gloo")
    make_group = time.perf_counter() - t0
    coord = Coordinator(rank, world, "bench")
    ledger = StoreLedger(job_store(), "bench-ledger", world, lookahead=4)
    ledger.join([{"version": 0, "batch": 0, "time": 0.0}], 0, "fp")
    while not ledger.ready():
        time.sleep(0.001)
    times = {"store": [], "gloo": [], "extend": []}
    weights = [1.0 / K] * K
    for i in range(rounds):
        dist.barrier(group=side)
        t = time.perf_counter()
        coord.reduce({"started": i, "next": i, "weights": weights}, _agree)
        times["store"].append(time.perf_counter() - t)
        dist.barrier(group=side)
        t = time.perf_counter()
        m = torch.tensor([i, i], dtype=torch.int64)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=side)
        w = torch.tensor(weights, dtype=torch.float64)
        dist.broadcast(w, src=0, group=side)
        times["gloo"].append(time.perf_counter() - t)
        dist.barrier(group=side)
        t = time.perf_counter()
        ledger.extend(4 * i + rank)
        times["extend"].append(time.perf_counter() - t)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"times": times, "make_group": make_group}, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "coordination.md"))
    args = p.parse_args()
    started, rev, load_start = _common.today(), _common.git_revision(), os.getloadavg()
    rows = []
    for world in [int(x) for x in args.ranks.split(",")]:
        out = tempfile.mkdtemp()
        server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        mp.start_processes(_rank, args=(world, server.port, args.rounds, out), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(f"{out}/rank{r}.json").read_text()) for r in range(world)]
        # an agreement takes as long as its slowest rank: per round, the max over ranks
        per = {k: [max(r["times"][k][i] for r in ranks) for i in range(args.rounds)] for k in ("store", "gloo", "extend")}
        ratio = _common.Summary.of([s / g for s, g in zip(per["store"], per["gloo"])])
        make = _common.Summary.of([r["make_group"] for r in ranks])
        rows.append([world, _common.Summary.of(per["store"]).fmt(1e-6), _common.Summary.of(per["gloo"]).fmt(1e-6),
                     ratio.fmt(1, 2), make.fmt(1e-3), _common.Summary.of(per["extend"]).fmt(1e-6)])
    load_end = os.getloadavg()
    m = _common.machine_info()
    table = _common.markdown_table(["ranks", "store agreement (us)", "gloo side group (us)", "store / gloo (paired)",
                                    "new_group once (ms)", "ledger extend (us)"], rows)
    text = f"""# Rank agreement: the job's c10d store against a gloo side group

Command: `{_common.command_line()}`
Date: {started}; fastmix_data {rev}; torch {torch.__version__}
Machine: {m['cpu']}, {m['cores']}, {m['ram']}, {m['os']}, {m['python']}
Load (1/5/15 min): {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f} at start, {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f} at end

{args.rounds} interleaved rounds per row; a round's time is its slowest rank's; median (min-max).

{table}
"""
    _common.write_atomic(args.out, text + _common.kept_analysis(args.out))
    print(text)


if __name__ == "__main__":
    main()
