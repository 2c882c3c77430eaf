"""Can ANY mixture meet both of issue 13's planted-target checks on the judge? A feasibility study.

Issue 13 asks FastMix for regret <= 0.005 nats against the grid AND L1 <= 0.1 to the planted
mixture, on the planted target. On the judge (``run_quality.py``, results.md: 1M-token final runs,
seeds 0-9, held-out oracle) the planted mixture itself has regret +0.0130 +- 0.0065 (stdlib-K3) and
+0.0140 +- 0.0048 (system-K3): the loss optimum is not the planted mixture. This study asks whether
some mixture within L1 0.1 of the planted one has regret <= 0.005 -- if none has, the two targets
cannot be met together on this judge by any method.

Protocol (per corpus: stdlib-K3, system-K3; the planted target only):

* **Settings**: the judge's, read from its record (benchmarks/quality/results.json, the run that
  provides the experiment: ``--final-tokens`` 1,048,576, system-K3 with ``--system-heldout pymeta``,
  batch, sequence length, proxy, eval sequences, planted documents); torch threads 1; the judge's
  cache folder (``EXP=WORK``) so that nothing it trained is trained again. Before anything is
  trained, the ``planted`` row's mixture at the first evaluation seed must come from the cache with
  the judge's loss (:func:`check_cache`); otherwise the study stops (a changed fingerprint).
* **Points** (:func:`ball_points`): p = the planted token shares (``prepare_experiment``'s
  ``planted_tokens``, checked equal to results.json's summary), and the 12 points on the boundary of
  the L1 ball of radius 0.1 around p: the 6 vertices p + 0.05 (e_j - e_i), i != j, and the 6 edge
  midpoints p + 0.05 e_j - 0.025 (e_i + e_k) and p - 0.05 e_i + 0.025 (e_j + e_k). Each is checked
  to lie in the simplex at L1 0.1 from p (an error otherwise). The points are token shares and are
  trained as such: ``train_static`` takes token shares, and run_quality trains the ``planted`` row
  on ``planted_tokens`` unchanged (identity conversion); this study does the same.
* **Runs**: every point with the evaluation seeds 1-9 (``run_quality.final_run``: model init = data
  order = seed, the judge's evaluation seeds, paired with its oracle); p itself is the judge's
  ``planted`` row (cached).
* **Regret** per seed = the point's final loss on the planted test set - the held-out oracle's loss
  at that seed, the oracle computed by ``run_quality.oracle`` from results.json's rows (seeds 0-9) and
  the regret by ``run_quality._regret``: mean, SE = std / sqrt(n) over the evaluation seeds; wins =
  seeds where the point's loss is below the oracle's.
* **Confirmation**: the selected point (:func:`select`: among the points with mean + 2 SE <= 0.005
  the one with the lowest mean + 2 SE; if there is none, the lowest mean + 2 SE of all, reported for
  information only) is trained again with the confirmation seeds 10-19, and so is the grid's pick
  fixed from seeds 0-9 (results.json's summary: the oracle's in-sample pick, the best mean over seeds
  0-9); regret per seed = point - pick at that seed, mean and SE as above.

**Decision rule** (:func:`verdict`; fixed and committed before any run of this study), per corpus:

* JOINTLY FEASIBLE if some point (p included) has mean + 2 SE <= 0.005 over seeds 1-9 AND the
  selected such point, retrained with seeds 10-19, again has mean + 2 SE <= 0.005 there (the
  confirmation guards against picking the best of 13 noisy points);
* NOT FEASIBLE AT THE POINTS TRIED if every point (p included) has mean - 2 SE > 0.005 over seeds 1-9;
* otherwise UNDECIDED (including a point that passes seeds 1-9 but fails its confirmation).

What this proves and does not: the points are 12 of the infinitely many on the ball's boundary, plus
its centre. FEASIBLE is a constructive answer (a mixture within L1 0.1 that meets the regret target,
confirmed on fresh seeds). NOT FEASIBLE speaks of these 13 points only; it extends to the whole ball
only under assumptions that are not measured here: if the expected final loss is convex over the
simplex and its minimum lies outside the ball, the minimum over the ball lies on the ball's boundary,
and the boundary between neighbouring points is covered only as far as the loss is smooth at the
0.025-0.05 scale between them. A regret is against the grid at step 0.1, itself 0.0-0.05 away from the
true optimum, so it can be negative.

**Supplementary, no training** (:func:`quadratic_fit`; a MODEL ESTIMATE, not a measurement): a
Scheffe quadratic (sum a_i w_i + sum_{i<j} b_ij w_i w_j) fitted by least squares to the planted
target's final losses of the 66 grid points trained with seed 0 (results.json's ``grid-point``
rows); its minimum over the simplex and over the L1 ball (a dense lattice of step 0.0025), the fitted
regret of the ball's minimum and of p against the fit at the grid's pick, and the fit's residual std.

Two corpora run side by side (``--experiments`` one each, ``--out`` a folder each), then ``--merge``
writes benchmarks/quality/feasibility.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
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
import report  # noqa: E402
import run_quality as rq  # noqa: E402

RADIUS = 0.1
TARGET = report.FASTMIX_REGRET  # the regret target (nats)
EVAL_SEEDS = tuple(range(1, 10))
CONFIRM_SEEDS = tuple(range(10, 20))
JUDGE = ("stdlib-K3", "system-K3")
#: the judge's run settings taken from its record (results.json's meta part of the experiment)
RUN_KEYS = ("final_tokens", "system_heldout", "batch_size", "seq_len", "proxy", "eval_seqs", "planted_docs")
FEASIBLE, NOT_FEASIBLE, UNDECIDED = "JOINTLY FEASIBLE", "NOT FEASIBLE AT THE POINTS TRIED", "UNDECIDED"
LATTICE = 400  # the quadratic fit's lattice: step 1/400 = 0.0025


# ============================================================================ points and rule


def ball_points(p: dict[str, float], radius: float = RADIUS) -> dict[str, dict[str, float]]:
    """The 12 points on the boundary of the L1 ball of ``radius`` around ``p`` (K = 3): the 6 vertices
    and the 6 edge midpoints, each named by its move (``+code-prose``: 0.05 from prose to code)."""
    names = sorted(p)
    if len(names) != 3:
        raise ValueError(f"ball_points: K = 3 sources expected, got {names}")
    h = radius / 2
    out = {}
    for i, j in itertools.permutations(names, 2):
        out[f"+{j}-{i}"] = _moved(p, {j: h, i: -h})
    for j in names:
        i, k = (n for n in names if n != j)
        out[f"+{j}-{i}/{k}"] = _moved(p, {j: h, i: -h / 2, k: -h / 2})
        out[f"-{j}+{i}/{k}"] = _moved(p, {j: -h, i: h / 2, k: h / 2})
    for name, w in out.items():
        if min(w.values()) < 0 or not np.isclose(sum(w.values()), 1.0):
            raise ValueError(f"ball point {name} {w} is not in the simplex (planted shares {p})")
        if not np.isclose(rq.l1(w, p), radius):
            raise ValueError(f"ball point {name} is at L1 {rq.l1(w, p)} from {p}, not {radius}")
    if len({json.dumps(w, sort_keys=True) for w in out.values()}) != len(out):
        raise ValueError(f"ball points around {p} are not distinct")
    return out


def _moved(p: dict[str, float], delta: dict[str, float]) -> dict[str, float]:
    return {n: p[n] + delta.get(n, 0.0) for n in p}


def _upper(r: dict) -> float:
    return r["regret"][0] + 2 * r["regret_se"]


def _check(r: dict) -> str:
    """`report.verdict` of a regret record: MET (mean + 2 SE <= TARGET), MISSED or undecided."""
    return report.verdict(r["regret"][0], r["regret_se"], TARGET)


def select(stage1: dict[str, dict]) -> str:
    """The point to confirm: the lowest mean + 2 SE among those within the target, else of all."""
    passing = [n for n, r in stage1.items() if _check(r) == "MET"]
    return min(passing or stage1, key=lambda n: _upper(stage1[n]))


def verdict(stage1: dict[str, dict], confirmation: dict | None) -> str:
    """The rule of the module docstring. ``stage1``: ``{point: run_quality._regret(...)}`` over the
    evaluation seeds; ``confirmation``: the selected point's regret over the confirmation seeds (None:
    not run)."""
    if _check(stage1[select(stage1)]) == "MET" and confirmation is not None and _check(confirmation) == "MET":
        return FEASIBLE
    if all(_check(r) == "MISSED" for r in stage1.values()):
        return NOT_FEASIBLE
    return UNDECIDED


# ============================================================================ the supplementary fit


def _design(W: np.ndarray) -> np.ndarray:
    pairs = [W[:, i] * W[:, j] for i, j in itertools.combinations(range(W.shape[1]), 2)]
    return np.column_stack([W, *pairs])


def quadratic_fit(points: list[dict], losses: list[float], p: dict, pick: dict) -> dict:
    """A Scheffe quadratic of final loss over the simplex (module docstring): a model estimate."""
    names = sorted(p)
    W = np.array([[w[n] for n in names] for w in points])
    y = np.asarray(losses, dtype=float)
    coef, *_ = np.linalg.lstsq(_design(W), y, rcond=None)
    resid = y - _design(W) @ coef
    dof = len(y) - len(coef)
    lat = np.array([(a, b, LATTICE - a - b) for a in range(LATTICE + 1) for b in range(LATTICE + 1 - a)]) / LATTICE
    f = _design(lat) @ coef
    pv = np.array([p[n] for n in names])
    in_ball = np.abs(lat - pv).sum(axis=1) <= RADIUS + 1e-9
    at = lambda w: float((_design(np.array([[w[n] for n in names]])) @ coef)[0])  # noqa: E731
    i_all, i_ball = int(np.argmin(f)), int(np.flatnonzero(in_ball)[np.argmin(f[in_ball])])
    named = lambda row: {n: float(x) for n, x in zip(names, row)}  # noqa: E731
    return {"n": len(y), "residual_std": float(np.sqrt(resid @ resid / dof)), "coef": coef.tolist(),
            "min_simplex": named(lat[i_all]), "min_simplex_loss": float(f[i_all]),
            "min_ball": named(lat[i_ball]), "min_ball_loss": float(f[i_ball]),
            "min_ball_l1": rq.l1(named(lat[i_ball]), p), "pick_loss": at(pick), "planted_loss": at(p),
            "regret_ball_vs_pick": float(f[i_ball]) - at(pick), "regret_planted_vs_pick": at(p) - at(pick),
            "regret_ball_vs_min": float(f[i_ball] - f[i_all])}


# ============================================================================ runs


def check_cache(work: Path, data: dict, rows: list[dict], run) -> dict:
    """The ``planted`` row's mixture at the first evaluation seed must be cached with the judge's loss."""
    s = EVAL_SEEDS[0]
    judge = next(r for r in rows if r["method"] == "planted" and r["target"] == "planted" and r["seed"] == s)
    if judge["weights"] != data["planted_tokens"]:
        raise SystemExit(f"the judge's planted row trained {judge['weights']}, the data gives {data['planted_tokens']}")
    f = rq.final_run(work, data, judge["weights"], s, run)  # a miss trains this one run, then stops
    if not f["cached"] or f["losses"]["planted"] != judge["final_loss"]:
        raise SystemExit(f"{work}: the judge's planted final run of seed {s} is not a cache hit with its loss "
                         f"{judge['final_loss']} (cached {f['cached']}, loss {f['losses']['planted']}): a fingerprint "
                         "changed; stopped before the study's runs")
    return {"seed": s, "loss": judge["final_loss"], "cached": True}


def train_points(work: Path, data: dict, points: dict, seeds, run, exp: str) -> list[dict]:
    """One final run per (point, seed), seed-major (a partial run is balanced over the points)."""
    rows = []
    for s in seeds:
        for name, w in points.items():
            f = rq.final_run(work, data, w, s, run)
            rows.append({"point": name, "seed": s, "weights": w, "final_loss": f["losses"]["planted"],
                         "cached": f["cached"], "wall_s": f["wall_s"]})
            rq.log(f"{exp} s{s} {name:22s} {f['losses']['planted']:.4f}{' (cached)' if f['cached'] else ''}")
    return rows


def study(exp: str, work: str, results: dict, args) -> dict:
    jrows, jsum = [r for r in results["runs"] if r["exp"] == exp], results["summary"][exp]
    run = rq.judge_args(results, exp)  # the judge's recorded settings, in this study's cache folder
    run.work, run.experiments, run.threads = work, [exp], args.threads
    wpath = Path(work)
    data = rq.prepare(wpath, run)[exp]
    p = data["planted_tokens"]
    if p != jsum["planted_tokens"]:
        raise SystemExit(f"{exp}: planted token shares {p} differ from results.json's {jsum['planted_tokens']}")
    cache = check_cache(wpath, data, jrows, run)
    orc = rq.oracle(jrows, "planted", run.seeds)
    points = {"planted": p, **ball_points(p)}
    rows = train_points(wpath, data, points, args.eval_seeds, run, exp)
    stage1 = {}
    for name in points:
        rs = [r for r in rows if r["point"] == name]
        stage1[name] = {**rq._regret(rs, orc["by_seed"]), "l1": rq.l1(points[name], p), "weights": points[name],
                        "wins": sum(r["final_loss"] < orc["by_seed"][r["seed"]] for r in rs)}
    best = select(stage1)
    pick = rq.grid_pick(results, exp, "planted")
    conf_rows = train_points(wpath, data, {best: points[best], "grid pick": pick}, args.confirm_seeds, run, exp)
    pick_by_seed = {r["seed"]: r["final_loss"] for r in conf_rows if r["point"] == "grid pick"}
    conf_best = [r for r in conf_rows if r["point"] == best]
    confirmation = {**rq._regret(conf_best, pick_by_seed), "point": best, "pick": pick,
                    "wins": sum(r["final_loss"] < pick_by_seed[r["seed"]] for r in conf_best)}
    grid0 = [r for r in jrows if r["method"] == "grid-point" and r["target"] == "planted" and r["seed"] == run.seeds[0]]
    fit = quadratic_fit([r["weights"] for r in grid0], [r["final_loss"] for r in grid0], p, pick)
    return {"planted_tokens": p, "cache_check": cache, "oracle_picks": orc["picks"], "stage1": stage1,
            "selected": best, "confirmation": confirmation, "verdict": verdict(stage1, confirmation),
            "quadratic_fit": fit, "rows": rows + conf_rows, "settings": {k: getattr(run, k) for k in RUN_KEYS}}


# ============================================================================ report


def _pm(r: dict) -> str:
    return f"{r['regret'][0]:+.4f} ± {r['regret_se']:.4f}"


def _w(w: dict) -> str:
    return " / ".join(f"{n} {x:.3f}" for n, x in sorted(w.items()))


def render(saved: dict, out: Path) -> None:
    lines = ["# Can any mixture within L1 0.1 of the planted one meet the regret target? (generated by "
             "`feasibility.py`)", ""]
    for m in saved["meta"]["parts"]:
        lines += [f"- {', '.join(m['used'])}: {m['date']}, commit {m['commit']}, `{m['command']}` under "
                  f"`nice -n {m['nice']}`, torch threads {m['threads']}; wall {m['wall_s'] / 60:.1f} min; "
                  f"load average at start / end {m['load_start']} / {m['load_end']}"]
    lines += [f"- machine: {saved['meta']['parts'][0]['machine']}",
              f"- rule (module docstring, committed before the runs): feasible if a point has mean + 2 SE ≤ {TARGET} "
              f"over seeds {EVAL_SEEDS[0]}-{EVAL_SEEDS[-1]} and again over seeds {CONFIRM_SEEDS[0]}-{CONFIRM_SEEDS[-1]}; "
              f"not feasible at the points tried if every point has mean − 2 SE > {TARGET}; else undecided", ""]
    for exp, c in saved["corpora"].items():
        lines += _corpus_lines(exp, c)
    path = out / "feasibility.md"
    _common.write_atomic(str(path), "\n".join(lines) + _common.kept_analysis(str(path)))


def _corpus_lines(exp: str, c: dict) -> list[str]:
    s1, conf, fit = c["stage1"], c["confirmation"], c["quadratic_fit"]
    n = s1["planted"]["regret_seeds"]
    rows = [[f"`{k}`", _w(r["weights"]), f"{r['l1']:.3f}", _pm(r), f"{_upper(r):+.4f}", f"{r['wins']}/{n}"]
            for k, r in sorted(s1.items(), key=lambda kv: _upper(kv[1]))]
    st = c["settings"]
    return [
        f"## {exp}", "",
        f"planted token shares p: {_w(c['planted_tokens'])}; judge settings: " + ", ".join(f"{k} {v}" for k, v in
                                                                                          st.items()),
        f"cache check: the judge's planted run of seed {c['cache_check']['seed']} came from the cache with its loss "
        f"{c['cache_check']['loss']:.4f}; final runs trained here: {sum(not r['cached'] for r in c['rows'])} of "
        f"{len(c['rows'])}", "",
        "| point | weights (token shares) | L1 to p | regret ± SE (seeds 1-9) | mean + 2 SE | wins vs oracle |",
        "| :-- | :-- | --: | --: | --: | --: |", *("| " + " | ".join(r) + " |" for r in rows), "",
        f"selected for confirmation: `{c['selected']}`; seeds {CONFIRM_SEEDS[0]}-{CONFIRM_SEEDS[-1]} against the grid's "
        f"pick {_w(conf['pick'])}: regret {_pm(conf)} (mean + 2 SE {_upper(conf):+.4f}), wins {conf['wins']}/"
        f"{conf['regret_seeds']}", "",
        f"**Verdict: {c['verdict']}.**", "",
        f"Model estimate (not a measurement): a quadratic fitted to the {fit['n']} grid points of seed 0 "
        f"(residual std {fit['residual_std']:.4f}) has its simplex minimum at {_w(fit['min_simplex'])} and its "
        f"minimum over the L1 ball at {_w(fit['min_ball'])} (L1 {fit['min_ball_l1']:.3f}); fitted regret vs the "
        f"grid's pick: ball minimum {fit['regret_ball_vs_pick']:+.4f}, p {fit['regret_planted_vs_pick']:+.4f}; "
        f"ball minimum vs the fit's minimum {fit['regret_ball_vs_min']:+.4f}", "",
    ]


def merge(paths: list[str]) -> dict:
    loaded = [json.loads(Path(p).read_text()) for p in paths]
    return {"meta": {"parts": [m for s in loaded for m in s["meta"]["parts"]]},
            "corpora": {e: c for s in loaded for e, c in s["corpora"].items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--judge", nargs="+", metavar="EXP=WORK", default=[],
                    help="the judge's experiment EXP (stdlib-K3, system-K3) with its cache folder WORK")
    ap.add_argument("--results", default=str(HERE / "results.json"), help="the judge's record")
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=list(EVAL_SEEDS))
    ap.add_argument("--confirm-seeds", type=int, nargs="+", default=list(CONFIRM_SEEDS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    ap.add_argument("--out", default=str(HERE), help="where feasibility.json/.md go")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="one feasibility.json/.md from these runs' files")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        saved = merge(args.merge)
    else:
        looks = [spec.partition("=")[::2] for spec in args.judge]
        if not looks or any(e not in JUDGE or not w for e, w in looks):
            raise SystemExit(f"--judge {args.judge}: expected EXP=WORK with EXP one of {', '.join(JUDGE)}")
        torch.set_num_threads(args.threads)
        t0, load0 = time.perf_counter(), rq._uptime()
        results = json.loads(Path(args.results).read_text())
        corpora = {exp: study(exp, work, results, args) for exp, work in looks}
        meta = rq.run_meta(t0, load0, nice=os.nice(0), threads=args.threads, used=[e for e, _ in looks])
        saved = {"meta": {"parts": [meta]}, "corpora": corpora}
    _common.write_atomic(str(out / "feasibility.json"), json.dumps(saved, indent=1))
    render(saved, out)
    rq.log(f"wrote {out / 'feasibility.md'}: " + "; ".join(f"{e} {c['verdict']}" for e, c in saved["corpora"].items()))


if __name__ == "__main__":
    main()
