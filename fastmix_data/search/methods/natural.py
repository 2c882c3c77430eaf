"""Natural: weights proportional to each source's size in tokens, optionally temperature-scaled,
``w_k ∝ n_k ** (1 / T)`` (T = 1: size-proportional; T -> inf: uniform). Token counts come from the
shard index (byte tokenizer: UTF-8 bytes + one end-of-document token per row); nothing is read."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..context import MethodResult, MethodSpec, RunContext, finish


def natural_weights(counts: Mapping[str, float], temperature: float = 1.0) -> dict[str, float]:
    """``w_k ∝ n_k ** (1 / temperature)``, computed relative to the largest count (no overflow).

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
        raise ValueError(f"token counts are all zero: {dict(counts)}")
    top = max(vals.values())
    scaled = {n: (c / top) ** (1.0 / temperature) if c > 0 else 0.0 for n, c in vals.items()}
    s = sum(scaled.values())
    return {n: v / s for n, v in scaled.items()}


def source_token_counts(sources: Mapping[str, Any]) -> dict[str, int]:
    """Tokens per source from the shard index."""
    from fastmix_data.sources import open_source
    from fastmix_data.sources.base import Source

    out = {}
    for name, spec in sources.items():
        src = spec if isinstance(spec, Source) and not isinstance(spec, (str, list, dict)) else open_source(name, spec)
        if src.tokens is None:
            raise ValueError(f"source {name!r}: the shard index has no token counts (no text or ids column?)")
        out[name] = int(src.tokens)
    return out


def run(ctx: RunContext) -> MethodResult:
    """Size-proportional weights with ``natural.temperature`` (the target is not used)."""
    counts = source_token_counts(ctx.require_sources("natural"))
    w = natural_weights(counts, ctx.config.natural.temperature)
    ctx.writer.record({"step": 0, "tokens": 0, "weights": w})
    return finish(ctx, "natural", w, details={"token_counts": counts, "temperature": ctx.config.natural.temperature},
                  x="step", xlabel="step")


SPEC = MethodSpec("natural", run, uses_target=False, online=False,
                  summary="size-proportional (tokens), optional temperature")

__all__ = ["SPEC", "natural_weights", "run", "source_token_counts"]
