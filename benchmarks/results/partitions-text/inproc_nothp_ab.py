"""Context check for the second attempt (i16-text2; not part of its rule): a paired, interleaved A/B of
the in-process text cell with huge pages off (inprocess_thp's ``inproc-nothp`` denominator), main
(A) against this branch (B), order A B / B A alternating, seed = pair index, each cell a fresh process
under ``flock /tmp/quiet.lock`` (steady_ab.run_cell). Appends each cell to ``--jsonl``; prints per pair
and the median B / A.

    .venv/bin/python benchmarks/results/partitions-text/inproc_nothp_ab.py --pairs 10 --jsonl F
"""

import argparse
import json
import os
import statistics
import sys

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, BENCH)
import steady_ab  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="/work/main")
    ap.add_argument("--b", default="/work/wt/i16-text")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--jsonl", required=True)
    args = ap.parse_args()
    cell = argparse.Namespace(workdir="/tmp/perf-bench", lock="/tmp/quiet.lock", n=300_000, shard_mb=22,
                              files=3, mode="text")  # fmt: skip
    ratios = []
    for i in range(args.pairs):
        got = {}
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            got[name] = steady_ab.run_cell(cell, args.a if name == "A" else args.b, i, 0, no_thp=True)
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({**got[name], "variant": name, "pair": i, "load": os.getloadavg()[0]}) + "\n")
        a, b = got["A"], got["B"]
        if (a["first"], a["last"]) != (b["first"], b["last"]):
            raise SystemExit(f"pair {i}: A and B served different batches")
        ratios.append(b["cpu_per_1k"] / a["cpu_per_1k"])
        print(f"pair {i}: A {a['cpu_per_1k']:.5f}, B {b['cpu_per_1k']:.5f}, B / A {ratios[-1]:.3f}", flush=True)
    print(f"in-process, THP off: B / A {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), "
          f"{sum(r < 1 for r in ratios)}/{len(ratios)} below 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
