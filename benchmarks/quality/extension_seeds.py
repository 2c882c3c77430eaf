"""Extension seeds: the judge's three undecided FastMix regret checks, decided on 30 more seeds.

The judge (``run_quality.py``, results.md: 1M-token final runs, seeds 0-9, the held-out oracle)
finds FastMix's regret against the grid at its defaults +0.0111 +- 0.0051 (stdlib-K3 held-out),
+0.0051 +- 0.0051 (stdlib-K3 planted) and +0.0111 +- 0.0050 (system-K3 planted) nats, target
<= 0.005: none is decided. (system-K3's held-out target, pymeta, has no mixture effect and is a
noise test; it is not one of the cells.) This study adds seeds to those three cells only.

Protocol:

* **Cells** (:data:`CELLS`): (stdlib-K3, heldout), (stdlib-K3, planted), (system-K3, planted).
* **Seeds** (:data:`EXTENSION_SEEDS`): 10-39, disjoint from the judge's 0-9 (the script refuses a
  judge seed except in ``--check-cache``). Run in increasing order; the results are written after
  every seed, so a stopped run is a usable prefix (its n is reported).
* **Run settings and caches: the judge's**, read from results.json's ``meta`` (the recorded arguments
  of the run that produced each experiment: ``--final-tokens 1048576``, system-K3 with
  ``--system-heldout pymeta``, torch threads 1, its ``--work`` folder, whose caches hold seeds 0-9).
* **Per (cell, seed)**, all with the same seed (model init = data order = seed: paired):
  FastMix at its defaults (``run_quality.run_search_cached``, ``max_tokens`` = one final run) and a
  final run on its export (``run_quality.final_run``); a final run on **the grid's pick**; on planted
  targets a final run on the planted mixture itself. One final run scores every target, and the
  final runs are cached by mixture and seed, so a mixture shared by two cells of a corpus trains once.
* **The grid's pick** (:func:`grid_pick`) is fixed from the judge's seeds 0-9, read from
  results.json's summary: the grid point with the best mean final loss over seeds 0-9 (the oracle's
  ``in_sample`` weights: what a grid search over those seeds selects), which must also be the held-out
  oracle's pick on every evaluation seed (otherwise the script stops). Out of sample: no extension
  seed takes part in choosing it.
* **Regret** per seed = FastMix's final loss − the pick's final loss on that seed. Reported per cell:
  n, mean +- SE over the extension seeds (**the decisive figure**); for reference the same pooled
  with the judge's evaluation seeds 1-9 (their held-out-oracle regret) and the judge's alone;
  FastMix's mean weights; on planted cells FastMix's L1 to the planted token shares (mean +- SE) and
  the planted mixture's own regret.

**Decision rule** (fixed and committed, with this script alone, before any run; no change of seeds,
cells or rule after the figures are seen): over the extension seeds only, with LIMIT = 0.005 nats
(``report.FASTMIX_REGRET``, the issue's target), a cell's check is

* **MET** if mean + 2 SE <= LIMIT,
* **MISSED** if mean − 2 SE > LIMIT,
* **undecided** otherwise (``report.verdict``).

**Stage 2** (``--stage 2``; :data:`STAGES`; written and committed before any of its runs, after stage 1
was seen): stage 1 left (system-K3, planted) undecided (+0.0118 +- 0.0036 on seeds 10-39, mean − 2 SE
= +0.0046). Stage 2 runs that cell alone on 30 fresh seeds, 40-69, everything else as above, and
decides it **on seeds 40-69 alone** by the same rule: a fresh sample, so the second look does not bias
the test. The pooled 10-69 figure is reported for reference only. Its files are
``extension_seeds_stage2.json/.md``. If stage 2 is undecided too, the cell stays undecided.

``--check-cache --seeds 1`` first: a judge seed through the same code must hit every cache (FastMix
searches ``cached_only``; final runs cached) and reproduce results.json's losses, or the script stops
-- a changed cache fingerprint would retrain everything. ``--merge`` joins the results of processes
run side by side (e.g. even and odd seeds) into one report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE)]
import _common  # noqa: E402
import export_rule as er  # noqa: E402
import run_quality as rq  # noqa: E402
from report import FASTMIX_REGRET, verdict  # noqa: E402
from run_quality import grid_pick, judge_args  # noqa: E402

#: the judge's undecided FastMix regret checks: experiment -> its targets
CELLS = {"stdlib-K3": ("heldout", "planted"), "system-K3": ("planted",)}
EXTENSION_SEEDS = tuple(range(10, 40))
LIMIT = FASTMIX_REGRET
NAME = "extension_seeds"


class Stage(NamedTuple):
    """One pre-registered run of the study: its cells, its seeds, and the name of its files."""

    cells: dict
    seeds: tuple
    name: str
    title: str


STAGES = {1: Stage(CELLS, EXTENSION_SEEDS, NAME, "the judge's three undecided FastMix regret checks"),
          2: Stage({"system-K3": ("planted",)}, tuple(range(40, 70)), f"{NAME}_stage2",
                   "stage 2, the check stage 1 left undecided (system-K3 planted), on 30 fresh seeds")}


# ============================================================================ the judge's record


def _judge_row(results: dict, exp: str, target: str, method: str, seed: int, weights: dict | None = None) -> dict:
    rows = [r for r in results["runs"] if (r["exp"], r["target"], r["method"], r["seed"]) == (exp, target, method, seed)
            and (weights is None or r["weights"] == weights)]
    if len(rows) != 1:
        raise ValueError(f"results.json: {len(rows)} runs of {exp}/{target} {method} seed {seed} (expected 1)")
    return rows[0]


def judge_units(results: dict, exp: str, target: str) -> list[dict]:
    """The judge's evaluation seeds as units: FastMix's final loss and the held-out oracle's (= the pick's)."""
    by_seed = results["summary"][exp]["targets"][target]["oracle"]["by_seed"]
    units = []
    for s, pick_loss in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
        losses = {"fastmix": _judge_row(results, exp, target, "fastmix", int(s))["final_loss"], "pick": pick_loss}
        if target == "planted":
            losses["planted"] = _judge_row(results, exp, target, "planted", int(s))["final_loss"]
        units.append({"exp": exp, "target": target, "seed": int(s), "losses": losses})
    return units


# ============================================================================ runs


def fastmix_search(work: Path, exp: str, target: str, seed: int, data: dict, run, cached_only: bool) -> tuple:
    """FastMix at its defaults, exactly as the judge runs it, and whether it came from the cache."""
    try:
        return rq.run_search_cached(work, exp, "fastmix", target, seed, data, run, cached_only=True), True
    except FileNotFoundError:
        if cached_only:
            raise
        return rq.run_search_cached(work, exp, "fastmix", target, seed, data, run), False


def seed_units(exp: str, seed: int, data: dict, run, picks: dict, cached_only: bool = False,
               cells: dict = CELLS) -> list[dict]:
    """One seed of every cell of ``exp``: FastMix's search and final run, the pick's and (planted) the
    planted mixture's final runs, all with ``seed``."""
    work, units = Path(run.work), []
    for t in cells[exp]:
        s, hit = fastmix_search(work, exp, t, seed, data, run, cached_only)
        mix = {"fastmix": s["weights"], "pick": picks[exp, t]}
        if t == "planted":
            mix["planted"] = data["planted_tokens"]
        finals = {n: rq.final_run(work, data, w, seed, run) for n, w in mix.items()}
        u = {"exp": exp, "target": t, "seed": seed, "weights": mix,
             "losses": {n: f["losses"][t] for n, f in finals.items()}, "search_cached": hit,
             "final_cached": {n: f["cached"] for n, f in finals.items()},
             "search_wall_s": s["wall_s"], "final_wall_s": {n: f["wall_s"] for n, f in finals.items()},
             "updates": s["details"].get("updates")}
        if t == "planted":
            u["l1"] = rq.l1(s["weights"], data["planted_tokens"])
        units.append(u)
        rq.log(f"{exp} {t:8s} s{seed} " + " ".join(f"{n}={x:.4f}" for n, x in u["losses"].items())
               + f"  regret {u['losses']['fastmix'] - u['losses']['pick']:+.4f}"
               + ("" if hit else f"  ({s['wall_s']:.0f}s search)"))
    return units


def check_cache(results: dict, units: list[dict]) -> None:
    """A judge seed's units must come wholly from the caches and give results.json's losses."""
    for u in units:
        exp, t, seed = u["exp"], u["target"], u["seed"]
        want = {"fastmix": _judge_row(results, exp, t, "fastmix", seed)["final_loss"],
                "pick": _judge_row(results, exp, t, "grid-point", seed, u["weights"]["pick"])["final_loss"]}
        if t == "planted":
            want["planted"] = _judge_row(results, exp, t, "planted", seed)["final_loss"]
        bad = {n: (u["losses"][n], x) for n, x in want.items() if abs(u["losses"][n] - x) > 1e-9}
        trained = [n for n, c in u["final_cached"].items() if not c]
        if not u["search_cached"] or trained or bad:
            raise RuntimeError(f"cache check {exp}/{t} seed {seed}: search cached {u['search_cached']}, final runs "
                               f"trained {trained}, losses (got, judge's) that differ {bad}")
        rq.log(f"cache check {exp}/{t} seed {seed}: every run from the cache, losses equal to results.json's")


# ============================================================================ summary


def _mean_se(x: list[float]) -> dict:
    ms = rq._ms(x)
    return {"n": len(x), "mean": ms[0], "se": ms[1] / np.sqrt(len(x)) if len(x) > 1 else float("nan")}


def cell_summary(units: list[dict], judge: list[dict], earlier: list[dict] = ()) -> dict:
    """The figures of one cell (module docstring); ``verdict`` over this stage's seeds only; with
    ``earlier`` (the earlier stages' units of the cell), their pooled regret for reference."""
    reg = er.paired(units, "fastmix", "pick")
    d = {"seeds": sorted(u["seed"] for u in units), "regret": reg, "verdict": verdict(reg["mean"], reg["se"], LIMIT),
         "judge_regret": er.paired(judge, "fastmix", "pick"), "pooled_regret": er.paired(judge + units, "fastmix", "pick"),
         "loss": {n: _mean_se([u["losses"][n] for u in units]) for n in units[0]["losses"]},
         "fastmix_weights": {k: float(np.mean([u["weights"]["fastmix"][k] for u in units]))
                             for k in units[0]["weights"]["fastmix"]},
         "pick": units[0]["weights"]["pick"]}
    if earlier:
        d["stages_pooled_regret"] = er.paired(list(earlier) + units, "fastmix", "pick")
    if "l1" in units[0]:
        d["l1_to_planted"] = _mean_se([u["l1"] for u in units])
        d["planted_regret"] = er.paired(units, "planted", "pick")
        d["planted_judge_regret"] = er.paired(judge, "planted", "pick")
    return d


def summarise(units: list[dict], results: dict, cells: dict = CELLS, earlier: list[dict] = ()) -> dict:
    out = {}
    for exp, targets in cells.items():
        for t in targets:
            us = sorted((u for u in units if (u["exp"], u["target"]) == (exp, t)), key=lambda u: u["seed"])
            if us:
                before = [u for u in earlier if (u["exp"], u["target"]) == (exp, t)]
                out[f"{exp}/{t}"] = cell_summary(us, judge_units(results, exp, t), before)
    return out


def earlier_units(stage: Stage) -> list[dict]:
    """The committed results of the stages before ``stage`` (their units), read from this folder."""
    names = [s.name for s in STAGES.values() if s.seeds[0] < stage.seeds[0]]
    return [u for n in names for u in json.loads((HERE / f"{n}.json").read_text())["units"]]


# ============================================================================ report


def _pm(p: dict, signed: bool = True) -> str:
    return f"{p['mean']:{'+' if signed else ''}.4f} ± {p['se']:.4f}"


def _parts(meta: dict) -> list[str]:
    lines = []
    for m in meta.get("parts", [meta]):
        lines += [f"- run: {m['date']}, commit {m['commit']}, `{m['command']}` (under `nice -n {m['nice']}`, torch "
                  f"threads {m['threads']}); seeds done {m['seeds_done']}; wall {m['wall_s'] / 60:.1f} min; load "
                  f"average at start / end {m['load_start']} / {m['load_end']}"]
    return lines


def render(saved: dict, out: Path, stage: Stage = STAGES[1]) -> None:
    m, s, units = saved["meta"], saved["summary"], saved["units"]
    one = m.get("parts", [m])[0]
    rows, detail = [], []
    for cell, d in s.items():
        r, j, p = d["regret"], d["judge_regret"], d["pooled_regret"]
        rows.append([cell, r["n"], f"**{_pm(r)}**", f"**{d['verdict']}**", f"{r['wins']}/{r['n']}",
                     f"{_pm(j)} (n {j['n']})", f"{_pm(p)} (n {p['n']})"])
        detail.append([cell, ", ".join(f"{k} {v:.1f}" for k, v in d["pick"].items()),
                       f"{d['loss']['fastmix']['mean']:.4f} / {d['loss']['pick']['mean']:.4f}",
                       ", ".join(f"{k} {v:.2f}" for k, v in d["fastmix_weights"].items()),
                       f"{d['l1_to_planted']['mean']:.3f} ± {d['l1_to_planted']['se']:.3f}" if "l1_to_planted" in d
                       else "–",
                       f"{_pm(d['planted_regret'])} (judge's 1-9: {_pm(d['planted_judge_regret'])})"
                       if "planted_regret" in d else "–"])
    seeds = sorted({u["seed"] for u in units})
    per_seed = [[sd, *(next((f"{u['losses']['fastmix'] - u['losses']['pick']:+.4f}" for u in units
                             if f"{u['exp']}/{u['target']}" == c and u["seed"] == sd), "–") for c in s)] for sd in seeds]
    lines = [
        f"# Extension seeds: {stage.title} (generated by `extension_seeds.py`)", "",
        f"- machine: {one['machine']}", *_parts(m),
        f"- searches run / from the cache: {sum(not u['search_cached'] for u in units)} / "
        f"{sum(u['search_cached'] for u in units)}; final runs trained / from the cache (a mixture shared by two "
        f"cells trains once): {sum(not c for u in units for c in u['final_cached'].values())} / "
        f"{sum(c for u in units for c in u['final_cached'].values())}",
        f"- run settings: the judge's (results.json's recorded arguments): final run = search budget = "
        f"{one['final_tokens']:,} tokens, batch {one['batch_size']} x {one['seq_len']}, proxy `{one['proxy']}`, "
        f"caches {', '.join(f'`{w}`' for w in one['work'].values())}",
        f"- seeds: {seeds[0]}-{seeds[-1]} ({len(seeds)}), disjoint from the judge's 0-9; the grid's pick fixed from "
        "seeds 0-9 (results.json); regret = FastMix − pick, paired by seed", "",
        f"**Rule** (committed with the script before any run of the stage): over this stage's seeds only, MET if mean + 2 SE ≤ "
        f"{LIMIT}, MISSED if mean − 2 SE > {LIMIT}, else undecided.", "",
        "## FastMix's regret against the grid's pick", "",
        _common.markdown_table(["cell", "n", "regret ± SE (extension seeds)", "verdict", "FastMix better",
                                "judge's seeds 1-9 (reference)", "pooled with 1-9 (reference)"], rows,
                               "lrrcrrr"), "",
        *[line for cell, d in s.items() if "stages_pooled_regret" in d
          for line in (f"- {cell}, pooled with the earlier stages (reference, not the decision): "
                       f"{_pm(d['stages_pooled_regret'])} (n {d['stages_pooled_regret']['n']})", "")],
        "## Mixtures", "",
        _common.markdown_table(["cell", "grid's pick (seeds 0-9)", "mean final loss FastMix / pick",
                                "FastMix weights (mean)", "FastMix L1 to planted ± SE", "planted mixture's regret ± SE"],
                               detail, "llrlrr"), "",
        "## Regret per seed", "",
        _common.markdown_table(["seed", *s], per_seed, "r" * (1 + len(s))), "",
    ]
    path = out / f"{stage.name}.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


def write(out: Path, meta: dict, units: list[dict], results: dict, stage: Stage = STAGES[1]) -> None:
    saved = {"meta": meta, "summary": summarise(units, results, stage.cells, earlier_units(stage)), "units": units}
    out.mkdir(parents=True, exist_ok=True)
    _common.write_atomic(str(out / f"{stage.name}.json"), json.dumps(saved, indent=1))
    render(saved, out, stage)


def merge(paths: list[str]) -> tuple[dict, list[dict]]:
    """The units and run records of several processes' results (each (cell, seed) once)."""
    loaded = [json.loads(Path(p).read_text()) for p in paths]
    units = [u for saved in loaded for u in saved["units"]]
    keys = [(u["exp"], u["target"], u["seed"]) for u in units]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--merge {paths}: a (cell, seed) appears twice: {sorted(k for k in keys if keys.count(k) > 1)}")
    return {"parts": [m for saved in loaded for m in saved["meta"].get("parts", [saved["meta"]])]}, units


# ============================================================================ main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", type=int, choices=sorted(STAGES), default=1, help="which pre-registered stage "
                    "(module docstring): its cells, seeds and files")
    ap.add_argument("--seeds", type=int, nargs="+", help="run in increasing order (default: the stage's seeds)")
    ap.add_argument("--results", default=str(HERE / "results.json"), help="the judge's results.json")
    ap.add_argument("--out", default=str(HERE), help="where the stage's .json/.md go")
    ap.add_argument("--check-cache", action="store_true", help="judge seeds only: every run must come from the "
                    "judge's caches and reproduce results.json's losses (nothing is written)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="one .json/.md of the stage from these runs' results")
    ap.add_argument("--from-results", action="store_true", help="re-render the stage's .md from its .json")
    args = ap.parse_args(argv)
    stage = STAGES[args.stage]
    out, results = Path(args.out), json.loads(Path(args.results).read_text())
    if args.from_results:
        render(json.loads((out / f"{stage.name}.json").read_text()), out, stage)
        return
    if args.merge:
        write(out, *merge(args.merge), results, stage)
        return
    runs = {exp: judge_args(results, exp) for exp in stage.cells}
    seeds = sorted(args.seeds or stage.seeds)
    judge_seeds = set().union(*(r.seeds for r in runs.values()))
    overlap = sorted(set(seeds) & judge_seeds)
    if args.check_cache != bool(overlap) or (args.check_cache and overlap != seeds):
        raise SystemExit(f"--seeds {seeds}: the judge's seeds {sorted(judge_seeds)} only with --check-cache, "
                         "and --check-cache only with them")
    if not args.check_cache and not set(seeds) <= set(stage.seeds):
        raise SystemExit(f"--seeds {seeds}: stage {args.stage} runs seeds {stage.seeds[0]}-{stage.seeds[-1]} only")
    run_seeds(args, results, runs, seeds, out, stage)


def run_seeds(args, results: dict, runs: dict, seeds: list[int], out: Path, stage: Stage = STAGES[1]) -> None:
    """Every cell for each seed in increasing order; the results written after every seed."""
    import torch

    torch.set_num_threads(max(r.threads for r in runs.values()))
    t0, load0 = time.perf_counter(), rq._uptime()
    picks = {(exp, t): grid_pick(results, exp, t) for exp, targets in stage.cells.items() for t in targets}
    data = {exp: rq.prepare(Path(r.work), r)[exp] for exp, r in runs.items()}
    one = next(iter(runs.values()))
    units = []
    for seed in seeds:
        for exp, r in runs.items():
            units += seed_units(exp, seed, data[exp], r, picks, cached_only=args.check_cache, cells=stage.cells)
        if args.check_cache:
            check_cache(results, [u for u in units if u["seed"] == seed])
            continue
        meta = rq.run_meta(t0, load0, nice=os.nice(0), threads=one.threads, seeds=seeds,
                           seeds_done=sorted({u["seed"] for u in units}), work={e: r.work for e, r in runs.items()},
                           **{k: getattr(one, k) for k in ("final_tokens", "batch_size", "seq_len", "proxy")})
        write(out, meta, units, results, stage)
    rq.log(f"done in {(time.perf_counter() - t0) / 60:.1f} min" + ("" if args.check_cache else f"; wrote {out}"))


if __name__ == "__main__":
    main()
