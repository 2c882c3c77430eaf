"""System-K3's held-out target at 1M-token final runs: does ``licenses`` have a mixture effect? (issue 13)

The judge moves to final runs of 1,048,576 tokens (final_size.md). There system-K3's held-out domain
``pymeta`` has no mixture effect at any size (uniform's regret against the best fixed mixture tried:
-0.0003 / +0.0059 / -0.0054 nats at 262k / 1M / 4M, effect / noise -0.0 / 0.8 / -0.7), so every
regret check on it is a noise test around 0. The system corpus has one other domain that is not a
source of system-K3: ``licenses`` (system_corpus.py ``DOMAINS``). This pilot decides, on fixed
mixtures only, which of the two is system-K3's held-out target in the judge.

DECISION RULE (fixed in this docstring and committed before the pilot runs; no method's search,
weights or result is run or read -- stratified's weights are uniform by construction):

* Final runs of 1,048,576 tokens with the judge's other settings (``run_quality.build_parser``:
  preset ``tiny``, batch 16 x 64 tokens, 512 test sequences per target, torch threads 1), trained
  with the judge's ``final_run``; system-K3 with ``licenses`` as its held-out target (the judge's
  ``--system-heldout licenses``: search on its validation split, scored on its test split); seeds 0-4
  (model init = data order = seed).
* Candidates (fixed mixtures): uniform (stratified's weights, the judge's stratified row), the
  planted mixture (its exact token shares, the judge's planted row), and the judge's raced grid
  (``run_quality.run_grid``): all 66 points of the 0.1 simplex with seed 0, then the best 4 per
  target (held-out licenses, planted, average) on seed 0 with seeds 1-4.
* Best fixed mixture tried = the judge's held-out oracle (``run_quality.oracle``) over the candidates
  trained with every seed: seed 0 selects, and for each evaluation seed s = 1-4 the candidate with the
  best mean over the other seeds, scored by its loss at s.
* Effect: uniform's regret on the licenses target (mean over seeds 1-4, as ``final_size.py`` (b)).
  Noise: as ``final_size.py`` (b): the median over pairs of neighbouring grid candidates (one 0.1
  step apart) trained with every seed of the SE of their paired final-loss difference on that target
  over the judge's 5 evaluation seeds (the std over seeds 0-4 / sqrt(5)); if fewer than 3 such pairs
  exist, over all pairs of those grid candidates.
* **licenses replaces pymeta as system-K3's held-out target iff effect / noise >= 3.** Otherwise
  pymeta stays; the judge's report then says that system-K3's held-out target has no mixture effect
  and its regret check is a noise test, and the held-out check is decided on stdlib-K3 only.
* Reported beside it (information, not the rule): the same figures on the planted and average
  targets, the best candidate, and the wall per final run.

Known in advance: ``export_rule.py``'s development experiment ``dev-system-A`` has exactly this target
(sources pycode, manpages, changelogs; held out licenses), on seeds 100-109; both development
studies on it (export_rule.md, fastmix_dev.md) kept every default. If licenses is chosen, the judge's
system-K3 held-out target is that development target on the judge's seeds 0-5, and the judge's
report says so.

    nice -n 15 python benchmarks/quality/heldout_pilot.py --work /tmp/i13j/bench-system
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
import _common  # noqa: E402
import final_size as fs  # noqa: E402
import run_quality as rq  # noqa: E402

EXP, DOMAIN, F, RATIO, MIN_PAIRS = "system-K3", "licenses", 1_048_576, 3.0, 3


def run_args(work: str) -> argparse.Namespace:
    return rq.build_parser().parse_args(
        ["--work", work, "--final-tokens", str(F), "--system-heldout", DOMAIN, "--experiments", EXP,
         "--seeds", *map(str, fs.SEEDS)])


def train(work: Path, data: dict, args) -> tuple[list[dict], dict]:
    """The candidates' rows (each with a ``label``) and ``{label: weights}`` of those with every seed."""
    rows = rq.run_grid(work, EXP, data, args)
    uniform = {s: rq.run_search_cached(work, EXP, "stratified", None, s, data, args)["weights"] for s in fs.SEEDS}
    for label, by_seed in (("uniform", uniform), ("planted", {s: data["planted_tokens"] for s in fs.SEEDS})):
        for s, w in by_seed.items():
            f = rq.final_run(work, data, w, s, args)
            rows += [rq._row(EXP, t, "grid-point", s, w, f) | {"label": label} for t in f["losses"]]
    for r in rows:
        r.setdefault("label", fs._name(r["weights"]))
    full = {r["label"] for r in rows if all(any(x["label"] == r["label"] and x["seed"] == s for x in rows)
                                            for s in fs.SEEDS)}
    cands = {r["label"]: r["weights"] for r in rows if r["label"] in full}
    return rows, cands


def pairs(cands: dict) -> tuple[list[tuple[str, str]], str]:
    """The rule's pairs for the noise: the neighbouring grid candidates, or all grid pairs if too few."""
    near = fs._neighbour_pairs(cands)
    if len(near) >= MIN_PAIRS:
        return near, "neighbouring"
    grid = fs.grid_labels(cands)
    return [(a, b) for i, a in enumerate(grid) for b in grid[i + 1:]], "all"


def summarise(rows: list[dict], cands: dict) -> dict:
    out = {}
    ps, kind = pairs(cands)
    for t in rq.TARGETS:
        s = fs.summarise_target([r for r in rows if r["target"] == t], cands, t, ps)
        s["noise"]["kind"] = kind
        s["ratio"] = s["uniform"]["regret"][0] / s["noise"]["se"]
        out[t] = s
    walls = [r["final_wall_s"] for r in rows if r["target"] == "heldout" and not r["final_cached"]]
    out["wall_s"] = [float(np.min(walls)), float(np.median(walls)), float(np.max(walls))] if walls else None
    return out


def decide(summary: dict) -> str:
    return DOMAIN if summary["heldout"]["ratio"] >= RATIO else "pymeta"


def render(saved: dict, out: Path) -> None:
    m, s = saved["meta"], saved["summary"]
    chosen = decide(s)
    rows = []
    for t in rq.TARGETS:
        d = s[t]
        rows.append([f"{t}{' (licenses)' if t == 'heldout' else ''}", fs._name(d["best"])
                     + (" (on the edge)" if d["best_on_edge"] else ""), f"{d['oracle_loss'][0]:.4f}",
                     fs._reg(d["uniform"]), fs._reg(d["planted"]), f"{d['noise']['se']:.4f}",
                     f"{d['noise']['pairs']} {d['noise']['kind']}", f"{d['ratio']:.1f}"])
    header = ["target", "best tried (most picked)", "its loss", "uniform regret ± SE", "planted regret ± SE",
              "noise SE (5 eval seeds)", "pairs", "effect / noise"]
    wall = " / ".join(f"{x:.1f}" for x in s["wall_s"]) if s["wall_s"] else "all cached"
    lines = ["# System-K3's held-out target at 1M-token final runs (generated by `heldout_pilot.py`)", "",
             f"- date: {m['date']}; commit {m['commit']}; machine: {m['machine']}",
             f"- command: `{m['command']}` (under `nice -n {m['nice']}`, torch threads 1)",
             f"- load average at start / end: {m['load_start']} / {m['load_end']}; wall {m['wall_s'] / 60:.1f} min; "
             f"final runs trained {m['trained']} of {m['runs']}; wall per trained final run (min / median / max) "
             f"{wall} s",
             f"- final runs of {F:,} tokens, seeds {fs.SEEDS} (seed 0 screens, 1-4 evaluate); candidates with every "
             f"seed: {len(saved['candidates'])} ({', '.join(saved['candidates'])})",
             "- the decision rule is the docstring of `heldout_pilot.py`, committed before the run", "",
             _common.markdown_table(header, rows), "",
             f"**Rule: effect / noise on licenses = {s['heldout']['ratio']:.1f} "
             f"({'>=' if chosen == DOMAIN else '<'} {RATIO:g}): system-K3's held-out target is `{chosen}`.**", ""]
    path = out / "heldout_pilot.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="a --work folder of the judge (a copy: its caches are written)")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--from-results", action="store_true", help="re-render heldout_pilot.md from its JSON")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.from_results:
        render(json.loads((out / "heldout_pilot.json").read_text()), out)
        return
    args = run_args(a.work)
    torch.set_num_threads(args.threads)
    work, t0, load0 = Path(a.work), time.perf_counter(), rq._uptime()
    data = rq.prepare(work, args)[EXP]
    rows, cands = train(work, data, args)
    summary = summarise(rows, cands)
    heldout_rows = [r for r in rows if r["target"] == "heldout"]
    meta = rq.run_meta(t0, load0, nice=os.nice(0), runs=len(heldout_rows),
                       trained=sum(not r["final_cached"] for r in heldout_rows))
    saved = {"meta": meta, "summary": summary, "candidates": cands, "runs": rows, "chosen": decide(summary)}
    _common.write_atomic(str(out / "heldout_pilot.json"), json.dumps(saved, indent=1, default=str))
    render(saved, out)
    rq.log(f"done in {meta['wall_s'] / 60:.1f} min: system-K3's held-out target is {saved['chosen']}")


if __name__ == "__main__":
    main()
