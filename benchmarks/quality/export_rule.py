"""Which mixture FastMix exports: a development study on target definitions the quality benchmark does not use.

The quality benchmark (``run_quality.py``) is the judge of issue 13; choosing ``fastmix.final`` on
its targets would fit the rule to the judge's data. This study chooses it on other targets and
other seeds, and the judge is run afterwards.

Protocol:

* **Targets** (``DEV_EXPERIMENTS``): four K = 3 experiments on the same two corpora, each with a
  held-out domain and a planted mixture as targets, none of them a judge target -- other held-out
  domains, other source sets, other planted proportions (``test_export_rule.py`` checks this).
  Disjoint as definitions and seeds, not as documents: both sides draw their test texts from the
  same corpora's test splits (dev-stdlib-B's held-out markup and dev-system-B's manpages are also
  in the judge's ``average`` targets, and planted sets on both sides sample the same splits).
* **Runs**, exactly as the judge's: for each (target, seed) one FastMix search at its defaults
  with ``max_tokens`` = one final run (``run_quality.run_search_cached``, the judge's run settings
  from ``run_quality.build_parser``), then one final run from scratch on each candidate export
  (``run_quality.final_run``), scored on the target's test split. Seeds 100-109 (the judge's: 0-5).
* **Candidates**: the search's own ``average`` (over all updates), ``tail`` (the last half) and
  ``last``, and ``bestval``: the mixture after the update with the lowest target loss the search
  measured anyway (``target_loss`` in ``trajectory.jsonl``, no extra compute).
* **Compared** by the paired difference of final losses against ``average`` (same search, same
  seed, same final-run seed): mean +- SE and wins, per target and pooled over all (target, seed).
  Seeds 100-109: ten, for a pooled SE well below the 0.005-nat scale of the issue's target.
* **Rule** (fixed before the runs, :func:`decide`): a candidate replaces ``average`` only if its
  pooled paired difference is below zero by more than 2 SE; of several, the lowest mean, and a
  candidate with a parameter (``tail``) or a noisy selection (``bestval``) only if it beats
  ``last`` by more than 2 SE of their own paired difference.

Everything is cached under ``--work`` (the judge's caches: corpora, searches, final runs).
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
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE)]
import _common  # noqa: E402
import run_quality as rq  # noqa: E402

from fastmix_data.search.outputs import read_trajectory  # noqa: E402

DEV_EXPERIMENTS = {
    "dev-stdlib-A": {"sources": ["code", "prose", "markup"], "heldout": "tests",
                     "planted": {"markup": 0.60, "code": 0.30, "prose": 0.10}},
    "dev-stdlib-B": {"sources": ["docstrings", "tests", "prose"], "heldout": "markup",
                     "planted": {"docstrings": 0.60, "tests": 0.20, "prose": 0.20}},
    "dev-system-A": {"sources": ["pycode", "manpages", "changelogs"], "heldout": "licenses",
                     "planted": {"manpages": 0.60, "changelogs": 0.30, "pycode": 0.10}},
    "dev-system-B": {"sources": ["changelogs", "licenses", "pymeta"], "heldout": "manpages",
                     "planted": {"changelogs": 0.60, "licenses": 0.20, "pymeta": 0.20}},
}
DEV_TARGETS = ("heldout", "planted")
DEV_SEEDS = tuple(range(100, 110))
#: the development studies' final-run size (= search budget): the judge's until it moved to 1M-token
#: final runs (final_size.md); kept so that the studies stay comparable and their caches are reused
DEV_FINAL_TOKENS = 262_144
CANDIDATES = ("average", "tail", "last", "bestval")
BASELINE = "average"
#: candidates without a parameter or a noisy selection, preferred on a tie within noise
SIMPLE = ("average", "last")


def target_specs(experiments: dict) -> set[tuple]:
    """Every (sources, target) a set of experiments scores: ``("heldout", domain)`` or
    ``("planted", proportions)`` with the sources as a sorted tuple -- what must differ from the judge."""
    out = set()
    for spec in experiments.values():
        src = tuple(sorted(spec["sources"]))
        if spec["heldout"]:
            out.add((src, "heldout", spec["heldout"]))
        out.add((src, "planted", tuple(sorted(spec["planted"].items()))))
    return out


def best_validation(run_dir: Path) -> dict[str, float] | None:
    """The mixture after the update whose target loss (measured by the search) was lowest."""
    recs = [r for r in read_trajectory(run_dir) if r.get("updated") and r.get("target_loss") is not None]
    return min(recs, key=lambda r: r["target_loss"])["weights"] if recs else None


def study_unit(work: Path, exp: str, target: str, seed: int, data: dict, args) -> dict:
    """One search, then a final run on every candidate export; their final losses on ``target``."""
    s = rq.run_search_cached(work, exp, "fastmix", target, seed, data, args)
    weights = dict(s["candidates"])
    if "run_dir" not in s:  # cached before run_search_cached recorded its (config-keyed) run folder
        raise RuntimeError(f"the cached {exp}/{target} FastMix search of seed {seed} does not name its run folder: "
                           f"delete {work / 'methods'}/{exp}-fastmix-{target}-s{seed}-*.json to rerun it")
    run_dir = Path(s["run_dir"])
    bv = best_validation(run_dir)
    if bv is None:
        raise RuntimeError(f"{run_dir}: no trajectory record with a target loss (delete the cached search to rerun)")
    weights["bestval"] = bv
    losses = {c: rq.final_run(work, data, weights[c], seed, args)["losses"][target] for c in CANDIDATES}
    return {"exp": exp, "target": target, "seed": seed, "weights": weights, "losses": losses,
            "updates": s["details"].get("updates"), "search_wall_s": s["wall_s"]}


def paired(units: list[dict], cand: str, base: str = BASELINE) -> dict:
    d = np.array([u["losses"][cand] - u["losses"][base] for u in units])
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"n": len(d), "mean": float(d.mean()), "se": se, "wins": int((d < 0).sum()), "ties": int((d == 0).sum())}


def summarise(units: list[dict]) -> dict:
    keys = sorted({(u["exp"], u["target"]) for u in units})
    per = {f"{e}/{t}": {c: paired([u for u in units if (u["exp"], u["target"]) == (e, t)], c) for c in CANDIDATES}
           for e, t in keys}
    pooled = {c: paired(units, c) for c in CANDIDATES}
    return {"per_target": per, "pooled": pooled, "versus_last": {c: paired(units, c, "last") for c in CANDIDATES},
            "chosen": decide(units)}


def decide(units: list[dict]) -> str:
    """The rule fixed before the runs (module docstring)."""
    better = [c for c in CANDIDATES if c != BASELINE and (p := paired(units, c))["mean"] + 2 * p["se"] < 0]
    if not better:
        return BASELINE
    best = min(better, key=lambda c: paired(units, c)["mean"])
    if best not in SIMPLE and "last" in better:
        p = paired(units, best, "last")
        if not p["mean"] + 2 * p["se"] < 0:
            return "last"
    return best


# ============================================================================ report


def _pm(p: dict) -> str:
    return f"{p['mean']:+.4f} ± {p['se']:.4f} ({p['wins']}/{p['n']})"


def dev_header(m: dict, runs: str) -> list[str]:
    """A development study's report header: date, machine, commit, command, load, wall time (with
    ``runs``, what was run), the judge's run settings."""
    return [f"- date: {m['date']}", f"- machine: {m['machine']}", f"- commit: {m['commit']}",
            f"- command: `{m['command']}` (under `nice -n {m['nice']}`, torch threads {m['threads']})",
            f"- load average at start / end: {m['load_start']} / {m['load_end']}",
            f"- wall time: {m['wall_s'] / 60:.1f} min; seeds {m['seeds']}; {runs}",
            f"- run settings (the judge's; the final-run size from `--final-tokens`): final run = search budget = {m['final_tokens']:,} tokens, batch "
            f"{m['batch_size']} x {m['seq_len']}, proxy `{m['proxy']}`, {m['eval_seqs']} test sequences per target"]


def render(saved: dict, out: Path) -> None:
    m, s = saved["meta"], saved["summary"]
    others = [c for c in CANDIDATES if c != BASELINE]
    rows = []
    for key, per in s["per_target"].items():
        units = [u for u in saved["units"] if f"{u['exp']}/{u['target']}" == key]
        base = np.mean([u["losses"][BASELINE] for u in units])
        rows.append([key, f"{base:.4f}", *(_pm(per[c]) for c in others)])
    rows.append(["**pooled**", f"{np.mean([u['losses'][BASELINE] for u in saved['units']]):.4f}",
                 *(f"**{_pm(s['pooled'][c])}**" for c in others)])
    vs_last = [f"`{c}` {_pm(s['versus_last'][c])}" for c in CANDIDATES if c != "last"]
    lines = [
        "# Which mixture FastMix exports: development study (generated by `export_rule.py`)", "",
        *dev_header(m, f"{len(saved['units'])} searches, {len(saved['units']) * len(CANDIDATES)} final runs "
                    "(identical candidates share one cached run)"), "",
        "## Experiments (none is a target definition of `run_quality.py`; texts come from the same test splits)", "",
        *(f"- `{e}`: sources {', '.join(sp['sources'])}; held-out `{sp['heldout']}`; planted "
          + ", ".join(f"{d} {p:.2f}" for d, p in sp["planted"].items()) for e, sp in DEV_EXPERIMENTS.items()), "",
        "## Paired final loss against `average` (candidate − average, mean ± SE over seeds, (wins/n))", "",
        _common.markdown_table(["target", "average (mean loss)", *others], rows, "l" + "r" * (1 + len(others))), "",
        "Against `last` (pooled): " + "; ".join(vs_last) + ".", "",
        f"**Rule applied (stated in the script before the runs): `{s['chosen']}`.**", "",
    ]
    path = out / "export_rule.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


def dev_parser(doc: str, name: str, seeds) -> argparse.ArgumentParser:
    """The options every development study takes (``name``: its results file, without suffix)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--work", default="out/quality", help="cache and run folder (the judge's can be shared)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    ap.add_argument("--experiments", nargs="+", default=list(DEV_EXPERIMENTS), choices=list(DEV_EXPERIMENTS))
    ap.add_argument("--final-tokens", type=int, default=DEV_FINAL_TOKENS,
                    help="tokens of a final run and of a search's budget (the judge's other settings are kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    ap.add_argument("--out", default=str(HERE), help=f"where {name}.json/.md go")
    ap.add_argument("--from-results", action="store_true", help=f"re-render {name}.md from {name}.json")
    return ap


def dev_start(args) -> tuple:
    """The judge's run settings (but ``--final-tokens``), torch's threads, the work folder, the clock and load at
    the start, and every chosen development experiment's data (``rq.prepare_experiment``)."""
    run = rq.build_parser().parse_args(["--final-tokens", str(args.final_tokens)])
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clock = (time.perf_counter(), rq._uptime())
    dirs = rq.corpora(work)
    data = {e: rq.prepare_experiment(work, e, DEV_EXPERIMENTS[e], run, dirs, targets=DEV_TARGETS)
            for e in args.experiments}
    return run, work, data, clock


def dev_units(args, run, work: Path, data: dict, unit) -> list[dict]:
    """``unit(work, exp, target, seed, data[exp], run)`` for every chosen (seed, experiment, target),
    seed-major (a partial run is balanced over the targets), each logged with its final losses."""
    units = []
    for seed in args.seeds:
        for exp in args.experiments:
            for target in DEV_TARGETS:
                u = unit(work, exp, target, seed, data[exp], run)
                units.append(u)
                rq.log(f"{exp} {target:8s} s{seed} " + " ".join(f"{c}={x:.4f}" for c, x in u["losses"].items()))
    return units


def dev_finish(args, run, clock: tuple, units: list[dict], summary: dict, name: str, render_fn) -> None:
    """Write ``<name>.json`` (run record: date, machine, command, commit, wall time, load, settings)
    and render ``<name>.md``."""
    meta = rq.run_meta(*clock, nice=os.nice(0), threads=args.threads, seeds=args.seeds,
                       **{k: getattr(run, k) for k in ("final_tokens", "batch_size", "seq_len", "proxy", "eval_seqs")})
    saved = {"meta": meta, "summary": summary, "units": units}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _common.write_atomic(str(out / f"{name}.json"), json.dumps(saved, indent=1))
    render_fn(saved, out)
    rq.log(f"done in {meta['wall_s'] / 60:.1f} min; chosen: {summary['chosen']}; wrote {out / name}.md")


def main(argv=None) -> None:
    args = dev_parser(__doc__, "export_rule", DEV_SEEDS).parse_args(argv)
    if args.from_results:
        render(json.loads((Path(args.out) / "export_rule.json").read_text()), Path(args.out))
        return
    run, work, data, clock = dev_start(args)
    units = []
    for exp in args.experiments:
        for target in DEV_TARGETS:
            for seed in args.seeds:
                u = study_unit(work, exp, target, seed, data[exp], run)
                units.append(u)
                rq.log(f"{exp} {target:8s} s{seed} " + " ".join(f"{c}={u['losses'][c]:.4f}" for c in CANDIDATES))
    dev_finish(args, run, clock, units, summarise(units), "export_rule", render)

if __name__ == "__main__":
    main()
