"""Validation and unit conversion of mixture weights (pure)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fastmix_data.errors import WeightsError

UNITS = ("samples", "tokens")


def weight_value(name: str, value: Any, where: str = "weight of source") -> float:
    """``value`` as a finite, non-negative float, or a `WeightsError` naming ``name``.

    Accepted: real numbers (int, float, numpy scalars, ``Fraction``) and 0-d numpy arrays / torch
    tensors holding one. Refused: booleans, strings, bytes, None, containers, NaN, infinities,
    negatives and ints too large for a float (a silently coerced ``"0.5"`` or ``True`` would hide a
    bug in the caller).
    """
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise WeightsError(
            f"{where} {name!r} is {value!r} ({type(value).__name__}); weights must be numbers "
            "(int or float), not strings, booleans or containers"
        )
    try:
        f = float(value)
    except (OverflowError, ValueError):
        raise WeightsError(f"{where} {name!r} is too large for a float ({str(value)[:20]}...)") from None
    if not math.isfinite(f):
        raise WeightsError(f"{where} {name!r} is {f}; weights must be finite")
    if f < 0:
        raise WeightsError(f"{where} {name!r} is negative ({f}); weights must be >= 0")
    return f


def normalize_weights(weights: Mapping[str, float] | Sequence[float], names: Sequence[str]) -> np.ndarray:
    """Weights as a float64 array in ``names`` order, summing to 1.

    Args:
        weights: {source: weight} naming every source (0 allowed), or a sequence of len(names).
            Values are numbers (see `weight_value`); any finite size works: values whose sum
            overflows a float (two of 1e308) are scaled by their maximum before normalising.
        names: the stream's sources.

    Raises:
        WeightsError: unknown or missing sources, wrong length, a value that is not a number
            (string, boolean, None), NaN/inf, negative, or all zero.
    """
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names), key=str)
        if unknown:
            raise WeightsError(f"weights name unknown sources {unknown}; the stream's sources are {list(names)}")
        missing = [n for n in names if n not in weights]
        if missing:
            raise WeightsError(f"weights missing for sources {missing}; give every source a weight (0 to exclude it)")
        values = [weights[n] for n in names]
    elif isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise WeightsError(
            f"weights must be a mapping {{source: weight}} or a sequence of {len(names)} numbers, got {weights!r}"
        )
    else:
        values = list(weights)
        if len(values) != len(names):
            raise WeightsError(f"got {len(values)} weights for {len(names)} sources {list(names)}")
    out = np.array([weight_value(n, v) for n, v in zip(names, values)], dtype=np.float64)
    return normalized(out, f"the weights of sources {list(names)}")


def normalized(w: np.ndarray, what: str) -> np.ndarray:
    """Finite non-negative ``w`` divided by its sum, without overflow (bit-identical to ``w / w.sum()``
    whenever that sum is finite). Raises `WeightsError` (naming ``what``) when all are zero."""
    with np.errstate(over="ignore"):
        total = w.sum()
    if not math.isfinite(total):  # e.g. two values of 1e308: scale down first (exact: a power-free max)
        w = w / w.max()
        total = w.sum()
    if not total > 0:
        raise WeightsError(f"all weights are zero in {what}; at least one must be > 0")
    out = w / total
    if not np.isfinite(out).all():  # pragma: no cover - finite inputs scaled by their max cannot overflow
        raise WeightsError(f"{what} cannot be normalised to finite shares")
    return out


def check_item_weights(values: Any, names: Sequence[str], where: str) -> list[float]:
    """Validate a recorded item-unit weight vector (a history entry) without changing its bits.

    Returns the values as floats. Raises `WeightsError` naming ``where`` and the source: not a list of
    len(names) numbers, a NaN/inf/negative value, or all zero.
    """
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Sequence):
        raise WeightsError(f"{where} must be a list of {len(names)} weights, got {values!r}")
    if len(values) != len(names):
        raise WeightsError(f"{where} has {len(values)} weights for {len(names)} sources {list(names)}")
    out = [weight_value(n, v, where=f"{where}: weight of source") for n, v in zip(names, values)]
    if not any(x > 0 for x in out):
        raise WeightsError(f"{where} is all zero; at least one weight must be > 0")
    return out


def to_item_units(w: np.ndarray, units: str, tokens_per_item: np.ndarray) -> np.ndarray:
    """Convert weights in ``units`` ("samples" or "tokens") to item (sample) shares.

    Token weights w_k mean "w_k of all tokens": item share is proportional to w_k / tokens_per_item_k.
    """
    if units not in UNITS:
        raise WeightsError(f"unknown weight units {units!r}; use one of {UNITS}")
    if units == "samples":
        return w
    per = np.where(tokens_per_item > 0, tokens_per_item, 1.0)
    return normalized(w / per, "token weights converted to items")


def from_item_units(w: np.ndarray, units: str, tokens_per_item: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_item_units`."""
    if units == "samples":
        return w
    return normalized(w * tokens_per_item, "item weights converted to tokens")
