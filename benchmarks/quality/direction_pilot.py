"""Direction pilot: do two changes of FastMix's signal move its export toward the grid's pick?

FastMix at its defaults misses the regret target on two of the judge's cells, decided
(extension_seeds.md, extension_seeds_stage2.md): stdlib-K3 held-out (export code 0.06 / prose 0.90,
the grid's pick code 0.3 / prose 0.7) and system-K3 planted (pycode 0.43 / manpages 0.15 /
changelogs 0.42 against 0.3 / 0.2 / 0.5). Both overshoot past the pick. Two hypotheses about why,
each testable by an existing option (no change to the search package, so the judge's caches hold):

* ``full-hypergrad``: the LM-head restriction. The head's gradient sees only how alike the
  sources' and the target's output distributions are, not what the trunk learns from a source
  (code structure helping docstrings). The full-parameter hypergradient (``hypergrad='full'``,
  ``search_batch='buffer'``; the paper's plain signal, one backward per source) sees both.
* ``serve-own-export``: the search serves sources uniformly and weights the loss, so it never
  repeats a small source the way a final run at the exported mixture does (stdlib's prose train
  split is 444 kB: at prose 0.9 a 1M-token final run sees it twice). Serving (and starting from)
  the defaults' own export makes the search train like that final run; if repetition is what
  makes the pick interior, the hypergradient should then point back toward it.

Per (cell, seed), seeds 1-5 (the judge's evaluation seeds; searches at the judge's settings, the
defaults' search read from its cache): each variant's export, its L1 to the grid's pick (fixed from
seeds 0-9, ``run_quality.grid_pick``) against the defaults' L1 to it. Weights only: no final runs.

**Rule** (written before the runs): a variant earns a final-run study only if its export is closer
(L1) to the grid's pick than the defaults' on at least 4 of 5 seeds in BOTH cells. A variant that
moves away from the pick cannot lower the regret there, whatever its final loss elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE)]
import _common  # noqa: E402
import run_quality as rq  # noqa: E402
from run_quality import grid_pick, judge_args  # noqa: E402

CELLS = (("stdlib-K3", "heldout"), ("system-K3", "planted"))
SEEDS = (1, 2, 3, 4, 5)
NAME = "direction_pilot"


def variant_overrides(name: str, export: dict) -> dict:
    """The ``fastmix`` section overrides of a variant; ``export``: the defaults' weights, same seed."""
    if name == "full-hypergrad":
        return {"hypergrad": "full", "search_batch": "buffer"}
    if name == "serve-own-export":
        return {"serve_weights": export, "init_weights": export}
    raise ValueError(f"unknown variant {name!r}")


VARIANTS = ("full-hypergrad", "serve-own-export")


def cell_units(results: dict, exp: str, target: str, seeds: list[int]) -> list[dict]:
    run = judge_args(results, exp)
    work = Path(run.work)
    data = rq.prepare(work, run)[exp]  # the judge's sources and targets
    pick = grid_pick(results, exp, target)
    units = []
    for seed in seeds:
        base = rq.run_search_cached(work, exp, "fastmix", target, seed, data, run, cached_only=True)["weights"]
        w = {"defaults": base}
        for v in VARIANTS:
            w[v] = rq.run_search_cached(work, exp, "fastmix", target, seed, data, run,
                                        overrides=variant_overrides(v, base), tag=f"-{v}")["weights"]
        units.append({"exp": exp, "target": target, "seed": seed, "pick": pick, "weights": w,
                      "l1_to_pick": {n: rq.l1(x, pick) for n, x in w.items()}})
        rq.log(f"{exp}/{target} s{seed} " + "  ".join(f"{n} L1 {d:.3f}" for n, d in units[-1]["l1_to_pick"].items()))
    return units


def summarise(units: list[dict]) -> dict:
    out = {}
    for exp, target in CELLS:
        us = [u for u in units if (u["exp"], u["target"]) == (exp, target)]
        if not us:
            continue
        cell = {"pick": us[0]["pick"], "n": len(us)}
        for n in ("defaults", *VARIANTS):
            cell[n] = {"weights": {k: float(np.mean([u["weights"][n][k] for u in us])) for k in us[0]["pick"]},
                       "l1_to_pick": float(np.mean([u["l1_to_pick"][n] for u in us])),
                       "closer": sum(u["l1_to_pick"][n] < u["l1_to_pick"]["defaults"] for u in us)}
        out[f"{exp}/{target}"] = cell
    both = len(out) == len(CELLS)  # the rule needs both cells
    keep = [v for v in VARIANTS if both and all(c[v]["closer"] >= 4 for c in out.values())]
    return {"cells": out, "earns_final_runs": keep}


def render(saved: dict, out: Path) -> None:
    m, s = saved["meta"], saved["summary"]
    rows = []
    for cell, c in s["cells"].items():
        for n in ("defaults", *VARIANTS):
            rows.append([cell, n, ", ".join(f"{k} {v:.2f}" for k, v in c[n]["weights"].items()),
                         f"{c[n]['l1_to_pick']:.3f}", "–" if n == "defaults" else f"{c[n]['closer']}/{c['n']}"])
    lines = [
        "# Direction pilot: FastMix's signal variants against the grid's pick (generated by `direction_pilot.py`)", "",
        f"- machine: {m['machine']}",
        f"- run: {m['date']}, commit {m['commit']}, `{m['command']}` (under `nice -n {m['nice']}`, torch threads 1); "
        f"wall {m['wall_s'] / 60:.1f} min; load average at start / end {m['load_start']} / {m['load_end']}",
        f"- seeds {m['seeds']}; the judge's run settings and caches; weights only (no final runs)", "",
        "**Rule** (in the script before the runs): a variant earns a final-run study only if its export is closer "
        "(L1) to the grid's pick than the defaults' on at least 4 of 5 seeds in both cells.", "",
        _common.markdown_table(["cell", "search", "export (mean)", "L1 to the grid's pick (mean)",
                                "closer than the defaults"], rows, "llrrr"), "",
        f"**Earns a final-run study: {', '.join(s['earns_final_runs']) or 'neither'}.**", "",
    ]
    path = out / f"{NAME}.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--results", default=str(HERE / "results.json"), help="the judge's results.json")
    ap.add_argument("--out", default=str(HERE), help=f"where {NAME}.json/.md go")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results = json.loads(Path(args.results).read_text())
    t0, load0 = time.perf_counter(), rq._uptime()
    units = [u for exp, target in CELLS for u in cell_units(results, exp, target, sorted(args.seeds))]
    meta = rq.run_meta(t0, load0, nice=os.nice(0), seeds=sorted(args.seeds))
    saved = {"meta": meta, "summary": summarise(units), "units": units}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _common.write_atomic(str(out / f"{NAME}.json"), json.dumps(saved, indent=1))
    render(saved, out)
    rq.log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
