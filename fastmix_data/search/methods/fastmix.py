"""FastMix through the registry: a stream serving every source (uniformly, or in
``fastmix.serve_weights``), the target, and :class:`~fastmix_data.search.fastmix.loop.FastMixLoop`."""

from __future__ import annotations

from ..context import MethodResult, MethodSpec, RunContext
from ..fastmix.loop import FastMixLoop


def run(ctx: RunContext) -> MethodResult:
    data = ctx.train_stream(ctx.config.fastmix.serve_weights)
    return FastMixLoop(ctx, data, ctx.target).run()


SPEC = MethodSpec("fastmix", run, uses_target=True, online=True,
                  summary="online LM-head hypergradient search; cost independent of K")

__all__ = ["SPEC", "run"]
