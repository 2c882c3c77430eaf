"""Baselines every mixture comparison includes: stratified, natural (with temperature), grid oracle.

* **stratified** -- uniform weights over the sources (what FastMix's search stream serves).
* **natural** -- weights proportional to each source's size in tokens, optionally
  temperature-scaled: ``w_k ∝ n_k ** (1 / T)`` (T = 1: size-proportional; T → ∞: uniform).
  Token counts come from the shard index (byte tokenizer: UTF-8 bytes + one end-of-document token
  per row), so nothing is read.
* **grid** -- the oracle for K ≤ 3: every point of the simplex on a grid of step 0.1 (66 points for
  K = 3) is trained from scratch at the final budget (:func:`train_static`) and scored on the
  target; the best point is the oracle mixture and other methods report their *regret* against it.

All three need no target (the grid uses it to score) and cost nothing but the grid's runs; they
write the same outputs as the search methods and push their weights to a sink once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from .train_static import (
    ComputeMeter,
    MethodConfig,
    MethodResult,
    as_target,
    push_weights,
    train_static,
    write_outputs,
)

__all__ = [
    "GridConfig",
    "NaturalConfig",
    "StratifiedConfig",
    "natural_weights",
    "run_grid",
    "run_natural",
    "run_stratified",
    "simplex_grid",
    "source_token_counts",
    "stratified_weights",
]


# ============================================================================ pure functions


def stratified_weights(names: Sequence[str]) -> dict[str, float]:
    """Uniform weights ``1/K`` per source."""
    if not names:
        raise ValueError("there are no sources")
    return {n: 1.0 / len(names) for n in names}


def natural_weights(counts: Mapping[str, float], temperature: float = 1.0) -> dict[str, float]:
    """Size-proportional weights ``w_k ∝ n_k ** (1 / temperature)`` from per-source token counts.

    Raises:
        ValueError: a negative/non-finite count, all counts zero, or a temperature <= 0.
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    vals = {}
    for n, c in counts.items():
        c = float(c)
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"token count of source {n!r} must be finite and >= 0, got {c}")
        vals[n] = c
    if not vals or max(vals.values()) <= 0:
        raise ValueError(f"token counts are all zero: {counts}")
    # work relative to the largest count: n ** (1/T) overflows for large n and small T
    top = max(vals.values())
    scaled = {n: (c / top) ** (1.0 / temperature) if c > 0 else 0.0 for n, c in vals.items()}
    s = sum(scaled.values())
    return {n: v / s for n, v in scaled.items()}


def simplex_grid(K: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """Every point of the K-simplex whose coordinates are multiples of ``step`` (``1/step`` must be
    an integer): ``C(1/step + K - 1, K - 1)`` points, e.g. 66 for K = 3 and step 0.1. Exact: built
    from integer compositions, coordinates sum to 1 up to float rounding of ``i * step``."""
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    frac = Fraction(step).limit_denominator(10_000)
    if frac <= 0 or (1 / frac).denominator != 1:  # (0 before dividing by it)
        raise ValueError(f"1/step must be a positive integer, got step={step}")
    n = int(1 / frac)
    out: list[tuple[float, ...]] = []

    def rec(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            out.append(tuple(float(Fraction(i, n)) for i in prefix + [left]))
            return
        for i in range(left, -1, -1):
            rec(prefix + [i], left - i, slots - 1)

    rec([], n, K)
    return out


def source_token_counts(train_sources: Mapping[str, Any]) -> dict[str, int]:
    """Tokens per source from the shard index (rows + UTF-8 bytes for text with the byte tokenizer)."""
    from fastmix_data.sources import open_source
    from fastmix_data.sources.base import Source

    out = {}
    for name, spec in train_sources.items():
        src = spec if isinstance(spec, Source) and not isinstance(spec, (str, list, dict)) else open_source(name, spec)
        toks = [s.tokens for s in src.shards]
        if any(t is None for t in toks):
            raise ValueError(f"source {name!r}: the shard index has no token counts (no text or ids column?)")
        out[name] = int(sum(toks))
    return out


# ============================================================================ method entry points


@dataclass
class StratifiedConfig(MethodConfig):
    """Stratified needs nothing beyond the common fields."""


@dataclass
class NaturalConfig(MethodConfig):
    """Attributes:
    temperature: ``w ∝ n ** (1/temperature)``; 1 = size-proportional."""

    temperature: float = 1.0

    def problems(self) -> list[str]:
        t = self.temperature
        ok = isinstance(t, (int, float)) and math.isfinite(t) and t > 0
        return [] if ok else [f"temperature must be a finite number > 0, got {t!r}"]


@dataclass
class GridConfig(MethodConfig):
    """Attributes:
    step: simplex grid step (0.1: 66 points for K = 3).
    max_sources: refuse K above this (the grid grows as C(1/step + K - 1, K - 1)).

    ``train.max_tokens`` is the budget of *each* grid run (the final budget)."""

    step: float = 0.1
    max_sources: int = 3

    def problems(self) -> list[str]:
        p = []
        try:
            simplex_grid(1, self.step)
        except ValueError as e:
            p.append(str(e))
        if not isinstance(self.max_sources, int) or self.max_sources < 1:
            p.append(f"max_sources must be a positive integer, got {self.max_sources!r}")
        return p


def _static_result(method, names, weights, out_dir, sink, extra, plot) -> MethodResult:
    meter = ComputeMeter(0)
    eff = push_weights(sink, weights)
    compute = meter.to_dict(method, num_sources=len(names))
    traj = [{"step": 0, "tokens": 0, "weights": dict(weights), "effective_batch": eff}]
    write_outputs(out_dir, method, names, weights, traj, compute, extra=extra, plot=plot)
    return MethodResult(method, dict(weights), list(names), traj, compute, dict(extra),
                        None if out_dir is None else Path(out_dir))


def run_stratified(train_sources: Mapping[str, Any], target: Any = None, config: StratifiedConfig | None = None,
                   out_dir=None, sink=None) -> MethodResult:
    """Uniform weights (the target is not used)."""
    cfg = config or StratifiedConfig()
    names = list(train_sources)
    return _static_result("stratified", names, stratified_weights(names), out_dir, sink, {}, cfg.plot)


def run_natural(train_sources: Mapping[str, Any], target: Any = None, config: NaturalConfig | None = None,
                out_dir=None, sink=None) -> MethodResult:
    """Size-proportional weights with temperature (the target is not used)."""
    cfg = config or NaturalConfig()
    counts = source_token_counts(train_sources)
    w = natural_weights(counts, cfg.temperature)
    return _static_result("natural", list(train_sources), w, out_dir, sink,
                          {"token_counts": counts, "temperature": cfg.temperature}, cfg.plot)


def run_grid(train_sources: Mapping[str, Any], target: Any, config: GridConfig | None = None,
             out_dir=None, sink=None) -> MethodResult:
    """Train every grid point at the final budget (``config.train``), score the target, keep the best.

    Runs are cached in ``config.cache_dir`` (keyed by data, weights, config and target), so a
    second target or a rerun only re-scores. ``extra["grid"]`` lists every point's target loss.
    """
    cfg = config or GridConfig()
    names = list(train_sources)
    K = len(names)
    if K > cfg.max_sources:
        raise ValueError(
            f"the grid oracle is for K <= {cfg.max_sources} sources (K={K} would need "
            f"{math.comb(round(1 / cfg.step) + K - 1, K - 1)} runs); raise max_sources to force it"
        )
    tset = as_target(target, cfg.train.seq_len, max_seqs=cfg.target_max_seqs)
    meter = ComputeMeter(0)
    points = simplex_grid(K, cfg.step)
    traj: list[dict] = []
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), desc="grid oracle", unit="run", leave=False)
    for i, p in enumerate(points):
        w = dict(zip(names, p))
        r = train_static(train_sources, w, {tset.name: tset}, cfg.train, cache_dir=cfg.cache_dir, keep_model=False)
        meter.add(f"grid{i}", r.compute, cached=r.cached)
        traj.append({"step": i, "tokens": r.compute["tokens"]["train"], "weights": w,
                     "target_loss": r.loss(tset.name), "cached": r.cached})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    best = min(traj, key=lambda r: r["target_loss"])
    eff = push_weights(sink, best["weights"])
    compute = meter.to_dict("grid", num_sources=K, runs=len(points))
    extra = {"best_loss": best["target_loss"], "step": cfg.step, "target": tset.describe(),
             "grid": [{"weights": r["weights"], "target_loss": r["target_loss"]} for r in traj],
             "effective_batch": eff}
    write_outputs(out_dir, "grid", names, best["weights"], traj, compute, extra=extra, plot=cfg.plot,
                  x="step", xlabel="grid point")
    return MethodResult("grid", dict(best["weights"]), names, traj, compute, extra,
                        None if out_dir is None else Path(out_dir))
