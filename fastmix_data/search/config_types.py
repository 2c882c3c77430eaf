"""Field types of the search and method configs, checked before their ranges.

Range checks such as ``0 < rho <= 1`` fail with a bare ``TypeError`` on a string from a YAML file;
:func:`type_problems` first checks each field against its annotation (``float``, ``int | None``,
``bool``, ``str``, ``dict``, ``list``) and names the ones of the wrong type, so a config is refused
with a `ConfigError` naming the field, never with a traceback from inside a comparison.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


def _ok(value: Any, kinds: set[str]) -> bool | None:
    """Whether ``value`` fits the annotation's kinds; None when the annotation is not checked here."""
    if kinds == {"bool"}:
        return isinstance(value, bool)
    if kinds and kinds <= {"int", "float"}:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return isinstance(value, int) or ("float" in kinds and math.isfinite(value))
    if kinds == {"str"}:
        return isinstance(value, str)
    if kinds == {"dict"}:
        return isinstance(value, Mapping)
    if kinds == {"list"}:
        return isinstance(value, (list, tuple))
    return None


def type_problems(config: Any) -> list[str]:
    """One message per field of the dataclass ``config`` whose value does not fit its annotation
    (``None`` allowed where the annotation allows it; floats must be finite)."""
    problems = []
    for f in dataclasses.fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = {part.strip() for part in annotation.split("|")}
        value = getattr(config, f.name)
        if value is None and "None" in parts:
            continue
        if _ok(value, parts - {"None"}) is False:
            problems.append(f"{f.name} must be {annotation.replace('None', 'null')}, got {value!r}"[:200])
    return problems
