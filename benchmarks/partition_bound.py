"""Proportion accuracy with canonical partitions: the largest window deviation, in units of the bound
without partitions (1 + w_k K), for random weights and a few near-resonant ones, per P and chunk.

For each case the plan serves ``--positions`` positions; the largest |count_k - w_k N| over every
window (max minus min of the prefix error) is divided by (1 + w_k K), the window bound of the plain
schedule (docs/plan.md). P = 1 is the plain schedule.

    python benchmarks/partition_bound.py --out benchmarks/results/partition_bound.md
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from fastmix_data.plan.planner import MixturePlan, WeightChange  # noqa: E402


def worst_window(src: np.ndarray, w: np.ndarray) -> float:
    k = int((w > 0).sum())
    worst = 0.0
    for i in np.flatnonzero(w > 0):
        err = np.concatenate([[0], np.cumsum(src == i)]) - w[i] * np.arange(len(src) + 1)
        worst = max(worst, (err.max() - err.min()) / (1 + w[i] * k))
    return worst


def cases(seed: int, count: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = [("0.5001 / 0.4999 (near-resonant)", np.array([0.5001, 0.4999])),
           ("0.3001 / 0.2 / 0.4999 (near-resonant)", np.array([0.3001, 0.2, 0.4999])),
           ("0.3 / 0.1 / 0.2 / 0.15 / 0.25 (the benchmarks')", np.array([0.3, 0.1, 0.2, 0.15, 0.25]))]  # fmt: skip
    for i in range(count):
        k = int(rng.integers(2, 7))
        out.append((f"random {i} (K={k})", rng.dirichlet(np.ones(k))))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=200_000)
    p.add_argument("--random", type=int, default=8, help="random weight vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/partition_bound.md")
    args = p.parse_args(argv)
    grid = [(1, 32), (8, 8), (8, 32), (64, 8), (64, 32)]
    rows = []
    for name, w in cases(args.seed, args.random):
        cells = []
        for parts, chunk in grid:
            plan = MixturePlan([f"s{i}" for i in range(len(w))], [[100_000]] * len(w), 0, [WeightChange(0, 0, tuple(w))],
                               partitions=parts, chunk=chunk)  # fmt: skip
            cells.append(f"{worst_window(plan.plan(0, args.positions).source, w):.2f}")
        rows.append((name, *cells))
        print(name, cells, flush=True)
    text = "\n".join([
        "# Proportion accuracy with canonical partitions",
        "",
        f"Run {_common.today()} at `{_common.git_revision()}`; pure planning (no I/O, no timing).",
        "",
        "```bash",
        _common.command_line(),
        "```",
        "",
        f"Largest |count_k − w_k·N| over every window of the first {args.positions:,} positions, divided by "
        "(1 + w_k·K), the window bound of the schedule without partitions. docs/plan.md states the bound with "
        "partitions: (1 + w_k·K) × min(rounds touched, partitions touched).",
        "",
        _common.markdown_table(["weights", *(f"P={a}, chunk={b}" for a, b in grid)], rows),
        "",
    ])  # fmt: skip
    _common.write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
