"""Is the judge's final run large enough? A study of the final-run size, fixed mixtures only (issue 13).

The judge (``run_quality.py``) trains final runs of 262,144 tokens. This study asks, by criteria
about the judge alone (no method's weights are trained or read), at which final-run size F the
judge's two K = 3 corpora have (a) a planted mixture that is the loss optimum within the issue's
0.005-nat target and (b) mixture effects well above the seed noise.

DECISION RULE (fixed in this docstring and committed before any run of this script; the commit is
named in final_size.md):

* Sizes F = 262,144, 1,048,576, 4,194,304 tokens: the judge's preset ``tiny``, batch 16 x 64
  tokens, its learning-rate schedule over more steps (``--final-tokens F``). Seeds 0-4 at every F
  (model init = data order = seed, as the judge).
* Corpora stdlib-K3 and system-K3, the judge's corpora, planted sets and test sets (its ``--work``
  caches), targets ``heldout`` and ``planted``, trained with the judge's ``final_run``.
* Candidates (fixed mixtures only): uniform (stratified's weights); the planted mixture (its exact
  token shares, the judge's ``planted`` row); and the 0.1-grid points within one grid step
  (L1 <= 0.2) of three centres: the 262k judge's held-out-oracle pick for the held-out target and
  for the planted target (results-262k.json), and the grid point nearest the planted token shares.
* Best fixed mixture tried = the judge's held-out oracle (``run_quality.oracle``) over all
  candidates: seed 0 selects, and for each evaluation seed s = 1-4 the candidate with the best mean
  over the other seeds, scored by its loss at s.
* (a) planted regret: the planted mixture's loss minus the oracle's on the planted target, mean
  +- SE over the evaluation seeds. (b) effect: uniform's regret on the held-out target (same rule);
  noise: the median over pairs of neighbouring grid candidates (one 0.1 step apart) of the SE of
  their paired final-loss difference on that target over the judge's 5 evaluation seeds (the std
  over this study's 5 seeds / sqrt(5)); ratio = effect / noise. (c) wall time per final run.
* F PASSES when on BOTH corpora (a) mean - 2 SE <= 0.005 (the planted mixture within the target of
  the best tried, within 2 SE) and (b) effect / noise >= 3 on the held-out target.
* CHOSEN F = the smallest passing F; sizes are run in increasing order, and a size above a passing
  one is information only. If none passes: no F up to 4M makes the judge consistent.
* The thresholds are the brief's, unchanged.

    nice -n 15 python benchmarks/quality/final_size.py --work /tmp/i13s/bench --sizes 262144 1048576
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import _common  # noqa: E402
import run_quality as rq  # noqa: E402

from fastmix_data.search.methods.grid import simplex_grid  # noqa: E402

SIZES = (262_144, 1_048_576, 4_194_304)
SEEDS = [0, 1, 2, 3, 4]
EXPS = ("stdlib-K3", "system-K3")
TARGETS = ("heldout", "planted")
PLANTED_REGRET, RATIO = 0.005, 3.0
JUDGE_EVAL_SEEDS = 5


def _name(w: dict) -> str:
    return "/".join(f"{k} {v:.2f}" for k, v in w.items())


def candidates(exp: str, data: dict, judged: dict) -> dict[str, dict]:
    """``{label: weights}``: uniform, the planted mixture, and the grid points around three centres."""
    names = list(data["sources"])
    grid = [dict(zip(names, p)) for p in simplex_grid(len(names), 0.1)]
    planted = data["planted_tokens"]
    centres = [judged[exp]["targets"][t]["oracle"]["weights"] for t in TARGETS]
    centres.append(min(grid, key=lambda g: rq.l1(g, planted)))
    out = {"uniform": {k: 1 / len(names) for k in names}, "planted": dict(planted)}
    for g in grid:
        if any(rq.l1(g, c) <= 0.2 + 1e-9 for c in centres):
            out[_name(g)] = g
    return out


def train_all(work: Path, exp: str, data: dict, cands: dict, F: int, args) -> list[dict]:
    args.final_tokens = F
    rows = []
    for seed in SEEDS:
        for label, w in cands.items():
            f = rq.final_run(work, data, w, seed, args)
            rows += [{"exp": exp, "F": F, "label": label, "method": "grid-point", "seed": seed, "weights": w,
                      "target": t, "final_loss": f["losses"][t], "final_wall_s": f["wall_s"], "cached": f["cached"]}
                     for t in TARGETS]
        rq.log(f"{exp} F={F:,} seed {seed}: {len(cands)} candidates")
    return rows


def grid_labels(cands: dict) -> list[str]:
    """The candidates that are grid points (not uniform, not the planted mixture)."""
    return [k for k in cands if k not in ("uniform", "planted")]


def _neighbour_pairs(cands: dict) -> list[tuple[str, str]]:
    grid = grid_labels(cands)
    return [(a, b) for i, a in enumerate(grid) for b in grid[i + 1:] if abs(rq.l1(cands[a], cands[b]) - 0.2) < 1e-9]


def noise(rows: list[dict], cands: dict, t: str, pairs: list[tuple[str, str]] | None = None) -> dict:
    """The seed noise on target ``t``: over ``pairs`` of candidates (default: the neighbouring ones)."""
    loss = {(r["label"], r["seed"]): r["final_loss"] for r in rows if r["target"] == t}
    pairs = _neighbour_pairs(cands) if pairs is None else pairs
    stds = [float(np.std([loss[a, s] - loss[b, s] for s in SEEDS], ddof=1)) for a, b in pairs]
    return {"pairs": len(stds), "std_median": float(np.median(stds)), "std_max": float(np.max(stds)),
            "se": float(np.median(stds)) / np.sqrt(JUDGE_EVAL_SEEDS)}


def summarise_target(rows: list[dict], cands: dict, t: str, pairs: list[tuple[str, str]] | None = None) -> dict:
    rt = [r for r in rows if r["target"] == t]
    orc = rq.oracle(rt, t, SEEDS)
    reg = {m: rq._regret([r for r in rt if r["label"] == m], orc["by_seed"]) for m in ("uniform", "planted")}
    best = orc["weights"]
    edge = any(abs(rq.l1(best, dict(zip(best, p))) - 0.2) < 1e-9 and dict(zip(best, p)) not in cands.values()
               for p in simplex_grid(len(best), 0.1))
    return {"oracle_loss": orc["loss"], "picks": orc["picks"], "best": best, "best_on_edge": edge,
            "uniform": reg["uniform"], "planted": reg["planted"], "noise": noise(rt, cands, t, pairs)}


def summarise(rows: list[dict], cands: dict) -> dict:
    walls = [r["final_wall_s"] for r in rows if r["target"] == TARGETS[0]]
    out = {t: summarise_target(rows, cands, t) for t in TARGETS}
    out["wall_s"] = [float(np.min(walls)), float(np.median(walls)), float(np.max(walls))]
    out["trained"] = sum(not r["cached"] for r in rows if r["target"] == TARGETS[0])
    out["runs"] = len(walls)
    return out


def passes(s: dict) -> dict:
    p, h = s["planted"]["planted"], s["heldout"]
    ratio = h["uniform"]["regret"][0] / h["noise"]["se"]
    return {"planted_ok": p["regret"][0] - 2 * p["regret_se"] <= PLANTED_REGRET, "ratio": ratio,
            "ratio_ok": ratio >= RATIO}


def decide(summary: dict) -> tuple[int | None, dict]:
    """``(chosen F or None, {F: "PASSES" | "fails" | "incomplete"})``; "incomplete": every corpus run
    passes but not every corpus was run. The chosen F is the first that passes after sizes that fail."""
    verdict = {}
    for F in sorted(summary, key=int):
        per = [passes(s) for s in summary[F].values()]
        ok = all(v["planted_ok"] and v["ratio_ok"] for v in per)
        verdict[F] = "fails" if not ok else "PASSES" if len(per) == len(EXPS) else "incomplete"
    chosen = None
    for F, v in verdict.items():
        if v != "fails":
            chosen = int(F) if v == "PASSES" else None
            break
    return chosen, verdict


def merge(paths: list[str]) -> dict:
    """One result from several runs of this script (e.g. one per corpus, run side by side)."""
    saves = [json.loads(Path(p).read_text()) for p in paths]
    summary: dict = {}
    for s in saves:
        for F, per in s["summary"].items():
            summary.setdefault(F, {}).update(per)
    summary = {F: {e: per[e] for e in EXPS if e in per} for F, per in summary.items()}
    return {"parts": [m for s in saves for m in s["parts"]], "summary": summary,
            "runs": [r for s in saves for r in s["runs"]]}


# ============================================================================ report


def _reg(d: dict) -> str:
    return f"{d['regret'][0]:+.4f} ± {d['regret_se']:.4f}"


def table(summary: dict) -> str:
    header = ["F (tokens)", "corpus", "(a) planted regret ± SE", "mean − 2 SE ≤ 0.005", "(b) effect: uniform regret",
              "noise SE (5 eval seeds)", "effect / noise", "≥ 3", "planted target: uniform regret / noise SE",
              "(c) wall per final run, s (min / median / max)", "runs (trained)"]
    rows = []
    for F in sorted(summary, key=int):
        for exp, s in summary[F].items():
            v, h, p = passes(s), s["heldout"], s["planted"]
            rows.append([f"{int(F):,}", exp, _reg(p["planted"]), "yes" if v["planted_ok"] else "NO",
                         _reg(h["uniform"]), f"{h['noise']['se']:.4f}", f"{v['ratio']:.1f}",
                         "yes" if v["ratio_ok"] else "NO", f"{_reg(p['uniform'])} / {p['noise']['se']:.4f}",
                         " / ".join(f"{x:.1f}" for x in s["wall_s"]), f"{s['runs']} ({s['trained']})"])
    return _common.markdown_table(header, rows)


def picks(summary: dict) -> list[str]:
    lines = []
    for F in sorted(summary, key=int):
        for exp, s in summary[F].items():
            for t in TARGETS:
                d = s[t]
                lines.append(f"- F {int(F):,}, {exp} / {t}: best tried (most picked) {_name(d['best'])}"
                             f"{' -- ON THE EDGE of the candidates' if d['best_on_edge'] else ''}; oracle loss "
                             f"{d['oracle_loss'][0]:.4f}; noise: {d['noise']['pairs']} neighbouring pairs, paired-"
                             f"difference std median {d['noise']['std_median']:.4f}, max {d['noise']['std_max']:.4f}")
    return lines


def render(saved: dict, out: Path) -> None:
    summary = saved["summary"]
    chosen, verdict = decide(summary)
    cands = {e: c for m in saved["parts"] for e, c in m["candidates"].items()}
    head = ["# Final-run size of the judge: is seed noise below the effects? (generated by `final_size.py`)", "",
            f"- machine: {saved['parts'][0]['machine']}", "- runs (under `nice -n 15`, torch threads 1):"]
    head += [f"  - {m['date']}, commit {m['commit']}: `{m['command']}`; load average at start / end "
             f"{m['load_start']} / {m['load_end']}; wall {m['wall_s'] / 60:.1f} min" for m in saved["parts"]]
    head += [f"- seeds {SEEDS} (seed 0 selects, 1-4 evaluate); candidates per corpus: "
             + "; ".join(f"{e} {len(c)}" for e, c in cands.items()),
             "- the decision rule is the docstring of `final_size.py`, committed before the runs", ""]
    body = ["## Per size and corpus", "", table(summary), "",
            "Effect and noise are on the held-out target; regrets against the best fixed mixture tried (the judge's "
            "held-out-seed rule over the candidates).", "",
            "## Rule applied", "",
            *[f"- F {int(F):,}: {v}" for F, v in verdict.items()],
            "", f"**Chosen F: {chosen:,} tokens.**" if chosen else
            "**No F chosen: no size run passes on both corpora (or the first that might is incomplete).**", "",
            "## Best candidate and noise per target", "", *picks(summary), "",
            "## Candidates", "", *[f"- {e}: " + ", ".join(c) for e, c in cands.items()], ""]
    path = out / "final_size.md"
    _common.write_atomic(str(path), "\n".join(head + body) + _common.kept_analysis(str(path)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="out/quality", help="the judge's --work folder (corpora, planted sets, caches)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), choices=SIZES)
    ap.add_argument("--experiments", nargs="+", default=list(EXPS), choices=EXPS)
    ap.add_argument("--judged", default=str(HERE / "results-262k.json"), help="the 262k judge's results (its grid picks)")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="render one report from these runs' final_size.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        saved = merge(args.merge)
        _common.write_atomic(str(out / "final_size.json"), json.dumps(saved, indent=1, default=str))
        render(saved, out)
        return
    run_args = rq.build_parser().parse_args(["--work", args.work])  # the judge's settings
    torch.set_num_threads(run_args.threads)
    work, t0, load0 = Path(args.work), time.perf_counter(), rq._uptime()
    judged = json.loads(Path(args.judged).read_text())["summary"]
    run_args.experiments = args.experiments
    data = rq.prepare(work, run_args)
    cands = {exp: candidates(exp, data[exp], judged) for exp in args.experiments}
    summary, rows = {}, []
    for F in sorted(args.sizes):
        for exp in args.experiments:
            r = train_all(work, exp, data[exp], cands[exp], F, run_args)
            summary.setdefault(str(F), {})[exp] = summarise(r, cands[exp])
            rows += r
    meta = rq.run_meta(t0, load0, candidates={e: list(c) for e, c in cands.items()})
    saved = {"parts": [meta], "summary": summary, "runs": rows}
    _common.write_atomic(str(out / "final_size.json"), json.dumps(saved, indent=1, default=str))
    render(saved, out)
    rq.log(f"done in {meta['wall_s'] / 60:.1f} min; wrote {out / 'final_size.md'}")


if __name__ == "__main__":
    main()
