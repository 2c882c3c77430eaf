"""Mixture quality: every method AT ITS DEFAULTS against a grid oracle, on two corpora.

Protocol (numbers and reading in benchmarks/quality/results.md; methods in docs/methods.md):

* **Corpora.** ``stdlib``: the demo corpus (:func:`fastmix_data.corpus.build_corpus`). ``system``:
  real text on this machine that is not in the standard library -- third-party package sources,
  man pages, Debian changelogs, package descriptions, licences (``system_corpus.py``).
* **Experiments.** ``stdlib-K3`` (code, prose, markup) and ``system-K3`` (pycode, manpages,
  changelogs), each with three targets: ``heldout`` (a domain that is not a source: docstrings /
  pymeta), ``planted`` (a mixture of the sources with known proportions, stored as one file per
  domain) and ``average`` (the mean of the per-source losses); and ``K8`` (the 5 stdlib + 3 system
  domains, planted target) for FastMix's cost in K. System-K3's held-out domain is ``pymeta``, which
  has no mixture effect (final_size.md); the only other candidate, ``licenses``
  (``--system-heldout``), fell short of the rule of heldout_pilot.py (effect 2.9x the noise, < 3).
* **Searches.** Every method runs from :func:`fastmix_data.search.run_method` at its DEFAULTS, with
  ``max_tokens`` equal to one final run (the question a user asks: "I can afford one more run of
  the final size -- what mixture?"), the target given as the folder a user would pass.
* **Final runs.** Each exported mixture (token shares) is trained from scratch at the final budget
  (:func:`~fastmix_data.search.proxy.static.train_static`) and scored on the test split (held-out
  test split; a planted test set with the same proportions; the test splits' group average).
  Seed s = model init s = data order s; method searches use the same seed, so everything is paired.
  **1,048,576 tokens** (``--final-tokens``), chosen in final_size.md: at the former 262,144 tokens
  system-K3's planted mixture was itself 0.035-0.040 nats worse than the grid's pick, so the issue's
  "regret <= 0.005" and "L1 <= 0.1 to the planted mixture" could not both hold; at 1M its regret is
  within the target on both corpora (+0.0108 +- 0.0059 stdlib-K3, +0.0065 +- 0.0095 system-K3:
  mean - 2 SE <= 0.005). The 262k judge is kept in results-262k.md. K8 (no grid) stays at 262k in
  results.md, merged from that run (``--merge``).
* **Grid oracle (K3).** The simplex at step 0.1 (66 mixtures) trained at the final budget. Raced:
  all 66 points with the first seed, then the best ``--grid-top`` points of every target with the
  other seeds. The oracle is held out: for each later seed s (an *evaluation seed*) it is the
  candidate with the best mean over the other seeds, scored by its loss at s -- what a grid search
  delivers when its pick is trained again -- and every regret is taken on the evaluation seeds.
  (Choosing the best mean over the same seeds it is scored on is biased low by the max over noisy
  means, about 0.006-0.010 nats here; that in-sample figure is reported beside it.) The grid's
  compute is charged as all 66 points x all seeds, the cost of the full oracle.
* **Reported.** Final loss mean +- std over seeds; paired difference vs stratified; regret vs the
  oracle with its standard error; search compute as a fraction of the grid's; on planted targets the
  L1 distance of the weights to the planted token shares; the seed noise (std of a final loss, std
  of paired differences).

Everything is cached under ``--work`` (corpora, method results, final runs, proxies), so an
interrupted run resumes where it stopped. ``--quick`` is a smoke run; ``--from-results`` re-renders;
``--experiments`` / ``--methods`` / ``--targets`` / ``--seeds`` run a subset.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import _common  # noqa: E402
from system_corpus import build_system_corpus  # noqa: E402

from fastmix_data.corpus import build_corpus, build_planted_target  # noqa: E402
from fastmix_data.search import SearchConfig, load_target, run_method, train_static  # noqa: E402
from fastmix_data.search.config import TrainConfig  # noqa: E402
from fastmix_data.search.methods.grid import grid_size, simplex_grid  # noqa: E402

STDLIB = {"code": "stdlib", "docstrings": "stdlib", "tests": "stdlib", "prose": "stdlib", "markup": "stdlib"}
SYSTEM = {"pycode": "system", "manpages": "system", "changelogs": "system", "pymeta": "system", "licenses": "system"}
EXPERIMENTS = {
    "stdlib-K3": {"sources": ["code", "prose", "markup"], "heldout": "docstrings",
                  "planted": {"code": 0.50, "markup": 0.35, "prose": 0.15}},
    "system-K3": {"sources": ["pycode", "manpages", "changelogs"], "heldout": "pymeta",
                  "planted": {"changelogs": 0.50, "pycode": 0.35, "manpages": 0.15}},
    "K8": {"sources": ["code", "docstrings", "tests", "prose", "markup", "pycode", "manpages", "changelogs"],
           "heldout": None,
           "planted": {"prose": 0.25, "manpages": 0.25, "code": 0.20, "changelogs": 0.15, "markup": 0.10,
                       "pycode": 0.05}},
}
#: system-K3's possible held-out domains: the system domains that are not its sources
SYSTEM_HELDOUT = ("pymeta", "licenses")
TARGETS = ("heldout", "planted", "average")
#: train / validation / test: larger held-out splits than the demo's 90/5/5, for steadier targets
SPLIT = (0.8, 0.1, 0.1)
BLIND = ("stratified", "natural", "doremi")
SEARCH = ("fastmix", "mixmin", "aioli", "mixmin_fastmix")
K8_METHODS = ("stratified", "fastmix", "mixmin")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def _code_fingerprint() -> str:
    """Hash of the search package's sources: a cached search result is reused only by the code that
    produced it (a search's outcome depends on more than its config, e.g. how the target is sampled).
    Hashed once per process: the code this run imported."""
    h = hashlib.sha256()
    for p in sorted((REPO / "fastmix_data" / "search").rglob("*.py")):
        h.update(p.relative_to(REPO).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ============================================================================ data


def corpora(work: Path) -> dict[str, Path]:
    out = {"stdlib": work / "corpus-stdlib", "system": work / "corpus-system"}
    if not (out["stdlib"] / "corpus.json").exists():
        log("building the stdlib corpus")
        build_corpus(out["stdlib"], seed=0, formats=("parquet",), progress=False, split_fractions=SPLIT)
    if not (out["system"] / "corpus.json").exists():
        log("building the system corpus")
        build_system_corpus(out["system"], split_fractions=SPLIT, log=log)
    return out


def _home(domain: str, dirs: dict[str, Path]) -> Path:
    return dirs[STDLIB.get(domain) or SYSTEM[domain]]


def planted_target(work: Path, exp: str, split: str, proportions: dict, n_docs: int, dirs: dict[str, Path]) -> Path:
    """A planted set stored as ONE FILE PER DOMAIN (the layout that once fooled FastMix's reader)."""
    out = work / "planted" / f"{exp}-{split}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{exp}-{split}.lock", "w") as lock:  # parallel runs on one --work folder
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _planted_locked(out, exp, split, proportions, n_docs, dirs)


def _planted_locked(out: Path, exp: str, split: str, proportions: dict, n_docs: int, dirs: dict[str, Path]) -> Path:
    work = out.parent.parent
    stamp = json.dumps({"proportions": proportions, "n_docs": n_docs}, sort_keys=True)
    if (out / "done").exists() and (out / "done").read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)  # absent, unfinished, or built for other proportions
    out.mkdir(parents=True)
    for corpus in sorted({_home(d, dirs) for d in proportions}):
        sub = {d: p for d, p in proportions.items() if _home(d, dirs) == corpus}
        n = max(len(sub), round(n_docs * sum(sub.values())))
        tmp = work / "planted" / f".{exp}-{split}-{corpus.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_planted_target(tmp, corpus, sub, n_docs=n, seed=0, split=split, allow_repeats=True)
        t = pq.read_table(tmp / "part-00000.parquet").to_pydict()
        for d in sub:
            rows = [x for x, g in zip(t["text"], t["domain"]) if g == d]
            pq.write_table(pa.table({"text": rows, "domain": [d] * len(rows)}), out / f"{d}.parquet")
    (out / "done").write_text(stamp)
    return out


def experiment_spec(exp: str, args) -> dict:
    """``EXPERIMENTS[exp]`` with system-K3's held-out domain as ``--system-heldout`` chose."""
    h = getattr(args, "system_heldout", None)
    return {**EXPERIMENTS[exp], "heldout": h} if exp == "system-K3" and h else EXPERIMENTS[exp]


def prepare(work: Path, args) -> dict:
    dirs = corpora(work)
    return {exp: prepare_experiment(work, exp, experiment_spec(exp, args), args, dirs) for exp in args.experiments}


def prepare_experiment(work: Path, exp: str, spec: dict, args, dirs: dict[str, Path],
                       targets: tuple[str, ...] = TARGETS) -> dict:
    """Sources, search targets and eval targets of one experiment (``spec`` as in EXPERIMENTS)."""
    L = args.seq_len
    srcs = {d: str(_home(d, dirs) / "train" / d) for d in spec["sources"]}
    search, evals = {}, {}
    p_search = planted_target(work, exp, "validation", spec["planted"], args.planted_docs, dirs)
    if "planted" in targets:
        p_test = planted_target(work, exp, "test", spec["planted"], args.planted_docs, dirs)
        search["planted"] = str(p_search)
        evals["planted"] = load_target(str(p_test), L, max_seqs=args.eval_seqs, name="planted")
    h = spec["heldout"]
    if h and "heldout" in targets:
        search["heldout"] = str(_home(h, dirs) / "validation" / h)
        evals["heldout"] = load_target(str(_home(h, dirs) / "test" / h), L, max_seqs=args.eval_seqs, name="heldout")
    if h and "average" in targets:
        search["average"] = {d: str(_home(d, dirs) / "validation" / d) for d in spec["sources"]}
        evals["average"] = load_target({d: str(_home(d, dirs) / "test" / d) for d in spec["sources"]}, L,
                                       max_seqs=args.eval_seqs, name="average")
    exact = load_target(str(p_search), L, max_seqs=None).full_shares  # the planted token shares
    return {"sources": srcs, "search": search, "eval": evals, "planted_tokens": exact,
            "planted_docs": spec["planted"], "heldout_domain": h}


# ============================================================================ runs


def train_cfg(args, seed: int) -> dict:
    return {"proxy": args.proxy, "seed": seed, "data_seed": seed, "batch_size": args.batch_size,
            "seq_len": args.seq_len}


def method_config(args, method: str, seed: int, work: Path, overrides: dict | None = None) -> SearchConfig:
    """The method AT ITS DEFAULTS: only the budget, the batch shape, the seeds and the cache are set
    (development studies pass ``overrides`` of the method's own section, e.g. ``{"z_lr": 0.1}``)."""
    return SearchConfig.from_dict({"method": method, "max_tokens": args.final_tokens, "train": train_cfg(args, seed),
                                   "cache_dir": str(work / "cache"), "output": {"progress": False},
                                   **({method: overrides} if overrides else {})})


def run_search_cached(work: Path, exp: str, method: str, tname: str | None, seed: int, data: dict, args,
                      overrides: dict | None = None, tag: str = "", cached_only: bool = False) -> dict:
    """One search, cached by its full config, sources, target and code; it runs in the folder
    runs/<exp>/<target>/<method><tag>/seed<s>-<cache key> (``tag`` names a search with ``overrides``),
    recorded as ``run_dir`` in the cached record, so that what is read from the folder afterwards (its
    trajectory) is this config's and never another's that shared the seed. ``cached_only``: a search
    that is not cached is an error, not run."""
    cfg = method_config(args, method, seed, work, overrides)
    target = data["search"][tname] if tname else None
    desc = {"exp": exp, "method": method, "target": target, "cfg": cfg.to_dict(), "sources": data["sources"],
            "code": _code_fingerprint()}
    key = _key(desc)
    path = work / "methods" / f"{exp}-{method}-{tname or 'blind'}-s{seed}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    if cached_only:
        raise FileNotFoundError(f"{path}: the {exp}/{tname} {method} search of seed {seed} is not cached under "
                                f"{work} for this config and code (cached_only: not run)")
    out_dir = work / "runs" / exp / (tname or "blind") / f"{method}{tag}" / f"seed{seed}-{key}"
    t0 = time.perf_counter()
    r = run_method(cfg, sources=data["sources"], target=target, out_dir=out_dir)
    rec = {"weights": r.weights, "candidates": r.candidates, "flops": r.compute["flops"], "run_dir": str(out_dir),
           "tokens": r.compute["tokens"], "wall_s": time.perf_counter() - t0,
           "details": {k: v for k, v in r.details.items() if k in ("schedule", "updates", "eg_steps", "converged",
                                                                    "probe_steps", "reference_tokens")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    return rec


def final_run(work: Path, data: dict, weights: dict, seed: int, args) -> dict:
    cfg = TrainConfig.from_dict(train_cfg(args, seed)).validate()
    r = train_static(data["sources"], weights, data["eval"], cfg, args.final_tokens, cache_dir=work / "finals",
                     keep_model=False)
    return {"losses": {k: v["loss"] for k, v in r.losses.items()}, "train_flops": r.compute["flops"]["train"],
            "wall_s": r.compute["wall_s"], "cached": r.cached}


def _row(exp, target, method, seed, weights, final, search=None, **extra) -> dict:
    return {"exp": exp, "target": target, "method": method, "seed": seed, "weights": weights,
            "final_loss": final["losses"][target], "final_train_flops": final["train_flops"],
            "final_wall_s": final["wall_s"],
            "search_flops": (search or {}).get("flops", {}).get("total", 0.0),
            "search_flops_cached": (search or {}).get("flops", {}).get("cached", 0.0),
            "search_wall_s": (search or {}).get("wall_s", 0.0), "final_cached": final.get("cached", False), **extra}


def run_methods(work: Path, exp: str, data: dict, args) -> list[dict]:
    rows = []
    targets = [t for t in TARGETS if t in data["search"] and t in args.targets]
    blind = BLIND if exp != "K8" else ("stratified",)
    search = SEARCH if exp != "K8" else tuple(m for m in K8_METHODS if m != "stratified")
    blind = [m for m in blind if m in args.methods or m == "stratified"]  # stratified: the paired baseline
    search = [m for m in search if m in args.methods]
    for seed in args.seeds:
        for method in blind:
            s = run_search_cached(work, exp, method, None, seed, data, args)
            f = final_run(work, data, s["weights"], seed, args)
            rows += [_row(exp, t, method, seed, s["weights"], f, s) for t in targets]
            log(f"{exp} s{seed} {method:15s} -    " + _fmt_w(s["weights"]) + f"  {f['losses'][targets[0]]:.4f}")
        for t in targets:
            for method in search:
                if method == "mixmin_fastmix" and t == "average":
                    continue
                s = run_search_cached(work, exp, method, t, seed, data, args)
                f = final_run(work, data, s["weights"], seed, args)
                rows.append(_row(exp, t, method, seed, s["weights"], f, s, candidates=s.get("candidates", {})))
                log(f"{exp} s{seed} {method:15s} {t:8s} " + _fmt_w(s["weights"]) + f"  {f['losses'][t]:.4f}"
                    f"  ({s['wall_s']:.0f}s search)")
                if method == "fastmix" and args.fastmix_candidates:
                    for cname in ("last", "average"):
                        fc = final_run(work, data, s["candidates"][cname], seed, args)
                        rows.append(_row(exp, t, f"fastmix[{cname}]", seed, s["candidates"][cname], fc, s))
        if "planted" in targets:
            f = final_run(work, data, data["planted_tokens"], seed, args)
            rows.append(_row(exp, "planted", "planted", seed, data["planted_tokens"], f))
    return rows


def run_grid(work: Path, exp: str, data: dict, args) -> list[dict]:
    """Raced grid: every point with the first seed, the best ``grid_top`` per target with the others."""
    names = list(data["sources"])
    points = [dict(zip(names, p)) for p in simplex_grid(len(names), args.grid_step)]
    targets = [t for t in TARGETS if t in data["eval"]]
    rows, first = [], args.seeds[0]
    t0 = time.perf_counter()
    for w in points:
        f = final_run(work, data, w, first, args)
        rows += [_row(exp, t, "grid-point", first, w, f) for t in targets]
    keep = []
    for t in targets:
        best = sorted((r for r in rows if r["target"] == t), key=lambda r: r["final_loss"])[: args.grid_top]
        keep += [r["weights"] for r in best if r["weights"] not in keep]
    for seed in args.seeds[1:]:
        for w in keep:
            f = final_run(work, data, w, seed, args)
            rows += [_row(exp, t, "grid-point", seed, w, f) for t in targets]
    log(f"{exp} grid: {len(points)} points x seed {first} + {len(keep)} x {len(args.seeds) - 1} seeds "
        f"({time.perf_counter() - t0:.0f}s)")
    return rows


def _fmt_w(w: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in w.items())


# ============================================================================ summary


def _ms(x) -> list[float]:
    x = np.asarray(x, dtype=float)
    return [float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0]


def l1(w: dict, p: dict) -> float:
    return float(sum(abs(w.get(k, 0.0) - p.get(k, 0.0)) for k in sorted(set(w) | set(p))))  # sorted: same sum every run


def grid_losses(rows: list[dict], target: str, seeds: list[int]) -> dict[str, dict[int, float]]:
    """``{point: {seed: final loss}}`` of the grid points trained with every seed (the raced candidates)."""
    by_w: dict[str, dict] = {}
    for r in rows:
        if r["method"] == "grid-point" and r["target"] == target:
            by_w.setdefault(json.dumps(r["weights"], sort_keys=True), {})[r["seed"]] = r["final_loss"]
    return {k: v for k, v in by_w.items() if all(s in v for s in seeds)}


def oracle_in_sample(rows: list[dict], target: str, seeds: list[int]) -> dict | None:
    """The grid point with the best mean over ALL seeds, scored on those same seeds (the rule before
    the held-out oracle: the max over noisy means is biased low -- a winner's curse)."""
    full = grid_losses(rows, target, seeds)
    if not full:
        return None
    k = min(full, key=lambda k: np.mean(list(full[k].values())))
    return {"weights": json.loads(k), "by_seed": full[k], "loss": _ms(list(full[k].values()))}


def oracle(rows: list[dict], target: str, seeds: list[int]) -> dict | None:
    """What a grid search delivers on a seed it did not select on. The first seed screens the grid
    (every point; the best ``--grid-top`` per target go on), so it only selects; each later seed s is
    an evaluation seed: the oracle for s is the candidate with the best mean over the OTHER seeds
    (the first included), scored by its loss at s. Regrets are taken on the evaluation seeds."""
    full = grid_losses(rows, target, seeds)
    if not full or len(seeds) < 2:
        return None
    by_seed, picks = {}, {}
    for s in seeds[1:]:
        k = min(full, key=lambda k: np.mean([v for t, v in full[k].items() if t != s]))
        by_seed[s], picks[s] = full[k][s], json.loads(k)
    points = sum(1 for r in rows if r["method"] == "grid-point" and r["target"] == target and r["seed"] == seeds[0])
    return {"by_seed": by_seed, "picks": picks, "loss": _ms(list(by_seed.values())), "points": points,
            "candidates": len(full), "weights": _modal(list(picks.values())),
            "in_sample": oracle_in_sample(rows, target, seeds)}


def _modal(ws: list[dict]) -> dict:
    keys = [json.dumps(w, sort_keys=True) for w in ws]
    return json.loads(max(set(keys), key=keys.count))


def _regret(rs: list[dict], by_seed: dict) -> dict:
    reg = [r["final_loss"] - by_seed[r["seed"]] for r in rs if r["seed"] in by_seed]
    ms = _ms(reg)
    return {"regret": ms, "regret_se": ms[1] / np.sqrt(len(reg)), "regret_seeds": len(reg)}


def summarise_target(er: list[dict], t: str, data: dict, args, K: int) -> dict:
    orc = oracle(er, t, args.seeds)
    strat = {r["seed"]: r["final_loss"] for r in er if r["method"] == "stratified" and r["target"] == t}
    grid_flops = None
    if orc:
        one = next(r["final_train_flops"] for r in er if r["method"] == "grid-point")
        grid_flops = grid_size(K, args.grid_step) * one * len(args.seeds)
    out = {"oracle": orc, "methods": {}, "grid_flops_per_seed": grid_flops and grid_flops / len(args.seeds)}
    for m in sorted({r["method"] for r in er if r["target"] == t and r["method"] != "grid-point"}):
        rs = sorted((r for r in er if r["method"] == m and r["target"] == t), key=lambda r: r["seed"])
        d = {"n": len(rs), "loss": _ms([r["final_loss"] for r in rs]),
             "weights": {k: float(np.mean([r["weights"][k] for r in rs])) for k in rs[0]["weights"]},
             "search_fraction_of_final": _ms([r["search_flops"] / r["final_train_flops"] for r in rs]),
             "search_wall_per_final_wall": _ms([r["search_wall_s"] / max(r.get("final_wall_s", 0), 1e-9)
                                                 for r in rs])}
        diffs = [r["final_loss"] - strat[r["seed"]] for r in rs if r["seed"] in strat]
        if diffs and m != "stratified":
            d["delta_vs_stratified"] = _ms(diffs)
            d["wins_vs_stratified"] = int(sum(x < 0 for x in diffs))
        if orc:
            d.update(_regret(rs, orc["by_seed"]))
            old = _regret(rs, orc["in_sample"]["by_seed"])
            d["regret_in_sample"], d["regret_in_sample_se"] = old["regret"], old["regret_se"]
            d["compute_fraction_of_grid"] = float(np.mean([r["search_flops"] for r in rs]) / (grid_flops / len(args.seeds)))
        if t == "planted":
            d["l1_to_planted"] = _ms([l1(r["weights"], data["planted_tokens"]) for r in rs])
        out["methods"][m] = d
    if strat:
        out["noise"] = {"stratified_seed_std": _ms(list(strat.values()))[1]}
        pairs = [r["final_loss"] - strat[r["seed"]] for r in er if r["target"] == t and r["method"] == "grid-point"
                 and r["seed"] in strat]
        if orc:
            o = orc["by_seed"]
            out["noise"]["oracle_minus_stratified_std"] = _ms([o[s] - strat[s] for s in o if s in strat])[1]
        out["noise"]["grid_points_evaluated"] = len(pairs)
    return out


def summarise(rows: list[dict], data: dict, args) -> dict:
    out = {}
    for exp in args.experiments:
        er = [r for r in rows if r["exp"] == exp]
        K = len(EXPERIMENTS[exp]["sources"])
        targets = [t for t in TARGETS if any(r["target"] == t for r in er)]
        out[exp] = {"K": K, "planted_tokens": data[exp]["planted_tokens"], "planted_docs": data[exp]["planted_docs"],
                    "heldout_domain": data[exp]["heldout_domain"], "final_tokens": args.final_tokens,
                    "uniform_l1": l1({k: 1 / K for k in data[exp]["sources"]}, data[exp]["planted_tokens"]),
                    "targets": {t: summarise_target(er, t, data[exp], args, K) for t in targets}}
        if exp == "K8":
            out[exp]["grid_points_k8"] = grid_size(K, args.grid_step)
    return out


# ============================================================================ report (report.py renders)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options (other studies take its run settings from ``build_parser().parse_args([])``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="out/quality", help="cache and run folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)),
                    help="final-run seeds; the first also screens the grid, so regrets are taken on the others "
                    "(9 evaluation seeds: with 5 the regret SEs at 1M were 0.005-0.008, the size of the target)")
    ap.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    ap.add_argument("--methods", nargs="+", default=[*BLIND, *SEARCH], choices=[*BLIND, *SEARCH],
                    help="a subset of the methods (stratified always runs: the paired baseline)")
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                    help="a subset of the search targets (the grid still scores all of them)")
    ap.add_argument("--final-tokens", type=int, default=16 * 64 * 1024,
                    help="final run = search budget (tokens); 1,048,576: see final_size.md")
    ap.add_argument("--system-heldout", default=EXPERIMENTS["system-K3"]["heldout"], choices=SYSTEM_HELDOUT,
                    help="system-K3's held-out target: a system domain that is not one of its sources "
                    "(heldout_pilot.py: the rule that chose it)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--proxy", default="tiny", help="proxy and final model (train.proxy); 'cpu' is the library's "
                    "default preset, about 5x slower (a full run ~10 h on 2 shared cores)")
    ap.add_argument("--grid-step", type=float, default=0.1)
    ap.add_argument("--grid-top", type=int, default=4, help="grid points per target re-run with every seed")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--eval-seqs", type=int, default=512, help="sequences per eval target")
    ap.add_argument("--planted-docs", type=int, default=100, help="documents in each planted set")
    ap.add_argument("--no-fastmix-candidates", dest="fastmix_candidates", action="store_false",
                    help="skip the final runs on FastMix's 'last' and 'average' candidates")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    ap.add_argument("--out", default=None, help="where results.json/results.md go (default: this folder; "
                    "--quick: --work)")
    ap.add_argument("--from-results", action="store_true", help="re-render results.md from results.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="one results.json/results.md (in --out) from these "
                    "runs' results.json (e.g. one per corpus, run side by side); an experiment in several is "
                    "taken from the last")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny budget, grid step 0.5")
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from report import render

    out = Path(args.out) if args.out else (Path(args.work) if args.quick else HERE)
    if args.from_results or args.merge:
        saved = merge(args.merge) if args.merge else json.loads((out / "results.json").read_text())
        if args.merge:
            out.mkdir(parents=True, exist_ok=True)
            _common.write_atomic(str(out / "results.json"), json.dumps(saved, indent=1, default=str))
        render(saved, out)
        return
    if args.quick:
        args.seeds, args.final_tokens, args.grid_step, args.grid_top = [0], 16 * 64 * 24, 0.5, 2
        args.experiments = [e for e in args.experiments if e != "K8"]
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0 = _uptime()
    data = prepare(work, args)
    rows = []
    for exp in args.experiments:
        rows += run_methods(work, exp, data[exp], args)
        if exp != "K8" and not args.skip_grid:
            rows += run_grid(work, exp, data[exp], args)
    summary = summarise(rows, data, args)
    meta = run_meta(t0, load0, nice=os.nice(0), args=vars(args))
    saved = {"meta": meta, "summary": summary, "runs": rows}
    out.mkdir(parents=True, exist_ok=True)
    _common.write_atomic(str(out / "results.json"), json.dumps(saved, indent=1, default=str))
    render(saved, out)
    log(f"done in {meta['wall_s'] / 60:.1f} min; wrote {out / 'results.md'}")


def merge(paths: list[str]) -> dict:
    """One result from several runs' results.json: each experiment (its summary and runs) from the last
    file that has it, with that run's final-run size; ``meta["parts"]`` lists the runs' meta that
    provide an experiment, each with the experiments it provides (``used``)."""
    loaded = [json.loads(Path(p).read_text()) for p in paths]
    src = {exp: i for i, saved in enumerate(loaded) for exp in saved["summary"]}
    summary, runs, parts = {}, [], []
    for i, saved in enumerate(loaded):
        taken = [e for e in saved["summary"] if src[e] == i]
        for m in saved["meta"].get("parts", [saved["meta"]]):
            used = [e for e in m.get("used", m["args"]["experiments"]) if e in taken]
            parts += [{**m, "used": used}] if used else []
            for e in used:
                summary[e] = {**saved["summary"][e], "final_tokens": m["args"]["final_tokens"]}
        runs += [r for r in saved["runs"] if r["exp"] in taken]
    order = [e for e in EXPERIMENTS if e in summary]
    return {"meta": {"parts": parts}, "summary": {e: summary[e] for e in order}, "runs": runs}


# ============================================================================ the judge's record (later studies)


def judge_args(results: dict, exp: str) -> argparse.Namespace:
    """The run settings (and ``--work`` cache folder) of the judge's run that produced ``exp``."""
    parts = results["meta"].get("parts", [results["meta"]])
    got = [m["args"] for m in parts if exp in m.get("used", m["args"]["experiments"])]
    if not got:
        raise ValueError(f"results.json: no run in meta provides experiment {exp!r}")
    return argparse.Namespace(**{**vars(build_parser().parse_args([])), **got[-1]})


def grid_pick(results: dict, exp: str, target: str) -> dict[str, float]:
    """The grid point with the best mean over the judge's seeds (the oracle's in-sample weights),
    checked to be the held-out oracle's pick on every evaluation seed."""
    o = results["summary"][exp]["targets"][target]["oracle"]
    pick = o["in_sample"]["weights"]
    other = {s: w for s, w in o["picks"].items() if w != pick}
    if other:
        raise ValueError(f"results.json {exp}/{target}: the grid's best mean over the judge's seeds is {pick}, but "
                         f"the held-out oracle picked otherwise on seeds {other}: no single pick to fix")
    return pick


def run_meta(t0: float, load_start: str, **extra) -> dict:
    """What every quality script records about its run: date, machine, command, commit, wall time since
    ``t0`` (``time.perf_counter()``) and the load at start / now, plus ``extra``."""
    return {"date": _common.today(), "machine": ", ".join(f"{k}: {v}" for k, v in _common.machine_info().items()),
            "command": _common.command_line(), "commit": _common.git_revision(str(REPO)),
            "wall_s": time.perf_counter() - t0, "load_start": load_start, "load_end": _uptime(), **extra}


def _uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
