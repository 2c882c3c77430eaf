"""Validation and unit conversion of mixture weights (pure)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fastmix_data.errors import WeightsError

UNITS = ("samples", "tokens")


def normalize_weights(weights: Mapping[str, float] | Sequence[float], names: Sequence[str]) -> np.ndarray:
    """Weights as a float64 array in ``names`` order, summing to 1.

    Args:
        weights: {source: weight} naming every source (0 allowed), or a sequence of len(names).
        names: the stream's sources.

    Raises:
        WeightsError: unknown or missing sources, wrong length, NaN/inf, negative, or all zero.
    """
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise WeightsError(f"weights name unknown sources {unknown}; the stream's sources are {list(names)}")
        missing = [n for n in names if n not in weights]
        if missing:
            raise WeightsError(f"weights missing for sources {missing}; give every source a weight (0 to exclude it)")
        values = [weights[n] for n in names]
    else:
        values = list(weights)
        if len(values) != len(names):
            raise WeightsError(f"got {len(values)} weights for {len(names)} sources {list(names)}")
    out = np.empty(len(values), dtype=np.float64)
    for i, (name, v) in enumerate(zip(names, values)):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise WeightsError(f"weight of source {name!r} is not a number: {v!r}") from None
        if not math.isfinite(f):
            raise WeightsError(f"weight of source {name!r} is {f}; weights must be finite")
        if f < 0:
            raise WeightsError(f"weight of source {name!r} is negative ({f}); weights must be >= 0")
        out[i] = f
    total = out.sum()
    if total <= 0:
        raise WeightsError(f"all weights are zero for sources {list(names)}; at least one must be > 0")
    return out / total


def to_item_units(w: np.ndarray, units: str, tokens_per_item: np.ndarray) -> np.ndarray:
    """Convert weights in ``units`` ("samples" or "tokens") to item (sample) shares.

    Token weights w_k mean "w_k of all tokens": item share is proportional to w_k / tokens_per_item_k.
    """
    if units not in UNITS:
        raise WeightsError(f"unknown weight units {units!r}; use one of {UNITS}")
    if units == "samples":
        return w
    per = np.where(tokens_per_item > 0, tokens_per_item, 1.0)
    x = w / per
    return x / x.sum()


def from_item_units(w: np.ndarray, units: str, tokens_per_item: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_item_units`."""
    if units == "samples":
        return w
    x = w * tokens_per_item
    return x / x.sum()
