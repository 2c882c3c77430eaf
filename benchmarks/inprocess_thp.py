"""Issue 16's CPU ratio against both states of the in-process denominator.

partition_bench's steady-state fastmix cell (via steady_ab.py's child) in four variants per
repetition, in a rotated order, each a fresh process under ``flock /tmp/quiet.lock``: in-process as
the process gets it (transparent huge pages as the system gives them: ``madvise`` here, and
pyarrow's mimalloc arena asks for them), in-process with huge pages disabled in that process
(``prctl(PR_SET_THP_DISABLE)`` before anything is imported: the state the DataLoader workers always
run in), and with 2 and 4 workers. ``--mode text``: 300,000 samples, batches of 32 texts; ``tokens``:
packed sequences (seq_len 2048 over the token shards, batches of 8, int64 tensors; ``tokens-narrow``:
``narrow_tokens=True``), ``--n`` sequences (default 200,000: ~4 passes of the token shards, which the
sources repeat the same way in every cell). Every cell of a repetition has the same seed and must
serve the same first and last batch (steady_ab's digests; the script fails otherwise). Prints each
cell, then the paired ratios (workers / each in-process variant, same repetition) as median
(min-max) and each cell's CPU; writes the cells, loads, date and commit to ``--out`` (JSON).
Results: benchmarks/results/partitions-last.md ("The lead's quiet-window check"),
benchmarks/results/partitions-tokens.md (both modes).

    python benchmarks/inprocess_thp.py --reps 5 --out /tmp/thp_cells.json
    python benchmarks/inprocess_thp.py --mode tokens --reps 5 --out /tmp/thp_tokens.json
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import steady_ab  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLS = [("inproc", 0, False), ("inproc-nothp", 0, True), ("w2", 2, False), ("w4", 4, False)]
DEFAULT_N = {"text": 300_000, "tokens": 200_000, "tokens-narrow": 200_000}


def different_work(out: list[dict]) -> list[str]:
    """The repetitions whose cells did not all serve the same first and last batch (empty: the same
    work everywhere), each with its cells' digests."""
    bad = []
    for rep in sorted({r["rep"] for r in out}):
        cells = [r for r in out if r["rep"] == rep]
        if len({(r.get("first"), r.get("last")) for r in cells}) != 1 or any(r.get("last") is None for r in cells):
            bad.append(f"rep {rep}: " + ", ".join(f"{r['cell']} {r.get('first')}/{r.get('last')}" for r in cells))
    return bad


def med(xs) -> str:
    """median (min-max), three decimals (`_common.Summary`)."""
    return _common.Summary.of(xs).fmt(digits=3)


def summary(out: list[dict], reps: int) -> list[str]:
    by = {(r["cell"], r["rep"]): r for r in out}
    lines = []
    for name in ("w2", "w4"):
        for den in ("inproc", "inproc-nothp"):
            rs = [by[(name, i)]["cpu_per_1k"] / by[(den, i)]["cpu_per_1k"] for i in range(reps)]
            lines.append(f"{name} / {den}: {med(rs)}")
    for name, *_ in CELLS:
        cell = [by[(name, i)] for i in range(reps)]
        lines.append(f"{name} cpu/1k {med([r['cpu_per_1k'] for r in cell])}, training process "
                     f"{med([r['main_per_1k'] for r in cell])}, items/s {med([r['samples_s'] for r in cell])}")  # fmt: skip
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mode", choices=steady_ab.MODES, default="text")
    ap.add_argument("--n", type=int, default=None, help="samples or sequences per cell (default: per mode)")
    ap.add_argument("--workdir", default="/tmp/perf-bench", help="partition_bench's data (made by its prepare)")
    ap.add_argument("--out", default="/tmp/thp_cells.json")
    args = ap.parse_args(argv)
    n = args.n or DEFAULT_N[args.mode]
    cell_args = argparse.Namespace(workdir=args.workdir, lock="/tmp/quiet.lock", n=n, shard_mb=22, files=3,
                                   mode=args.mode)  # fmt: skip
    meta = {"mode": args.mode, "n": n, "commit": _common.git_revision(REPO), "start": _common.today(),
            "load_start": os.getloadavg()}  # fmt: skip
    print(meta, flush=True)
    out = []
    for rep in range(args.reps):
        for name, w, nothp in CELLS[rep % 4 :] + CELLS[: rep % 4]:
            r = steady_ab.run_cell(cell_args, REPO, rep, w, no_thp=nothp)
            r.update(cell=name, rep=rep, load=os.getloadavg()[0])
            out.append(r)
            print(f"rep {rep} {name:13s} cpu/1k {r['cpu_per_1k']:.4f} = {r['main_per_1k']:.4f} + {r['workers_per_1k']:.4f}  "
                  f"items/s {r['samples_s']:,.0f}  load {r['load']:.2f}  batches {r['first']}/{r['last']}", flush=True)  # fmt: skip
    return _common.close_run(meta, out, args.out, summary(out, args.reps), different_work(out),
                             "cells of one repetition served different batches:")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
