"""Mixture quality: FastMix against MixMin, Aioli, DoReMi and the baselines, on the stdlib corpus.

Protocol (see benchmarks/quality/results.md for the numbers and docs/methods.md for the methods):

* Data: the demo corpus (:func:`fastmix_data.corpus.build_corpus`, 5 domains from the running
  Python's standard library) with train / validation / test splits, byte tokenizer.
* Two experiments: **K4** trains on code, tests, prose, markup; **K3** on code, prose, markup (the
  grid oracle over the simplex at step 0.1 -- 66 mixtures -- is only affordable for K <= 3).
* Targets, each with a *search* version (validation split: what the methods see) and an *eval*
  version (test split: what the final models are scored on):
  T1 = the average loss over the training domains (group-averaged);
  T2 = a held-out domain that is not a training source (docstrings);
  T3 = a planted target (:func:`build_planted_target`) with known proportions of the training domains.
* Every method runs from the same entry point (:func:`fastmix_data.search.methods.run_method`)
  with the same proxy architecture (cpu preset), optimiser and data-order seed; the mixture it
  exports is then trained **from scratch** at the same final budget (:func:`train_static`) and
  scored on the eval target. Seeds pair everything: seed s = model init s and data order s.
* Reported: final eval loss mean ± std over seeds, paired difference vs stratified (same seed),
  regret vs the grid oracle (K3), search compute as a fraction of the final run's training FLOPs,
  and on T3 the L1 distance of the weights to the planted token shares.

Everything is cached under ``--work`` (final runs, method results, MixMin proxies, DoReMi references),
so an interrupted run resumes where it stopped. ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
import _common  # noqa: E402

from fastmix_data.corpus import build_corpus, build_planted_target  # noqa: E402
from fastmix_data.search.baselines import simplex_grid  # noqa: E402
from fastmix_data.search.methods import run_method  # noqa: E402
from fastmix_data.search.train_static import TrainConfig, as_target, train_static  # noqa: E402

EXPERIMENTS = {
    "K4": {"sources": ["code", "tests", "prose", "markup"],
           "planted": {"prose": 0.45, "code": 0.30, "markup": 0.15, "tests": 0.10}},
    "K3": {"sources": ["code", "prose", "markup"],
           "planted": {"prose": 0.50, "code": 0.35, "markup": 0.15}},
}
HELD_OUT = "docstrings"
TARGETS = ("T1", "T2", "T3")
SEARCH_METHODS = ("fastmix", "mixmin", "aioli")  # use the target
BLIND_METHODS = ("stratified", "natural", "doremi")  # do not
#: the target each method optimises (for the "beats or matches stratified" check)
OPTIMISES = {"fastmix": TARGETS, "mixmin": TARGETS, "aioli": TARGETS, "doremi": ("T1",)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ============================================================================ data


def prepare_data(work: Path, args) -> dict:
    corpus = work / "corpus"
    if not (corpus / "corpus.json").exists():
        log("building the stdlib corpus")
        build_corpus(corpus, seed=0, formats=("parquet",), progress=False)
    out = {}
    for exp, spec in EXPERIMENTS.items():
        srcs = {d: str(corpus / "train" / d) for d in spec["sources"]}
        planted = {}
        for split, n in (("validation", args.planted_docs_search), ("test", args.planted_docs_eval)):
            d = work / "planted" / f"{exp}-{split}"
            side = build_planted_target(d, corpus, spec["planted"], n_docs=n, seed=0, split=split,
                                        allow_repeats=False)
            planted[split] = (d, side)
        L = args.seq_len
        search = {
            "T1": as_target({d: str(corpus / "validation" / d) for d in spec["sources"]}, L,
                            max_seqs=args.search_seqs, name="T1"),
            "T2": as_target(str(corpus / "validation" / HELD_OUT), L, max_seqs=args.search_seqs, name="T2"),
            "T3": as_target(str(planted["validation"][0]), L, name="T3"),  # never subsampled: exact shares
        }
        evals = {
            "T1": as_target({d: str(corpus / "test" / d) for d in spec["sources"]}, L,
                            max_seqs=args.eval_seqs_per_group * len(spec["sources"]), name="T1"),
            "T2": as_target(str(corpus / "test" / HELD_OUT), L, max_seqs=args.eval_seqs, name="T2"),
            "T3": as_target(str(planted["test"][0]), L, max_seqs=args.eval_seqs, name="T3"),
        }
        out[exp] = {"sources": srcs, "search": search, "eval": evals,
                    "planted_doc": planted["validation"][1]["proportions"],
                    "planted_tokens": search["T3"].full_shares}
    return out


# ============================================================================ configs


def train_config(args, seed: int, max_tokens: int) -> dict:
    return dict(model="cpu", batch_size=args.batch_size, seq_len=args.seq_len, max_tokens=max_tokens,
                lr=args.lr, lr_schedule="cosine", warmup_steps=5, seed=seed, data_seed=seed)


def method_config(args, exp: str, seed: int, work: Path) -> dict:
    F = args.final_tokens
    K = len(EXPERIMENTS[exp]["sources"])
    return {
        "train": train_config(args, seed, F),
        "cache_dir": str(work / "cache"),
        "target_max_seqs": None,  # search targets are already capped in prepare_data
        "fastmix": {"train": {"max_tokens": int(args.fastmix_budget * F)}, "search": {"z_lr": args.z_lr}},
        "mixmin": {"proxy_tokens": int(args.mixmin_proxy_budget * F), "proxy_seed": 0},
        "aioli": {"train": {"max_tokens": int(args.aioli_budget * F)}, "rounds": args.aioli_rounds,
                  "sweeps": args.aioli_sweeps, "probe_steps": args.aioli_probe_steps, "eta": args.aioli_eta,
                  "rho": 0.5 if K == 3 else 0.75, "seed": seed,
                  "initial_steps": int(args.aioli_budget * F) // (args.batch_size * args.seq_len) // 8},
        "doremi": {"train": {"max_tokens": int(args.doremi_budget * F)}, "log_every": 8},
    }


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ============================================================================ runs


def run_search_cached(work: Path, exp: str, method: str, tname: str | None, seed: int, data: dict, cfg: dict) -> dict:
    """A method's weights and compute, cached as JSON (the method's own outputs go to runs/)."""
    desc = {"exp": exp, "method": method, "target": tname, "seed": seed, "cfg": cfg.get(method, {}),
            "train": cfg["train"], "target_fp": data["search"][tname].fingerprint() if tname else None,
            "sources": data["sources"]}
    path = work / "methods" / f"{exp}-{method}-{tname or 'blind'}-s{seed}-{_key(desc)}.json"
    if path.exists():
        return json.loads(path.read_text())
    out_dir = work / "runs" / exp / (tname or "blind") / method / f"seed{seed}"
    target = data["search"][tname] if tname else data["search"]["T1"]
    t0 = time.perf_counter()
    r = run_method(method, data["sources"], target if method != "doremi" else None, cfg, out_dir=out_dir)
    wall = time.perf_counter() - t0
    rec = {"weights": r.weights, "flops": r.compute["flops"], "tokens": r.compute["tokens"], "wall_s": wall,
           "extra": {k: v for k, v in r.extra.items() if k in ("last", "average", "report", "converged", "eg_steps",
                                                               "online_target_loss", "probe_steps", "mean_excess")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    return rec


def final_run(work: Path, data: dict, weights: dict, seed: int, args) -> dict:
    cfg = TrainConfig(**train_config(args, seed, args.final_tokens))
    r = train_static(data["sources"], weights, data["eval"], cfg, cache_dir=work / "finals", keep_model=False)
    return {"losses": {k: v["loss"] for k, v in r.losses.items()}, "train_flops": r.compute["flops"]["train"],
            "cached": r.cached, "wall_s": r.compute["wall_s"]}


def run_experiment(work: Path, exp: str, data: dict, args) -> list[dict]:
    rows = []
    for seed in args.seeds:
        cfg = method_config(args, exp, seed, work)
        jobs = [(m, None) for m in BLIND_METHODS] + [(m, t) for t in TARGETS for m in SEARCH_METHODS]
        for method, tname in jobs:
            t0 = time.perf_counter()
            s = run_search_cached(work, exp, method, tname, seed, data, cfg)
            f = final_run(work, data, s["weights"], seed, args)
            for t in (TARGETS if tname is None else (tname,)):
                rows.append({"exp": exp, "target": t, "method": method, "seed": seed, "weights": s["weights"],
                             "search_flops": s["flops"]["total"],
                             "search_flops_with_cached": s["flops"].get("total_with_cached", s["flops"]["total"]),
                             "search_wall_s": s["wall_s"], "final_loss": f["losses"][t],
                             "final_train_flops": f["train_flops"], "extra": s["extra"]})
            log(f"{exp} seed {seed} {method:10s} {tname or '-':3s} "
                + " ".join(f"{k}={v:.3f}" for k, v in s["weights"].items())
                + f"  final {f['losses'][tname or 'T1']:.4f}  ({time.perf_counter() - t0:.1f}s)")
        f = final_run(work, data, data["planted_tokens"], seed, args)
        rows.append({"exp": exp, "target": "T3", "method": "planted", "seed": seed, "weights": data["planted_tokens"],
                     "search_flops": 0.0, "search_wall_s": 0.0, "final_loss": f["losses"]["T3"],
                     "final_train_flops": f["train_flops"], "extra": {}})
        if exp == "K3" and not args.skip_grid:
            names = data["sources"]
            t0 = time.perf_counter()
            for p in simplex_grid(len(names), args.grid_step):
                w = dict(zip(names, p))
                f = final_run(work, data, w, seed, args)
                for t in TARGETS:
                    rows.append({"exp": exp, "target": t, "method": "grid-point", "seed": seed, "weights": w,
                                 "search_flops": 0.0, "search_wall_s": 0.0, "final_loss": f["losses"][t],
                                 "final_train_flops": f["train_flops"], "extra": {}})
            log(f"{exp} seed {seed} grid: {len(simplex_grid(len(names), args.grid_step))} mixtures "
                f"({time.perf_counter() - t0:.1f}s)")
    return rows


# ============================================================================ summary


def _ms(x) -> tuple[float, float]:
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def l1(w: dict, p: dict) -> float:
    return float(sum(abs(w.get(k, 0.0) - p.get(k, 0.0)) for k in set(w) | set(p)))


def summarise(rows: list[dict], data: dict, args) -> dict:
    out = {}
    for exp in EXPERIMENTS:
        er = [r for r in rows if r["exp"] == exp]
        if not er:
            continue
        planted = data[exp]["planted_tokens"]
        K = len(EXPERIMENTS[exp]["sources"])
        per = {}
        oracle = {}
        grid = [r for r in er if r["method"] == "grid-point"]
        if grid:
            n_points = len(simplex_grid(K, args.grid_step))
            for t in TARGETS:
                by_w: dict[str, list] = {}
                for r in grid:
                    if r["target"] == t:
                        by_w.setdefault(json.dumps(r["weights"], sort_keys=True), []).append(r)
                best = min(by_w.values(), key=lambda rs: np.mean([r["final_loss"] for r in rs]))
                oracle[t] = {"weights": best[0]["weights"], "by_seed": {r["seed"]: r["final_loss"] for r in best},
                             "loss": _ms([r["final_loss"] for r in best]),
                             "l1_to_planted": l1(best[0]["weights"], planted) if t == "T3" else None}
        for t in TARGETS:
            strat = {r["seed"]: r["final_loss"] for r in er if r["method"] == "stratified" and r["target"] == t}
            for m in BLIND_METHODS + SEARCH_METHODS + ("planted",):
                rs = sorted((r for r in er if r["method"] == m and r["target"] == t), key=lambda r: r["seed"])
                if not rs:
                    continue
                losses = [r["final_loss"] for r in rs]
                diffs = [r["final_loss"] - strat[r["seed"]] for r in rs if r["seed"] in strat]
                # reused (cached) proxies are charged in full to every run that uses them
                frac = [r.get("search_flops_with_cached", r["search_flops"]) / r["final_train_flops"] for r in rs]
                d = {"loss": _ms(losses), "delta_vs_stratified": _ms(diffs),
                     "wins_vs_stratified": int(sum(x < 0 for x in diffs)), "n": len(rs),
                     "search_fraction": _ms(frac),
                     "search_fraction_spent": _ms([r["search_flops"] / r["final_train_flops"] for r in rs]),
                     "search_wall_s": _ms([r["search_wall_s"] for r in rs]),
                     "weights": {k: _ms([r["weights"][k] for r in rs])[0] for k in rs[0]["weights"]}}
                if t == "T3":
                    d["l1_to_planted"] = _ms([l1(r["weights"], planted) for r in rs])
                    if m == "fastmix":
                        d["l1_last_to_planted"] = _ms([l1(r["extra"]["last"], planted) for r in rs])
                if t in oracle:
                    d["regret_vs_grid"] = _ms([r["final_loss"] - oracle[t]["by_seed"][r["seed"]] for r in rs])
                per[f"{t}/{m}"] = d
            if t in oracle:
                per[f"{t}/grid"] = {"loss": oracle[t]["loss"], "weights": oracle[t]["weights"],
                                    "search_fraction": (float(n_points), 0.0),
                                    "delta_vs_stratified": _ms([oracle[t]["by_seed"][s] - strat[s] for s in strat]),
                                    "l1_to_planted": (oracle[t]["l1_to_planted"], 0.0) if t == "T3" else None}
        out[exp] = {"methods": per, "planted_tokens": planted, "planted_docs": data[exp]["planted_doc"],
                    "uniform_l1_to_planted": l1({k: 1 / K for k in planted}, planted)}
    return out


# ============================================================================ report


def fmt(ms, digits=3, signed=False) -> str:
    if ms is None:
        return "–"
    m, s = ms
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(m)} ± {s:.{digits}f}"


def acceptance(summary: dict) -> list[str]:
    lines = []
    for exp, s in summary.items():
        mm = s["methods"].get("T3/mixmin")
        if mm:
            v = mm["l1_to_planted"][0]
            lines.append(f"- {exp} T3: MixMin L1 to the planted token shares = {v:.3f} "
                         f"({'PASS' if v <= 0.15 else 'FAIL'}, threshold 0.15; uniform: {s['uniform_l1_to_planted']:.3f})")
        fm = s["methods"].get("T3/fastmix")
        if fm:
            v, u = fm["l1_to_planted"][0], s["uniform_l1_to_planted"]
            lv = fm["l1_last_to_planted"][0]
            lines.append(f"- {exp} T3: FastMix L1 = {v:.3f} (exported trajectory average), {lv:.3f} (last weights) vs "
                         f"{u:.3f} for uniform: {'moves toward the planted mixture' if v < u else 'does NOT move toward it'}")
        for m, targets in OPTIMISES.items():
            for t in targets:
                d = s["methods"].get(f"{t}/{m}")
                if not d:
                    continue
                dm, ds = d["delta_vs_stratified"]
                verdict = "beats" if dm < 0 else ("matches" if dm <= 0.002 else "LOSES to")
                lines.append(f"- {exp} {t}: {m} {verdict} stratified: Δ = {dm:+.4f} ± {ds:.4f} nats "
                             f"({d['wins_vs_stratified']}/{d['n']} seeds better)")
    return lines


def write_report(summary: dict, rows: list[dict], data: dict, args, wall: float, meta: dict, out: Path) -> None:
    lines = ["# Mixture quality: FastMix vs MixMin, Aioli, DoReMi and baselines", "",
             f"- date: {meta['date']}", f"- machine: {meta['machine']}", f"- torch threads: {args.threads}",
             f"- commit: {meta['commit']}", f"- command: `{meta['command']}`",
             f"- total wall time: {wall / 60:.1f} min", "",
             "## Setup", "",
             f"- data: stdlib demo corpus (`build_corpus(seed=0)`), byte tokenizer, sequences of {args.seq_len}+1 tokens,"
             f" batch {args.batch_size}.",
             f"- proxy and final model: `cpu` preset (2 layers, d=128, {meta['n_params']:,} matmul parameters), AdamW "
             f"lr {args.lr}, cosine, 5 warm-up steps, wd 0.1, clip 1.0.",
             f"- final run: **{args.final_tokens:,} tokens** ({args.final_tokens // (args.batch_size * args.seq_len)} steps),"
             f" trained from scratch on each exported mixture; seeds {args.seeds} (model init = data order = seed).",
             f"- search budgets (× final tokens): FastMix {args.fastmix_budget} (z_lr {args.z_lr}, other SearchConfig "
             f"defaults scaled to the budget), MixMin {args.mixmin_proxy_budget} per source proxy (one proxy set, seed 0,"
             f" reused by every seed and target), Aioli {args.aioli_budget} (an eighth on uniform first, then "
             f"{args.aioli_rounds} rounds, R={args.aioli_sweeps} antithetic sweeps, S={args.aioli_probe_steps}, eta "
             f"{args.aioli_eta}, rho 0.75 for K=4 / 0.5 for K=3; probe steps included),"
             f" DoReMi {args.doremi_budget} proxy + {args.doremi_budget} reference.",
             "- search targets: validation splits (T1 group-averaged over the training domains, T2 docstrings, T3 the "
             "planted validation set); eval targets: the test splits / a planted test set with the same proportions.",
             "- compute = search FLOPs (6N per trained token + 2N per evaluated token, validation and scoring passes "
             "included) / the final run's training FLOPs. MixMin's proxies (trained once, reused by every seed, "
             "target and experiment) are charged in full to every run; see 'Compute' below for the amortised cost.",
             ""]
    for exp, s in summary.items():
        K = len(EXPERIMENTS[exp]["sources"])
        lines += [f"## {exp}: sources {', '.join(EXPERIMENTS[exp]['sources'])}", "",
                  "planted T3 (token shares of the search target): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in s["planted_tokens"].items())
                  + " (document proportions " + ", ".join(f"{k} {v:.2f}" for k, v in s["planted_docs"].items()) + ")", ""]
        header = ["method", "search compute (× final)"]
        for t in TARGETS:
            header += [f"{t} loss", f"{t} Δ vs strat (wins)"] + ([f"{t} regret vs grid"] if K <= 3 else [])
        header += ["T3 L1 to planted"]
        table = []
        for m in ("stratified", "natural", "doremi", "fastmix", "mixmin", "aioli", "planted", "grid"):
            if not any(f"{t}/{m}" in s["methods"] for t in TARGETS):
                continue
            fr = [s["methods"][f"{t}/{m}"]["search_fraction"][0] for t in TARGETS if f"{t}/{m}" in s["methods"]]
            row = [m, {"grid": f"{fr[0]:.0f} (oracle)", "planted": "0 (reference)"}.get(m, f"{np.mean(fr):.2f}")]
            for t in TARGETS:
                d = s["methods"].get(f"{t}/{m}")
                if d is None:
                    row += ["–", "–"] + (["–"] if K <= 3 else [])
                    continue
                delta = d.get("delta_vs_stratified")
                wins = d.get("wins_vs_stratified")
                row += [fmt(d["loss"], 4),
                        "–" if m == "stratified" else (fmt(delta, 4, signed=True) + (f" ({wins}/{d['n']})" if wins is not None else ""))]
                if K <= 3:
                    row += [fmt(d.get("regret_vs_grid"), 4, signed=True) if m != "grid" else "0"]
            d3 = s["methods"].get(f"T3/{m}")
            row += [fmt(d3.get("l1_to_planted"), 3) if d3 and d3.get("l1_to_planted") else "–"]
            table.append(row)
        lines += [_common.markdown_table(header, table), ""]
        wl = []
        for m in ("stratified", "natural", "doremi", "fastmix", "mixmin", "aioli", "grid"):
            for t in TARGETS:
                d = s["methods"].get(f"{t}/{m}")
                if d and (t == "T3" or m in SEARCH_METHODS + ("grid",)):
                    wl.append([m, t, ", ".join(f"{k} {v:.2f}" for k, v in d["weights"].items())])
        lines += ["<details><summary>exported weights (mean over seeds)</summary>", "",
                  _common.markdown_table(["method", "target", "weights"], wl), "", "</details>", ""]
    lines += ["## Acceptance checks (generated)", ""] + acceptance(summary) + [""]
    lines += ["## Reading the results", "", "ANALYSIS_PLACEHOLDER", ""]
    text = "\n".join(lines)
    old = out / "results.md"
    if old.exists() and "ANALYSIS_PLACEHOLDER" not in old.read_text():
        # keep a hand-written analysis from an earlier run of the same protocol
        prev = old.read_text()
        if "## Reading the results" in prev:
            text = text.replace("## Reading the results\n\nANALYSIS_PLACEHOLDER\n",
                                prev[prev.index("## Reading the results"):])
    _common.write_atomic(str(out / "results.md"), text)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = list(summary)
    fig, axes = plt.subplots(len(exps), 3, figsize=(13, 3.8 * len(exps)), squeeze=False)
    colors = {"stratified": "k", "natural": "grey", "doremi": "tab:purple", "fastmix": "tab:red",
              "mixmin": "tab:blue", "aioli": "tab:green", "planted": "tab:brown", "grid": "tab:orange"}
    floor = 0.02
    for i, exp in enumerate(exps):
        for j, t in enumerate(TARGETS):
            ax = axes[i][j]
            for m, c in colors.items():
                d = summary[exp]["methods"].get(f"{t}/{m}")
                if not d:
                    continue
                x = max(d["search_fraction"][0], floor)
                ax.errorbar([x], [d["loss"][0]], yerr=[d["loss"][1]], fmt="o", color=c, label=m, capsize=3)
            ax.set_xscale("log")
            ax.set_title(f"{exp} {t}")
            ax.set_xlabel(f"search compute / final run (log; {floor} = none)")
            ax.set_ylabel("final eval loss (nats/token)")
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="out/quality", help="cache and run folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    ap.add_argument("--final-tokens", type=int, default=16 * 64 * 64, help="final run budget (tokens)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--fastmix-budget", type=float, default=1.0)
    ap.add_argument("--z-lr", type=float, default=0.1)
    ap.add_argument("--mixmin-proxy-budget", type=float, default=8.0, help="per-source proxy tokens, × final")
    ap.add_argument("--aioli-budget", type=float, default=2.0)
    ap.add_argument("--aioli-sweeps", type=int, default=2)
    ap.add_argument("--aioli-rounds", type=int, default=4)
    ap.add_argument("--aioli-probe-steps", type=int, default=2)
    ap.add_argument("--aioli-eta", type=float, default=5.0)
    ap.add_argument("--doremi-budget", type=float, default=1.0)
    ap.add_argument("--grid-step", type=float, default=0.1)
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--search-seqs", type=int, default=512, help="cap on search-target sequences (T1, T2)")
    ap.add_argument("--eval-seqs", type=int, default=96, help="cap on eval-target sequences (T2, T3)")
    ap.add_argument("--eval-seqs-per-group", type=int, default=24, help="T1 eval sequences per domain")
    ap.add_argument("--planted-docs-search", type=int, default=24)
    ap.add_argument("--planted-docs-eval", type=int, default=36)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    ap.add_argument("--from-results", action="store_true",
                    help="re-render results.md and quality.png from results.json (no training)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny budgets, grid step 0.5; writes into --work")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.final_tokens, args.grid_step = [0], 16 * 64 * 12, 0.5
        args.mixmin_proxy_budget, args.aioli_rounds, args.aioli_probe_steps = 1.0, 2, 1
    if args.from_results:
        saved = json.loads((HERE / "results.json").read_text())
        meta = saved["meta"]
        write_report(saved["summary"], saved["runs"], None, argparse.Namespace(**meta["args"]), meta["wall_s"], meta,
                     HERE)
        plot(saved["summary"], HERE / "quality.png")
        log("re-rendered results.md and quality.png from results.json")
        return
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_data(work, args)
    rows = []
    for exp in args.experiments:
        rows += run_experiment(work, exp, data[exp], args)
    summary = summarise(rows, data, args)
    wall = time.perf_counter() - t0
    from fastmix_data.search.model import build_proxy, count_params, proxy_config

    meta = {"date": _common.today(), "machine": ", ".join(f"{k}: {v}" for k, v in _common.machine_info().items()),
            "command": _common.command_line(), "commit": _common.git_revision(str(REPO)),
            "n_params": count_params(build_proxy(proxy_config("cpu")))["flops"], "wall_s": wall,
            "args": vars(args)}
    out = work if args.quick else HERE  # a smoke run never overwrites the published results
    _common.write_atomic(str(out / "results.json"),
                         json.dumps({"meta": meta, "summary": summary, "runs": rows}, indent=1, default=str))
    write_report(summary, rows, data, args, wall, meta, out)
    plot(summary, out / "quality.png")
    log(f"done in {wall / 60:.1f} min; wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
