"""FastMix's defaults: a development study of a few variants on target definitions the quality benchmark does not use.

The judge (``run_quality.py``) finds FastMix's regret beyond 0.005 nats on two of its four K = 3
targets, and the export rule is not the lever (``export_rule.md``: last / tail / average tie). This
study asks whether the search itself finds better mixtures with other values of knobs that exist,
chosen on the development set of ``export_rule.py`` (its targets, its seeds), never on the judge's.

Protocol:

* **Targets and runs** as in ``export_rule.py`` (its ``DEV_EXPERIMENTS``, 8 targets; the judge's run
  settings; one FastMix search per (target, seed) with ``max_tokens`` = one final run, then one final
  run from scratch on the exported mixture, scored on the target's test split). Seeds 100-105 (six of
  the export study's ten, for time: about 30 minutes on 2 shared cores).
* **Variants** (:data:`VARIANTS`), each one change to the defaults, with its reason:

  - ``travel-x0.5`` / ``travel-x2``: the total logit travel ``FASTMIX_TRAVEL`` halved / doubled (the
    derived ``z_lr`` times 0.5 / 2 at this budget). The export study saw ``last`` gain where the best
    mixture is a corner and lose where it is interior: either the search undershoots corners (more
    travel) or its oscillation around interior optima costs more (less travel).
  - ``residual-off``: score sources against the target gradient alone (the paper's form) instead of
    the target gradient minus the training gradient. The residual form is argued for a proxy far
    from convergence; whether it helps at this budget was never measured on held-out targets.
  - ``warmup-0.2``: the mixture first moves after 20 % of the micro-batches instead of 5 %
    (``FASTMIX_WARMUP_FRACTION``; the travel, hence the derived ``z_lr``, is kept). The cosine z step
    is largest first, when the proxy is least trained and the gradients mostly say "learn the
    unigram statistics", which may bias the first, largest moves.

  - ``adam-precond`` (issue 13): score the sources against ``P * G_ref`` instead of ``G_ref``
    (``fastmix.precondition``), P = 1 / (sqrt(v_hat) + eps) the proxy AdamW's per-coordinate step
    scale for the LM-head weight. The one-step hypergradient assumes an SGD step; the proxy takes an
    Adam step, whose first-order effect on the target loss is -eta <G_ref, P * grad L_k>. The scale
    differs a lot between the head's coordinates (frequent against rare tokens), so P changes the
    signal's direction, not just its size. Same compute (one elementwise product per outer step).

  ``target_ema`` is not tried: Adam's first moment (beta1 0.9) already averages the scores over
  outer steps. None of the variants costs more compute than the defaults (residual-off costs less).
* **Compared** by the paired difference of final losses, variant − defaults (same seed for search,
  model init and data order): mean +- SE and wins, per target and pooled over all (target, seed);
  on planted targets also the L1 distance to the planted token shares.
* **Rule** (fixed before the runs, :func:`decide`): a variant replaces the defaults only if its
  pooled paired difference is below zero by more than 2 SE; of several, the one with the lowest
  mean. Otherwise the defaults stay. For the variants in :data:`GUARDED` (``adam-precond``; fixed by
  the lead before its runs) the rule adds a guard by target kind (:func:`kind_guard`): its pooled
  paired difference on neither kind (held-out, planted) may be above zero by more than 2 SE.

Everything is cached under ``--work`` (the judge's and the export study's caches: the defaults'
searches and final runs are reused). ``--variants`` runs a subset (e.g. two processes in parallel,
then one more over all variants, which only reads the caches and writes the report).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent), str(HERE)]
import _common  # noqa: E402
import export_rule as er  # noqa: E402
import run_quality as rq  # noqa: E402

BASELINE = "defaults"
#: each variant: a ``fastmix`` section override, or a scale of the derived z_lr (``z_lr_scale``), or a
#: warm-up fraction (``warmup_fraction``: warmup_steps set, z_lr derived from the resulting updates)
VARIANTS = {
    "travel-x0.5": {"z_lr_scale": 0.5},
    "travel-x2": {"z_lr_scale": 2.0},
    "residual-off": {"residual": False},
    "warmup-0.2": {"warmup_fraction": 0.2},
    "residual-0.5": {"residual_weight": 0.5},
    "residual-0.25": {"residual_weight": 0.25},
    "adam-precond": {"precondition": True},
}
DEV_SEEDS = tuple(range(100, 106))
#: variants whose rule adds the guard by target kind (:func:`kind_guard`)
GUARDED = ("adam-precond",)


def overrides(variant: dict, base_schedule: dict, steps: int) -> dict:
    """The ``fastmix`` section overrides of a variant, given the defaults' resolved schedule."""
    out = {k: v for k, v in variant.items() if k not in ("z_lr_scale", "warmup_fraction")}
    if "z_lr_scale" in variant:
        out["z_lr"] = base_schedule["z_lr"] * variant["z_lr_scale"]
    if "warmup_fraction" in variant:
        out["warmup_steps"] = int(round(variant["warmup_fraction"] * steps))
    return out


def study_unit(work: Path, exp: str, target: str, seed: int, data: dict, args, variants: list[str]) -> dict:
    """The defaults' search and each variant's, then one final run on each exported mixture."""
    steps = args.final_tokens // (args.batch_size * args.seq_len)
    base = rq.run_search_cached(work, exp, "fastmix", target, seed, data, args)
    searches = {BASELINE: base}
    for v in variants:
        ov = overrides(VARIANTS[v], base["details"]["schedule"], steps)
        searches[v] = rq.run_search_cached(work, exp, "fastmix", target, seed, data, args, overrides=ov, tag=f"-{v}")
    losses = {v: rq.final_run(work, data, s["weights"], seed, args)["losses"][target] for v, s in searches.items()}
    unit = {"exp": exp, "target": target, "seed": seed, "losses": losses,
            "weights": {v: s["weights"] for v, s in searches.items()},
            "schedule": {v: s["details"]["schedule"] for v, s in searches.items()},
            "search_flops": {v: s["flops"]["total"] for v, s in searches.items()},
            "search_wall_s": {v: s["wall_s"] for v, s in searches.items()}}
    if target == "planted":
        unit["l1"] = {v: rq.l1(w, data["planted_tokens"]) for v, w in unit["weights"].items()}
    return unit


def paired_summary(units: list[dict], names: list[str], base: str = BASELINE) -> dict:
    """Each of ``names`` against ``base`` (paired final losses per target and pooled) and, on planted
    targets, every one's L1 to the planted shares (units with ``l1``)."""
    keys = sorted({(u["exp"], u["target"]) for u in units})
    per = {f"{e}/{t}": {v: er.paired([u for u in units if (u["exp"], u["target"]) == (e, t)], v, base)
                        for v in names} for e, t in keys}
    planted = [u for u in units if "l1" in u]
    l1 = {v: rq._ms([u["l1"][v] for u in planted]) for v in [base, *names]} if planted else {}
    return {"per_target": per, "pooled": {v: er.paired(units, v, base) for v in names}, "l1_planted": l1}


def summarise(units: list[dict], variants: list[str]) -> dict:
    flops = {v: float(np.mean([u["search_flops"][v] / u["search_flops"][BASELINE] for u in units]))
             for v in variants}
    return {**paired_summary(units, variants), "flops_vs_defaults": flops, "by_kind": by_kind(units, variants),
            "kind_guard": {v: kind_guard(units, v) for v in variants},
            "chosen": decide(units, variants, guarded=GUARDED)}


def decide(units: list[dict], variants: list[str], base: str = BASELINE, guarded: tuple = ()) -> str:
    """The rule fixed before the runs (module docstring): a variant replaces ``base`` only if its pooled
    paired difference is below zero by more than 2 SE (and, for those in ``guarded``, it passes
    :func:`kind_guard`); of several, the lowest mean."""
    pooled = {v: er.paired(units, v, base) for v in variants}
    better = [v for v, p in pooled.items() if p["mean"] + 2 * p["se"] < 0
              and (v not in guarded or kind_guard(units, v, base))]
    return min(better, key=lambda v: pooled[v]["mean"]) if better else base


def by_kind(units: list[dict], names: list[str], base: str = BASELINE) -> dict:
    """Each of ``names`` against ``base``, pooled by target kind (``heldout``, ``planted``)."""
    kinds = sorted({u["target"] for u in units})
    return {k: {v: er.paired([u for u in units if u["target"] == k], v, base) for v in names} for k in kinds}


def kind_guard(units: list[dict], variant: str, base: str = BASELINE) -> bool:
    """True unless the variant's pooled paired difference on some target kind is above zero by more than 2 SE."""
    return all(p[variant]["mean"] - 2 * p[variant]["se"] <= 0 for p in by_kind(units, [variant], base).values())


# ============================================================================ report


def render(saved: dict, out: Path) -> None:
    m, s, units = saved["meta"], saved["summary"], saved["units"]
    variants = list(s["pooled"])
    rows = paired_rows(units, s, variants)
    kinds = s.get("by_kind") or by_kind(units, variants)
    rows[-1:-1] = [[f"pooled {k}", f"{np.mean([u['losses'][BASELINE] for u in units if u['target'] == k]):.4f}",
                    *(er._pm(kinds[k][v]) for v in variants)] for k in kinds]
    rows.append(["search compute / defaults'", "1", *(f"{s['flops_vs_defaults'][v]:.2f}" for v in variants)])
    sched = [f"`{v}`: " + ", ".join(f"{k} {units[0]['schedule'][v][k]:.4g}" for k in ("warmup_steps", "outer_every",
                                                                                     "updates", "z_lr"))
             for v in [BASELINE, *variants]]
    lines = [
        "# FastMix's defaults: development study of variants (generated by `fastmix_dev.py`)", "",
        *er.dev_header(m, f"{len(units)} (target, seed) pairs x {1 + len(variants)} searches (cached searches "
                       "and final runs are reused)"),
        "- targets: the 8 of `export_rule.py` (none is a judge target); variants: "
        + "; ".join(f"`{v}` {VARIANTS[v]}" for v in variants),
        "- resolved schedules (first pair): " + "; ".join(sched), "",
        "## Paired final loss against the defaults (variant − defaults, mean ± SE over seeds, (wins/n))", "",
        _common.markdown_table(["target", "defaults (mean loss)", *variants], rows, "l" + "r" * (1 + len(variants))),
        "", f"**Rule applied (stated in the script before the runs): `{s['chosen']}`.** Guard by target kind "
        "(no kind above zero by more than 2 SE; part of the rule for " + ", ".join(f"`{v}`" for v in GUARDED)
        + "): " + "; ".join(f"`{v}` {'passes' if kind_guard(units, v) else 'fails'}" for v in variants) + ".", "",
    ]
    path = out / "fastmix_dev.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


def paired_rows(units: list[dict], s: dict, names: list[str], base: str = BASELINE) -> list[list[str]]:
    """Table rows of :func:`paired_summary`'s ``s``: per target (``base``'s mean loss, then each name's
    paired difference), pooled, and the L1 to the planted shares."""
    rows = []
    for key, per in s["per_target"].items():
        us = [u for u in units if f"{u['exp']}/{u['target']}" == key]
        rows.append([key, f"{np.mean([u['losses'][base] for u in us]):.4f}", *(er._pm(per[v]) for v in names)])
    rows.append(["**pooled**", f"{np.mean([u['losses'][base] for u in units]):.4f}",
                 *(f"**{er._pm(s['pooled'][v])}**" for v in names)])
    if s["l1_planted"]:
        rows.append(["L1 to planted (mean ± std, planted targets)", _pm3(s["l1_planted"][base]),
                     *(_pm3(s["l1_planted"][v]) for v in names)])
    return rows


def _pm3(ms: list[float]) -> str:
    return f"{ms[0]:.3f} ± {ms[1]:.3f}"


def main(argv=None) -> None:
    ap = er.dev_parser(__doc__, "fastmix_dev", DEV_SEEDS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    if args.from_results:
        render(json.loads((Path(args.out) / "fastmix_dev.json").read_text()), Path(args.out))
        return
    run, work, data, clock = er.dev_start(args)
    units = er.dev_units(args, run, work, data, functools.partial(study_unit, variants=args.variants))
    er.dev_finish(args, run, clock, units, summarise(units, args.variants), "fastmix_dev", render)

if __name__ == "__main__":
    main()
