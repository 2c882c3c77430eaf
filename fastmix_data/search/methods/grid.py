"""The grid oracle for small K: every point of the simplex on a grid (step 0.1: 66 points for K = 3)
trained from scratch at ``max_tokens`` (:func:`~fastmix_data.search.proxy.static.train_static`) and
scored on the target; the best point is the oracle mixture, and other methods report their *regret*
against it. Its compute is the sum of all its runs (cached runs charged too)."""

from __future__ import annotations

import math
from fractions import Fraction

from ..context import MethodResult, MethodSpec, RunContext, finish
from ..proxy.static import train_static


def simplex_grid(K: int, step: float = 0.1) -> list[tuple[float, ...]]:
    """Every point of the K-simplex whose coordinates are multiples of ``step`` (``1/step`` a whole
    number): ``C(1/step + K - 1, K - 1)`` points, built from integer compositions."""
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    frac = Fraction(step).limit_denominator(10_000)
    if frac <= 0 or (1 / frac).denominator != 1:
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


def grid_size(K: int, step: float = 0.1) -> int:
    """``C(1/step + K - 1, K - 1)``: the number of grid points (19,448 for K = 8 at step 0.1)."""
    return math.comb(round(1 / step) + K - 1, K - 1)


def run(ctx: RunContext) -> MethodResult:
    """Train every grid point, score the target, keep the best."""
    cfg, names, K = ctx.config.grid, ctx.names, ctx.K
    if K > cfg.max_sources:
        raise ValueError(f"the grid oracle is for K <= {cfg.max_sources} sources (K={K} would need "
                         f"{grid_size(K, cfg.step)} runs); raise grid.max_sources to force it")
    sources, tset = ctx.require_sources("grid"), ctx.target
    points = simplex_grid(K, cfg.step)
    bar = None
    if ctx.config.output.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points), desc="grid oracle", unit="run", leave=False)
    rows = []
    for i, p in enumerate(points):
        w = dict(zip(names, p))
        r = train_static(sources, w, {tset.name: tset}, ctx.config.train, int(ctx.config.max_tokens),
                         cache_dir=ctx.config.cache_dir, keep_model=False)
        ctx.meter.add(f"grid{i}", r.compute, cached=r.cached)
        rows.append({"step": i, "tokens": r.compute["tokens"]["train"], "weights": w,
                     "target_loss": r.loss(tset.name), "cached": r.cached})
        ctx.writer.record(rows[-1])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    best = min(rows, key=lambda r: r["target_loss"])
    details = {"best_loss": best["target_loss"], "step": cfg.step, "runs": len(points), "target": tset.describe(),
               "grid": [{"weights": r["weights"], "target_loss": r["target_loss"]} for r in rows]}
    return finish(ctx, "grid", best["weights"], details=details, x="step", xlabel="grid point")


SPEC = MethodSpec("grid", run, uses_target=True, online=False,
                  summary="oracle: every simplex point at step 0.1 (K <= 3) trained and scored")

__all__ = ["SPEC", "grid_size", "run", "simplex_grid"]
