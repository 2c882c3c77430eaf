"""Issue 16's CPU ratio against both states of the in-process denominator.

partition_bench's steady-state fastmix cell (300,000 samples, via steady_ab.py's child) in four
variants per repetition, in a rotated order, each a fresh process under ``flock /tmp/quiet.lock``:
in-process as the process gets it (transparent huge pages as the system gives them: ``madvise`` here,
and pyarrow's mimalloc arena asks for them), in-process with huge pages disabled in that process
(``prctl(PR_SET_THP_DISABLE)`` before anything is imported: the state the DataLoader workers always
run in), and with 2 and 4 workers. Prints each cell, then the paired ratios (workers / each in-process
variant, same repetition) as median (min-max); writes every cell to ``--out`` (JSON).
Results: benchmarks/results/partitions-last.md ("The lead's quiet-window check").

    python benchmarks/inprocess_thp.py --reps 5 --out /tmp/thp_cells.json
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import steady_ab  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--workdir", default="/tmp/perf-bench", help="partition_bench's data (made by its prepare)")
ap.add_argument("--out", default="/tmp/thp_cells.json")
args = ap.parse_args()
cell_args = argparse.Namespace(workdir=args.workdir, lock="/tmp/quiet.lock", n=300_000, shard_mb=22, files=3)
cells = [("inproc", 0, False), ("inproc-nothp", 0, True), ("w2", 2, False), ("w4", 4, False)]
out = []
print("load at start", os.getloadavg(), flush=True)
for rep in range(args.reps):
    order = cells[rep % 4:] + cells[:rep % 4]
    for name, w, nothp in order:
        r = steady_ab.run_cell(cell_args, REPO, rep, w, no_thp=nothp)
        r.update(cell=name, rep=rep, load=os.getloadavg()[0])
        out.append(r)
        print(f"rep {rep} {name:13s} cpu/1k {r['cpu_per_1k']:.4f} = {r['main_per_1k']:.4f} + {r['workers_per_1k']:.4f}  "
              f"samples/s {r['samples_s']:,.0f}  load {r['load']:.2f}", flush=True)
print("load at end", os.getloadavg())
json.dump(out, open(args.out, "w"), indent=1)
def med(xs): return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"
by = {(r["cell"], r["rep"]): r for r in out}
for name in ("w2", "w4"):
    for den in ("inproc", "inproc-nothp"):
        rs = [by[(name, i)]["cpu_per_1k"] / by[(den, i)]["cpu_per_1k"] for i in range(args.reps)]
        print(f"{name} / {den}: {med(rs)}")
for name, *_ in cells:
    print(name, "cpu/1k", med([by[(name, i)]["cpu_per_1k"] for i in range(args.reps)]))
