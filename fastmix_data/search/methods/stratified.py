"""Stratified: uniform weights over the sources (what FastMix's search stream serves)."""

from __future__ import annotations

from ..context import MethodResult, MethodSpec, RunContext, finish, uniform


def run(ctx: RunContext) -> MethodResult:
    """``1/K`` per source; no training, no target."""
    w = uniform(ctx.names)
    ctx.writer.record({"step": 0, "tokens": 0, "weights": w})
    return finish(ctx, "stratified", w, x="step", xlabel="step")


SPEC = MethodSpec("stratified", run, uses_target=False, online=False, summary="uniform weights")

__all__ = ["SPEC", "run"]
