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
* ``adam-precond`` (added later, issue 13; ``precondition=True``): the SGD-step assumption. The proxy
  trains with AdamW, so the first-order effect of a source on the target loss is its gradient against
  ``P * G_ref`` (``P`` AdamW's per-coordinate step scale for the LM head), not against ``G_ref``
  (docs/search.md, "Scoring in the optimiser's geometry"). On the development set it moved exports
  toward the planted shares (fastmix_dev.md: L1 0.128 against 0.172, closer on 19 of 24); if the
  overshoot comes from scoring in the wrong geometry, it should move the export toward the pick too.

Per (cell, seed), seeds 1-5 (the judge's evaluation seeds; searches at the judge's settings, the
defaults' search read from its cache, or re-run there when the search package changed since the judge,
and then checked against the judge's export, ``as_judged``): each variant's export, its L1 to the
grid's pick (fixed from seeds 0-9, ``run_quality.grid_pick``) against the defaults' L1 to it. On
planted targets also each export's L1 to the planted token shares; ``stdlib-K3 planted`` is run
(defaults and ``adam-precond`` only) for that L1 alone, not for the rule. Weights only: no final runs.

**Rule** (written before the runs): a variant earns a final-run study only if its export is closer
(L1) to the grid's pick than the defaults' on at least 4 of 5 seeds in BOTH cells. A variant that
moves away from the pick cannot lower the regret there, whatever its final loss elsewhere. The same
rule, unchanged, for ``adam-precond`` (fixed before its runs); the L1 to the planted shares is
reported, not part of the rule.

**Final-run stage** (``--final``; issue 13, fixed by the lead before any of its runs): for the variants
that earned it (:func:`summarise`'s rule on the committed units, not named by hand), on
:data:`FINAL_CELLS` and the judge's evaluation seeds 1-9, at the judge's settings and caches: the
variant's search (cached for seeds 1-5), one final run at its export per seed, and its regret against
the grid's pick (final loss − the pick's final loss, same seed, as the judge computes it), paired with
the defaults' regret on the same seeds (the judge's exports and final runs, read from its caches and
checked against results.json, ``extension_seeds.check_cache``). This stage does NOT change any default
(the development set's rule decided that, fastmix_dev.md). It reports, per cell, the variant's regret
mean ± SE, the defaults' on the same seeds, the paired difference ± SE with wins, and the judge's
classification of the variant's regret (``report.verdict``: MET / MISSED / undecided by mean ± 2 SE
against 0.005). Nothing else is claimed.
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
import export_rule as er  # noqa: E402
import extension_seeds as es  # noqa: E402
import run_quality as rq  # noqa: E402
from report import FASTMIX_REGRET, verdict  # noqa: E402
from run_quality import grid_pick, judge_args  # noqa: E402

CELLS = (("stdlib-K3", "heldout"), ("system-K3", "planted"))  # the rule's cells
L1_CELLS = (("stdlib-K3", "planted"),)  # reported for the L1 to the planted shares only, not the rule's
L1_VARIANTS = ("adam-precond",)  # the variants searched in L1_CELLS (besides the defaults)
SEEDS = (1, 2, 3, 4, 5)
FINAL_CELLS = (("stdlib-K3", "heldout"), ("stdlib-K3", "planted"), ("system-K3", "planted"))
FINAL_SEEDS = tuple(range(1, 10))  # the judge's evaluation seeds
NAME = "direction_pilot"


def variant_overrides(name: str, export: dict) -> dict:
    """The ``fastmix`` section overrides of a variant; ``export``: the defaults' weights, same seed."""
    if name == "full-hypergrad":
        return {"hypergrad": "full", "search_batch": "buffer"}
    if name == "serve-own-export":
        return {"serve_weights": export, "init_weights": export}
    if name == "adam-precond":
        return {"precondition": True}
    raise ValueError(f"unknown variant {name!r}")


VARIANTS = ("full-hypergrad", "serve-own-export", "adam-precond")


def cell_variants(exp: str, target: str) -> tuple[str, ...]:
    return VARIANTS if (exp, target) in CELLS else L1_VARIANTS


def cell_units(results: dict, exp: str, target: str, seeds: list[int], work: str | None = None) -> list[dict]:
    """The cell's searches per seed, in the judge's cache folder (or ``work``, a copy of it)."""
    run = judge_args(results, exp)
    run.work = work or run.work
    data = rq.prepare(Path(run.work), run)[exp]  # the judge's sources and targets
    judged = {r["seed"]: r["weights"] for r in results["runs"]
              if (r["exp"], r["target"], r["method"]) == (exp, target, "fastmix")}
    pick, planted = grid_pick(results, exp, target), data["planted_tokens"] if target == "planted" else None
    units = []
    for seed in seeds:
        w = {"defaults": rq.run_search_cached(Path(run.work), exp, "fastmix", target, seed, data, run)["weights"]}
        for v in cell_variants(exp, target):
            w[v] = rq.run_search_cached(Path(run.work), exp, "fastmix", target, seed, data, run,
                                        overrides=variant_overrides(v, w["defaults"]), tag=f"-{v}")["weights"]
        units.append(make_unit(exp, target, seed, w, pick, planted, judged.get(seed)))
        rq.log(f"{exp}/{target} s{seed} " + "  ".join(f"{n} L1 {d:.3f}" for n, d in units[-1]["l1_to_pick"].items()))
    return units


def make_unit(exp: str, target: str, seed: int, w: dict, pick: dict, planted: dict | None, judged: dict | None) -> dict:
    """``as_judged``: the defaults' export is the judge's (results.json) for this seed, to the last bit."""
    u = {"exp": exp, "target": target, "seed": seed, "pick": pick, "weights": w, "as_judged": w["defaults"] == judged,
         "l1_to_pick": {n: rq.l1(x, pick) for n, x in w.items()}}
    if planted is not None:
        u |= {"planted": planted, "l1_to_planted": {n: rq.l1(x, planted) for n, x in w.items()}}
    return u


def search_summary(us: list[dict], n: str) -> dict:
    """Search ``n`` over a cell's seeds: mean export, mean L1 to the pick, seeds closer to it than the
    defaults; on planted cells the L1 to the planted shares (mean, SD) and seeds closer to them."""
    s = {"weights": {k: float(np.mean([u["weights"][n][k] for u in us])) for k in us[0]["pick"]},
         "l1_to_pick": float(np.mean([u["l1_to_pick"][n] for u in us])),
         "closer": sum(u["l1_to_pick"][n] < u["l1_to_pick"]["defaults"] for u in us)}
    if "l1_to_planted" in us[0]:
        s |= {"l1_to_planted": rq._ms([u["l1_to_planted"][n] for u in us]),
              "closer_to_planted": sum(u["l1_to_planted"][n] < u["l1_to_planted"]["defaults"] for u in us)}
    return s


def summarise(units: list[dict]) -> dict:
    out = {}
    for exp, target in CELLS + L1_CELLS:
        us = [u for u in units if (u["exp"], u["target"]) == (exp, target)]
        if us:
            out[f"{exp}/{target}"] = {"pick": us[0]["pick"], "n": len(us), "rule": (exp, target) in CELLS,
                                      **{n: search_summary(us, n) for n in us[0]["weights"]}}
    rule = [out.get(f"{exp}/{target}") for exp, target in CELLS]  # the rule needs both cells
    keep = [v for v in VARIANTS if all(c and c[v]["closer"] >= 4 for c in rule)]
    return {"cells": out, "earns_final_runs": keep, "as_judged": [sum(u["as_judged"] for u in units), len(units)]}


# ============================================================================ the final-run stage


def final_units(results: dict, exp: str, target: str, seeds: list[int], variants: list[str],
                work: str | None = None) -> list[dict]:
    """Per seed: the defaults' (the judge's export) and the pick's final runs, from the judge's caches and
    checked against results.json; each variant's search and a final run at its export (losses: ``target``'s)."""
    run = judge_args(results, exp)
    run.work = work or run.work
    data, pick = rq.prepare(Path(run.work), run)[exp], grid_pick(results, exp, target)
    units = []
    for seed in seeds:
        mix = {"fastmix": es._judge_row(results, exp, target, "fastmix", seed)["weights"], "pick": pick}
        if target == "planted":
            mix["planted"] = data["planted_tokens"]
        finals = {n: rq.final_run(Path(run.work), data, w, seed, run) for n, w in mix.items()}
        u = {"exp": exp, "target": target, "seed": seed, "weights": mix, "search_cached": True,  # the judge's export
             "losses": {n: f["losses"][target] for n, f in finals.items()},
             "final_cached": {n: f["cached"] for n, f in finals.items()}}
        es.check_cache(results, [u])  # the defaults' and the pick's losses are results.json's
        for v in variants:
            s = rq.run_search_cached(Path(run.work), exp, "fastmix", target, seed, data, run,
                                     overrides=variant_overrides(v, mix["fastmix"]), tag=f"-{v}")
            f = rq.final_run(Path(run.work), data, s["weights"], seed, run)
            u["weights"][v], u["losses"][v], u["final_cached"][v] = s["weights"], f["losses"][target], f["cached"]
        units.append(u)
        rq.log(f"final {exp}/{target} s{seed} regret defaults {u['losses']['fastmix'] - u['losses']['pick']:+.4f} "
               + " ".join(f"{v} {u['losses'][v] - u['losses']['pick']:+.4f}" for v in variants))
    return units


def final_summary(units: list[dict], variants: list[str], seeds: tuple = FINAL_SEEDS) -> dict:
    """Per cell and variant: its regret, the defaults' on the same seeds, the paired difference (wins: seeds
    where the variant's final loss is lower) and the judge's classification of its regret. Every cell of
    :data:`FINAL_CELLS` must have exactly ``seeds``."""
    out = {}
    for exp, target in FINAL_CELLS:
        us = sorted((u for u in units if (u["exp"], u["target"]) == (exp, target)), key=lambda u: u["seed"])
        if [u["seed"] for u in us] != sorted(seeds):
            raise ValueError(f"{exp}/{target}: final runs for seeds {[u['seed'] for u in us]}, expected {sorted(seeds)}")
        base = er.paired(us, "fastmix", "pick")
        out[f"{exp}/{target}"] = {v: {"regret": (r := er.paired(us, v, "pick")), "defaults_regret": base,
                                      "diff": er.paired(us, v, "fastmix"),
                                      "verdict": verdict(r["mean"], r["se"], FASTMIX_REGRET),
                                      "weights": {k: float(np.mean([u["weights"][v][k] for u in us]))
                                                  for k in us[0]["weights"]["fastmix"]}} for v in variants}
    return out


def defaults_check(results: dict, units: list[dict]) -> list[int]:
    """(equal, total): (cell, seed) pairs whose defaults' regret here equals the judge's (results.json:
    FastMix's final loss − the held-out oracle's on that seed) to the last bit."""
    judge = {(u["exp"], u["target"], u["seed"]): u["losses"]["fastmix"] - u["losses"]["pick"]
             for exp, target in FINAL_CELLS for u in es.judge_units(results, exp, target)}
    same = [judge[u["exp"], u["target"], u["seed"]] == u["losses"]["fastmix"] - u["losses"]["pick"] for u in units]
    return [sum(same), len(same)]


def render_final(final: dict) -> list[str]:
    m, rows = final["meta"], []
    for cell, c in final["summary"].items():
        for v, d in c.items():
            rows.append([cell, v, ", ".join(f"{k} {x:.2f}" for k, x in d["weights"].items()), f"**{es._pm(d['regret'])}**",
                         es._pm(d["defaults_regret"]), f"{es._pm(d['diff'])}", f"{d['diff']['wins']}/{d['diff']['n']}",
                         f"**{d['verdict']}**"])
    same, total = final["defaults_equal_judge"]
    return [
        "## Final-run stage (generated by `direction_pilot.py --final`)", "",
        f"- run: {m['date']}, commit {m['commit']}, `{m['command']}` (under `nice -n {m['nice']}`, torch threads 1); "
        f"wall {m['wall_s'] / 60:.1f} min; load average at start / end {m['load_start']} / {m['load_end']}",
        f"- variants (earned by the rule above, computed from the committed units): {', '.join(final['variants'])}; "
        f"seeds {m['seeds']} (the judge's evaluation seeds); the judge's settings and caches",
        f"- final runs trained / from the cache: {final['trained']} / {final['from_cache']}",
        f"- the defaults' regret equals the judge's (results.json) on {same} of {total} (cell, seed) pairs", "",
        "**Rule** (fixed before any run): this stage changes no default. Per cell: the variant's regret against the "
        "grid's pick, the defaults' on the same seeds, the paired difference (variant − defaults; wins: seeds where "
        f"the variant's final loss is lower), and the judge's classification of the variant's regret: MET if mean + "
        f"2 SE ≤ {FASTMIX_REGRET}, MISSED if mean − 2 SE > {FASTMIX_REGRET}, else undecided. Nothing else is claimed.", "",
        _common.markdown_table(["cell", "search", "export (mean)", "regret ± SE", "defaults' regret ± SE",
                                "paired diff ± SE", "variant better", "classification"], rows, "llrrrrrc"), "",
    ]


def run_final(args, results: dict, works: dict, out: Path) -> None:
    """The final-run stage; with fewer than all :data:`FINAL_SEEDS` (a part run side by side with
    another) only the caches are written; with all of them, the report."""
    seeds = sorted(args.seeds or FINAL_SEEDS)
    saved = json.loads((out / f"{NAME}.json").read_text())
    variants = summarise(saved["units"])["earns_final_runs"]
    t0, load0 = time.perf_counter(), rq._uptime()
    units = [u for exp, target in FINAL_CELLS
             for u in final_units(results, exp, target, seeds, variants, works.get(exp))]
    if seeds != sorted(FINAL_SEEDS):
        rq.log(f"part run, seeds {seeds}: caches written, no report ({(time.perf_counter() - t0) / 60:.1f} min)")
        return
    cached = [c for u in units for n, c in u["final_cached"].items() if n in variants]
    saved["final"] = {"meta": rq.run_meta(t0, load0, nice=os.nice(0), seeds=seeds), "variants": variants,
                      "summary": final_summary(units, variants), "defaults_equal_judge": defaults_check(results, units),
                      "trained": cached.count(False), "from_cache": cached.count(True), "units": units}
    _common.write_atomic(str(out / f"{NAME}.json"), json.dumps(saved, indent=1))
    render(saved, out)
    rq.log(f"final stage done in {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")


def _row(cell: str, c: dict, n: str) -> list[str]:
    planted = c[n].get("l1_to_planted")
    return [cell + ("" if c["rule"] else " (L1 to planted only)"), n,
            ", ".join(f"{k} {v:.2f}" for k, v in c[n]["weights"].items()), f"{c[n]['l1_to_pick']:.3f}",
            "–" if n == "defaults" or not c["rule"] else f"{c[n]['closer']}/{c['n']}",
            f"{planted[0]:.3f} ± {planted[1]:.3f}" if planted else "–",
            f"{c[n]['closer_to_planted']}/{c['n']}" if planted and n != "defaults" else "–"]


def render(saved: dict, out: Path) -> None:
    m, s = saved["meta"], saved["summary"]
    rows = [_row(cell, c, n) for cell, c in s["cells"].items() for n in c if n not in ("pick", "n", "rule")]
    same, total = s["as_judged"]
    lines = [
        "# Direction pilot: FastMix's signal variants against the grid's pick (generated by `direction_pilot.py`)", "",
        f"- machine: {m['machine']}",
        f"- run: {m['date']}, commit {m['commit']}, `{m['command']}` (under `nice -n {m['nice']}`, torch threads 1); "
        f"wall {m['wall_s'] / 60:.1f} min; load average at start / end {m['load_start']} / {m['load_end']}",
        f"- seeds {m['seeds']}; the judge's run settings and caches; weights only (no final runs)",
        f"- the defaults' export equals the judge's (results.json) on {same} of {total} (cell, seed) pairs", "",
        "**Rule** (in the script before the runs): a variant earns a final-run study only if its export is closer "
        "(L1) to the grid's pick than the defaults' on at least 4 of 5 seeds in both cells "
        f"({', '.join(f'{e}/{t}' for e, t in CELLS)}). The L1 to the planted token shares is reported, not ruled on.", "",
        _common.markdown_table(["cell", "search", "export (mean)", "L1 to the grid's pick (mean)",
                                "closer than the defaults", "L1 to the planted shares (mean ± SD)",
                                "closer to planted than the defaults"], rows, "llrrrrr"), "",
        f"**Earns a final-run study: {', '.join(s['earns_final_runs']) or 'none'}.**", "",
        *(render_final(saved["final"]) if "final" in saved else []),
    ]
    path = out / f"{NAME}.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", help=f"default: {SEEDS}; --final: {FINAL_SEEDS}")
    ap.add_argument("--results", default=str(HERE / "results.json"), help="the judge's results.json")
    ap.add_argument("--out", default=str(HERE), help=f"where {NAME}.json/.md go")
    ap.add_argument("--work", nargs="+", metavar="EXP=WORK", default=[],
                    help="run EXP's searches in WORK, a copy of the judge's cache folder (its caches are written)")
    ap.add_argument("--final", action="store_true", help="the final-run stage (module docstring), for the variants "
                    f"that earned it, in {NAME}.json (read and updated in --out)")
    args = ap.parse_args(argv)
    works = dict(spec.partition("=")[::2] for spec in args.work)
    if any(e not in {c[0] for c in CELLS + L1_CELLS} or not w for e, w in works.items()):
        raise SystemExit(f"--work {args.work}: expected EXP=WORK with EXP one of stdlib-K3, system-K3")
    import torch

    torch.set_num_threads(1)
    results = json.loads(Path(args.results).read_text())
    if args.final:
        run_final(args, results, works, Path(args.out))
        return
    args.seeds = args.seeds or list(SEEDS)
    t0, load0 = time.perf_counter(), rq._uptime()
    units = [u for exp, target in CELLS + L1_CELLS
             for u in cell_units(results, exp, target, sorted(args.seeds), works.get(exp))]
    meta = rq.run_meta(t0, load0, nice=os.nice(0), seeds=sorted(args.seeds))
    saved = {"meta": meta, "summary": summarise(units), "units": units}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _common.write_atomic(str(out / f"{NAME}.json"), json.dumps(saved, indent=1))
    render(saved, out)
    rq.log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
