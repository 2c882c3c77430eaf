"""MixMin, then FastMix from MixMin's mixture: a combination no paper ships.

MixMin's convex estimate is cheap and good when its premise holds (the best model for a mixture
is the mixture of per-source models); FastMix measures what helps the *jointly trained* model but
starts from uniform. Here MixMin spends ``mixmin_fastmix.mixmin_fraction`` of the budget on its
per-source proxies and fits a mixture; FastMix then starts from it (with a small floor toward
uniform, so no source starts at zero -- a zero weight could never come back under softmax) and
refines it online on the rest of the budget, with the ``fastmix`` section's settings. The
trajectory is FastMix's; MixMin's fit is under ``details.mixmin`` in ``weights.json``.
"""

from __future__ import annotations

import dataclasses

from ..context import MethodResult, MethodSpec, RunContext
from ..fastmix.loop import FastMixLoop
from . import mixmin


def run(ctx: RunContext) -> MethodResult:
    cfg = ctx.config
    total = int(cfg.max_tokens)
    mm_tokens = max(1, int(round(cfg.mixmin_fastmix.mixmin_fraction * total)))
    f = mixmin.fit(ctx, mm_tokens)
    eps = cfg.mixmin_fastmix.floor
    start = {n: (1 - eps) * f.weights[n] + eps / ctx.K for n in ctx.names}
    rest = dataclasses.replace(ctx, config=cfg.replace(max_tokens=max(1, total - mm_tokens)))
    details = {"mixmin": {"weights": f.weights, "tokens": mm_tokens, **f.details}, "start": start}
    return FastMixLoop(rest, rest.train_stream(cfg.fastmix.serve_weights), ctx.target, init_weights=start,
                       method="mixmin_fastmix", extra_details=details).run()


SPEC = MethodSpec("mixmin_fastmix", run, uses_target=True, online=True,
                  summary="MixMin's convex estimate as FastMix's starting point, refined online")

__all__ = ["SPEC", "run"]
