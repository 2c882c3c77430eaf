"""FastMix's export shrunk toward its start: a development study on target definitions the quality benchmark does not use.

The judge (``run_quality.py``, 1M-token final runs, 10 seeds) finds FastMix's regret above 0.005
nats, and on stdlib-K3's held-out target FastMix exports code 0.06 / prose 0.90 / markup 0.04 where
the grid picks code 0.3 / prose 0.7: the search over-commits. The exported ``average`` (over all
updates) already mixes the early, near-start mixtures in; the export study (``export_rule.md``:
average / tail / last / best-validation) and the defaults study (``fastmix_dev.md``: travel, warm-up,
residual) found nothing better. This study tries a stronger pull toward the start.

Protocol:

* **Targets, seeds and runs** as in ``export_rule.py`` (its ``DEV_EXPERIMENTS``, 8 targets, none a
  judge target; seeds 100-109; the judge's run settings with 262,144-token final runs): one FastMix
  search at its defaults per (target, seed) with ``max_tokens`` = one final run
  (``run_quality.run_search_cached``), then one final run from scratch on each candidate mixture
  (``run_quality.final_run``), scored on the target's test split.
* **Candidates** (:data:`SHRINK`): ``average`` (the default export, the baseline) and
  ``shrink-<lambda>`` = (1 - lambda) * average + lambda * start for lambda 0.25 and 0.5, where
  ``start`` is the search's starting mixture: ``fastmix.init_weights`` of the resolved config the
  search wrote (``search_config.json``; None means uniform over the sources), checked equal to the
  weights of the trajectory's first record (written before any update) -- a search whose two
  disagree stops the study. No extra search compute: the candidates are functions of the export.
* **Compared** by the paired difference of final losses, candidate − average (same search, same
  seed for the final run's init and data order): mean +- SE and wins, per target and pooled over all
  80 (target, seed) pairs; on planted targets also each candidate's L1 to the planted token shares.
* **Rule** (fixed and committed before any figure of this study was seen,
  ``fastmix_dev.decide`` with base ``average``): a candidate replaces ``average`` only if its pooled
  paired difference is below zero by more than 2 SE; of several, the one with the lowest mean.
  Nothing else: no per-target or per-kind choice, no other lambda after the figures are seen.

**After the decision, not an input to it** (``--judge EXP=WORK ...``): the same candidates on the judge's
K = 3 held-out and planted targets, from the judge's cached FastMix searches (``cached_only``: a
search that is not cached stops the look instead of running) at the judge's settings (1M-token final
runs, seeds 0-9), paired over all seeds and over the evaluation seeds 1-9 its regrets use; only the
shrunk mixtures' final runs train (``shrink_rule_judge.{json,md}``).

Everything is cached under ``--work`` (the judge's caches: corpora, searches, final runs);
``--experiments`` runs a subset (e.g. two processes in parallel, then one pass over all, which only
reads the caches and writes the report).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE)]
import _common  # noqa: E402
import export_rule as er  # noqa: E402
import fastmix_dev as fd  # noqa: E402
import run_quality as rq  # noqa: E402
import torch  # noqa: E402

from fastmix_data.search.outputs import CONFIG_FILE, read_trajectory  # noqa: E402

BASELINE = "average"
#: each candidate's lambda: (1 - lambda) * average + lambda * start
SHRINK = {"shrink-0.25": 0.25, "shrink-0.5": 0.5}
#: the judge's experiments with a grid oracle (``--judge``)
JUDGE = ("stdlib-K3", "system-K3")


def shrink(average: dict[str, float], start: dict[str, float], lam: float) -> dict[str, float]:
    """``(1 - lam) * average + lam * start``, source by source (both mixtures over the same sources)."""
    if set(average) != set(start):
        raise ValueError(f"shrink: the average has sources {sorted(average)}, the start {sorted(start)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"shrink: lambda must be in [0, 1], got {lam}")
    return {n: (1.0 - lam) * average[n] + lam * start[n] for n in average}


def start_mixture(run_dir: Path) -> dict[str, float]:
    """The search's starting mixture from its resolved config (``fastmix.init_weights``, None =
    uniform), checked against the trajectory's first record (the mixture before any update)."""
    saved = json.loads((run_dir / CONFIG_FILE).read_text())
    names = saved["source_names"]
    init = saved["config"]["fastmix"]["init_weights"]
    start = {n: 1.0 / len(names) for n in names} if init is None else {n: float(init[n]) for n in names}
    first = read_trajectory(run_dir)[0]
    if first.get("updated") or any(not math.isclose(first["weights"][n], start[n], abs_tol=1e-9) for n in names):
        raise RuntimeError(f"{run_dir}: the config's starting mixture {start} is not the trajectory's first "
                           f"record {first['weights']} (updated={first.get('updated')})")
    return start


def study_unit(work: Path, exp: str, target: str, seed: int, data: dict, args, cached_only: bool = False) -> dict:
    """One search at the defaults, then a final run on ``average`` and on each shrunk mixture."""
    s = rq.run_search_cached(work, exp, "fastmix", target, seed, data, args, cached_only=cached_only)
    if "run_dir" not in s:
        raise RuntimeError(f"the cached {exp}/{target} FastMix search of seed {seed} does not name its run folder: "
                           f"delete {work / 'methods'}/{exp}-fastmix-{target}-s{seed}-*.json to rerun it")
    start = start_mixture(Path(s["run_dir"]))
    weights = {BASELINE: s["candidates"][BASELINE]}
    if weights[BASELINE] != s["weights"]:
        raise RuntimeError(f"{s['run_dir']}: the search exported {s['weights']}, not its average")
    weights |= {c: shrink(weights[BASELINE], start, lam) for c, lam in SHRINK.items()}
    finals = {c: rq.final_run(work, data, w, seed, args) for c, w in weights.items()}
    unit = {"exp": exp, "target": target, "seed": seed, "start": start, "weights": weights,
            "losses": {c: f["losses"][target] for c, f in finals.items()},
            "final_cached": {c: f["cached"] for c, f in finals.items()},
            "updates": s["details"].get("updates"), "search_wall_s": s["wall_s"], "run_dir": s["run_dir"]}
    if target == "planted":
        unit["l1"] = {c: rq.l1(w, data["planted_tokens"]) for c, w in weights.items()}
    return unit


def summarise(units: list[dict]) -> dict:
    return {**fd.paired_summary(units, list(SHRINK), BASELINE), "chosen": fd.decide(units, list(SHRINK), BASELINE)}


def render(saved: dict, out: Path) -> None:
    m, s, units = saved["meta"], saved["summary"], saved["units"]
    names = list(SHRINK)
    rows = fd.paired_rows(units, s, names, BASELINE)
    lines = [
        "# FastMix's export shrunk toward its start: development study (generated by `shrink_rule.py`)", "",
        *er.dev_header(m, f"{len(units)} searches at the defaults, {len(units) * (1 + len(names))} final runs "
                       "(cached searches and final runs are reused)"),
        "- targets: the 8 of `export_rule.py` (none is a judge target); candidates: `average` (the default) and "
        + ", ".join(f"`{c}` = {1 - lam:g} x average + {lam:g} x start" for c, lam in SHRINK.items())
        + "; start = the resolved config's `fastmix.init_weights` (uniform), equal to the trajectory's first record",
        f"- FastMix updates per search: {min(u['updates'] for u in units)}-{max(u['updates'] for u in units)}", "",
        "## Paired final loss against `average` (candidate − average, mean ± SE over seeds, (wins/n))", "",
        _common.markdown_table(["target", "average (mean loss)", *names], rows, "l" + "r" * (1 + len(names))), "",
        f"**Rule applied (stated in the script before the runs): `{s['chosen']}`.**", "",
    ]
    path = out / "shrink_rule.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


# ============================================================================ the judge's targets, afterwards


def judge_look(args) -> None:
    """The candidates on the judge's targets (module docstring), from its caches; writes
    ``shrink_rule_judge.{json,md}``."""
    looks = [spec.partition("=")[::2] for spec in args.judge]
    for spec, (exp, work) in zip(args.judge, looks):
        if exp not in JUDGE or not work:
            raise SystemExit(f"--judge {spec!r}: expected EXP=WORK with EXP one of {', '.join(JUDGE)}")
    torch.set_num_threads(args.threads)
    clock, units = (time.perf_counter(), rq._uptime()), []
    for exp, work in looks:
        run = rq.build_parser().parse_args(["--work", work, "--experiments", exp])
        data = rq.prepare(Path(work), run)[exp]
        for seed in run.seeds:
            for target in er.DEV_TARGETS:
                u = study_unit(Path(work), exp, target, seed, data, run, cached_only=True)
                units.append(u)
                rq.log(f"{exp} {target:8s} s{seed} " + " ".join(f"{c}={x:.4f}" for c, x in u["losses"].items()))
    args.seeds = run.seeds
    evaluation = [u for u in units if u["seed"] != run.seeds[0]]  # the judge's regrets: seeds 1-9
    decided = json.loads((HERE / "shrink_rule.json").read_text())["summary"]["chosen"]  # on the development set
    summary = {**fd.paired_summary(units, list(SHRINK), BASELINE), "chosen": decided,
               "evaluation_seeds": fd.paired_summary(evaluation, list(SHRINK), BASELINE)}
    er.dev_finish(args, run, clock, units, summary, "shrink_rule_judge", render_judge)


def render_judge(saved: dict, out: Path) -> None:
    m, s, units = saved["meta"], saved["summary"], saved["units"]
    names, ev = list(SHRINK), s["evaluation_seeds"]
    new = sum(not u["final_cached"][c] for u in units for c in names)
    lines = [
        "# FastMix's shrunk export on the judge's targets, after the decision (generated by `shrink_rule.py "
        "--judge`)", "",
        *er.dev_header(m, f"{len(units)} cached FastMix searches (none run); final runs trained in this pass: {new} "
                       f"(the others cached), `average`'s cached: {sum(u['final_cached'][BASELINE] for u in units)}/"
                       f"{len(units)}"),
        f"- not an input to the rule: `shrink_rule.md` decided `{s['chosen']}` on the development "
        "targets; this is what the candidates would have done on the judge's", "",
        "## Paired final loss against `average`, all seeds (candidate − average, mean ± SE, (wins/n))", "",
        _common.markdown_table(["target", "average (mean loss)", *names], fd.paired_rows(units, s, names, BASELINE),
                               "l" + "r" * (1 + len(names))), "",
        "## The same over the evaluation seeds the judge's regrets use (a regret moves by this mean)", "",
        _common.markdown_table(["target", "average (mean loss)", *names],
                               fd.paired_rows([u for u in units if u["seed"] != m["seeds"][0]], ev, names, BASELINE),
                               "l" + "r" * (1 + len(names))), "",
    ]
    path = out / "shrink_rule_judge.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


def main(argv=None) -> None:
    ap = er.dev_parser(__doc__, "shrink_rule", er.DEV_SEEDS)
    ap.add_argument("--judge", nargs="+", metavar="EXP=WORK", help="after the decision: the candidates on the "
                    "judge's experiment EXP (stdlib-K3, system-K3) from its cache folder WORK")
    args = ap.parse_args(argv)
    if args.judge:
        if args.from_results:
            render_judge(json.loads((Path(args.out) / "shrink_rule_judge.json").read_text()), Path(args.out))
        else:
            judge_look(args)
        return
    if args.from_results:
        render(json.loads((Path(args.out) / "shrink_rule.json").read_text()), Path(args.out))
        return
    run, work, data, clock = er.dev_start(args)
    units = er.dev_units(args, run, work, data, study_unit)
    er.dev_finish(args, run, clock, units, summarise(units), "shrink_rule", render)


if __name__ == "__main__":
    main()
