"""Typed, documented config fields: the machinery under :mod:`fastmix_data.search.config`.

Design problem: the search config must be the same from Python, YAML and the command line, with
one validation and one set of defaults, and every field's documentation must reach ``--help``.

Solution: every field is declared once with :func:`opt` (its default, its doc, its *kind* and its
limits) or :func:`section` (a nested :class:`Section`). From that one declaration:

* :meth:`Section.from_dict` coerces YAML/JSON values (YAML 1.1 reads ``1e-3`` as a string; token
  counts may be written ``"20M"``; ``"auto"``/``"none"`` mean None where None is allowed) and
  rejects unknown keys with a did-you-mean;
* :meth:`Section.problems` / :meth:`Section.validate` check every field generically (type, range,
  choices) plus each section's cross-field :meth:`Section.checks`, and report every problem on ONE
  line, each naming the field's dotted path and its flag: ``fastmix.z_lr (--fastmix-z-lr): must be
  >= 0, got -1``;
* :func:`walk` lists every leaf field with its path and flag, which the CLI turns into options
  (help text from the doc, booleans as ``--flag/--no-flag``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fastmix_data.errors import ConfigError

#: the kinds a field may have (how its value is parsed and checked)
KINDS = ("int", "float", "str", "bool", "count", "weights", "betas", "proxy", "sources", "target", "mapping")

_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}
_NONE_WORDS = ("none", "null", "auto", "")


def opt(default: Any, doc: str, kind: str, *, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, choices: tuple | None = None, auto: str | None = None,
        aliases: tuple[str, ...] = (), flag: str | None = None) -> Any:
    """Declare a config field.

    Args:
        default: the default (a dict/list default is copied per instance).
        doc: one or two sentences for ``--help`` and the docs: what it is, with units.
        kind: one of :data:`KINDS`.
        lo, hi, lo_open: numeric range (``lo <= v <= hi``; ``lo < v`` with ``lo_open``).
        choices: the allowed values of a ``str`` field.
        auto: when set, None is allowed and means this (e.g. "derived from the budget").
        aliases: extra command-line flags (without ``--``) kept for compatibility.
        flag: the command-line flag (without ``--``) when not derived from the field's name.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown field kind {kind!r}")
    meta = {"doc": doc, "kind": kind, "lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "auto": auto,
            "aliases": aliases, "flag": flag}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str, *, prefix_flags: bool = False) -> Any:
    """Declare a nested section. ``prefix_flags``: its flags are ``--<section>-<field>`` (method
    sections, whose field names repeat across methods) instead of ``--<field>``."""
    return field(default_factory=cls, metadata={"kind": "section", "doc": doc, "cls": cls, "prefix": prefix_flags})


@dataclass(frozen=True)
class Leaf:
    """One leaf field of a config tree: dotted ``path``, its ``flag`` (``--seq-len``), the dataclass
    field and the prefix of its section."""

    path: str
    flag: str
    field: dataclasses.Field
    section_path: str


def walk(cls: type, path: str = "", prefix: str = "") -> Iterator[Leaf]:
    """Every leaf field of section class ``cls``, depth first, in declaration order."""
    for f in dataclasses.fields(cls):
        p = f"{path}.{f.name}" if path else f.name
        if f.metadata.get("kind") == "section":
            sub_prefix = f"{f.name}-" if f.metadata.get("prefix") else prefix
            yield from walk(f.metadata["cls"], p, sub_prefix)
        else:
            yield Leaf(p, flag_of(f, prefix), f, path)


def flag_of(f: dataclasses.Field, prefix: str = "") -> str:
    """The command-line flag of field ``f`` in a section whose flags carry ``prefix``."""
    if f.metadata.get("flag"):
        return "--" + f.metadata["flag"]
    return "--" + (prefix + f.name).replace("_", "-")


# ============================================================================ coercion


def parse_count(v: Any, what: str = "value") -> int:
    """``20M`` -> 20_000_000, ``1.5k`` -> 1500, ``10B`` -> 10**10, ``"4096"`` -> 4096 (also ``_`` and
    a trailing ``_tokens``). Raises ``ValueError`` naming ``what``."""
    if isinstance(v, bool):
        raise ValueError(f"{what} must be a count, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        s = v.strip().lower().replace("_", "").removesuffix("tokens")
        try:
            if s and s[-1] in _SUFFIX:
                x = float(s[:-1]) * _SUFFIX[s[-1]]
            else:
                x = float(s)
            if x.is_integer():
                return int(x)
        except ValueError:
            pass
    raise ValueError(f"{what} must be a whole number or a count like '20M', got {v!r}")


def _pairs(items: Any, what: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` or ``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}``."""
    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    out: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"{what} must be NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def coerce(kind: str, v: Any, *, optional: bool) -> Any:
    """Turn a YAML/JSON/command-line value into the field's type; raises ``ValueError``."""
    if v is None or (optional and isinstance(v, str) and v.strip().lower() in _NONE_WORDS):
        return None
    if kind == "count":
        return parse_count(v)
    if kind == "int":
        if isinstance(v, str):
            v = v.strip()
            try:
                return int(v)
            except ValueError:
                f = float(v)
                return int(f) if f.is_integer() else f
        return int(v) if isinstance(v, float) and v.is_integer() else v
    if kind == "float":
        return float(v) if isinstance(v, str) else v
    if kind == "bool" and isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "yes", "1", "on"):
            return True
        if s in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"must be true or false, got {v!r}")
    if kind == "betas":
        if isinstance(v, str):
            v = [x for x in v.replace("(", "").replace(")", "").split(",") if x.strip()]
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v
    if kind in ("weights", "mapping"):
        if isinstance(v, str):
            v = json.loads(v) if v.strip().startswith("{") else _pairs(v, kind)
        if kind == "weights" and isinstance(v, Mapping):
            return {str(k): float(x) if isinstance(x, str) else x for k, x in v.items()}
        return dict(v) if isinstance(v, Mapping) else v
    if kind == "sources":
        if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            return _pairs(v, "a source")
        return dict(v) if isinstance(v, Mapping) else v
    return v


# ============================================================================ checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_value(meta: Mapping, v: Any) -> str | None:
    """The problem with value ``v`` of a field (None when fine)."""
    kind, lo, hi = meta["kind"], meta["lo"], meta["hi"]
    if v is None:
        return None if meta["auto"] is not None else f"must be set ({meta['doc']})"
    if kind in ("int", "count") and not _is_int(v):
        return f"must be a whole number, got {v!r}"
    if kind == "float" and not _is_num(v):
        return f"must be a finite number, got {v!r}"
    if kind in ("int", "count", "float"):
        if lo is not None and (v <= lo if meta["lo_open"] else v < lo):
            return f"must be {'>' if meta['lo_open'] else '>='} {lo}, got {_short(v)}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {_short(v)}"
    if kind == "str" and not isinstance(v, str):
        return f"must be a string, got {v!r}"
    if meta["choices"] is not None and v not in meta["choices"]:
        return f"must be one of {list(meta['choices'])}, got {v!r}"
    if kind == "bool" and not isinstance(v, bool):
        return f"must be true or false, got {v!r}"
    if kind == "betas":
        ok = isinstance(v, tuple) and len(v) == 2 and all(_is_num(b) and 0 <= b < 1 for b in v)
        return None if ok else f"must be two numbers in [0, 1), got {v!r}"
    if kind == "weights":
        if not isinstance(v, Mapping):
            return f"must be a mapping {{source: weight}}, got {v!r}"
        bad = {k: x for k, x in v.items() if not (_is_num(x) and x >= 0)}
        if bad or not v or sum(v.values()) <= 0:
            return f"must map sources to finite non-negative numbers, not all zero, got {dict(v)!r}"
    if kind in ("mapping", "sources") and not isinstance(v, Mapping):
        return f"must be a mapping, got {v!r}"
    if kind == "sources" and not all(isinstance(k, str) and _is_path_spec(x) for k, x in v.items()):
        return f"must map source names to paths, globs or lists of them, got {_short(v)}"
    if kind == "target" and not (_is_path_spec(v) or (isinstance(v, Mapping) and v and all(
            isinstance(k, str) and _is_path_spec(x) for k, x in v.items()))):
        return f"must be a path, a glob, a list of them, or {{group: path}}, got {_short(v)}"
    return None


def _is_path_spec(v: Any) -> bool:
    import os

    if isinstance(v, (str, os.PathLike)):
        return bool(str(v))
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(x, (str, os.PathLike)) for x in v)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 120 else r[:117] + "..."


# ============================================================================ sections


class Section:
    """Base of every config section (a dataclass): generic dict I/O and validation.

    Subclasses declare fields with :func:`opt`/:func:`section` and may override :meth:`checks`
    (cross-field problems as ``(field name, message)`` pairs) and :meth:`_encode_field` /
    :meth:`_decode_field` (fields holding objects)."""

    #: the label used in error messages for this section when it is the root
    ROOT_LABEL: ClassVar[str] = "config"

    # ------------------------------------------------------------------ validation
    def checks(self) -> list[tuple[str, str]]:
        """Cross-field problems ``[(field name, message)]``; the generic checks come first."""
        return []

    def problems(self, path: str = "", prefix: str = "") -> list[str]:
        """Every problem of this section and its subsections, each naming ``path (--flag)``."""
        out: list[str] = []
        flags = {}
        for f in dataclasses.fields(self):
            p = f"{path}.{f.name}" if path else f.name
            v = getattr(self, f.name)
            if f.metadata.get("kind") == "section":
                sub = f"{f.name}-" if f.metadata.get("prefix") else prefix
                if not isinstance(v, f.metadata["cls"]):
                    out.append(f"{p}: must be a {f.metadata['cls'].__name__} section, got {type(v).__name__}")
                else:
                    out += v.problems(p, sub)
                continue
            flags[f.name] = flag_of(f, prefix)
            msg = check_value(f.metadata, v)
            if msg is None:
                msg = self._check_field(f.name, v)
            if msg:
                out.append(f"{p} ({flags[f.name]}): {msg}")
        for name, msg in self.checks():
            p = f"{path}.{name}" if path else name
            out.append(f"{p} ({flags.get(name, '--' + name.replace('_', '-'))}): {msg}")
        return out

    def _check_field(self, name: str, value: Any) -> str | None:
        """Extra check of one field beyond its kind (override for object-valued fields)."""
        return None

    def validate(self):
        """Raise :class:`~fastmix_data.errors.ConfigError` with every problem on one line; return self."""
        p = self.problems()
        if p:
            raise ConfigError(f"invalid {self.ROOT_LABEL}: " + "; ".join(p))
        return self

    # ------------------------------------------------------------------ dict I/O
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, path: str = ""):
        """Build from a mapping (YAML/JSON); unknown keys and uncoercible values raise
        :class:`ConfigError`. Not validated: call :meth:`validate` on the root."""
        if d is not None and not isinstance(d, Mapping):
            where = f"section {path!r}" if path else cls.ROOT_LABEL
            raise ConfigError(f"the {where} must be a mapping of its fields, got {_short(d)}")
        d = dict(d or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in fields]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), list(fields), n=1)
                hints.append(f"{path + '.' if path else ''}{k}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            where = f"section {path!r}" if path else cls.ROOT_LABEL
            raise ConfigError(f"unknown key(s) in the {where}: {', '.join(hints)}; known: {sorted(fields)}"[:1000])
        kw = {}
        for k, v in d.items():
            f = fields[k]
            p = f"{path}.{k}" if path else k
            if f.metadata.get("kind") == "section":
                sub = f.metadata["cls"]
                kw[k] = v if isinstance(v, sub) else sub.from_dict(v, p)
                continue
            try:
                kw[k] = cls._decode_field(k, coerce(f.metadata["kind"], v, optional=f.metadata["auto"] is not None))
            except (TypeError, ValueError, OverflowError) as e:
                raise ConfigError(f"invalid {cls.ROOT_LABEL if not path else 'config'}: {p}: {e}"[:500]) from None
        return cls(**kw)

    @classmethod
    def _decode_field(cls, name: str, value: Any) -> Any:
        return value

    def _encode_field(self, name: str, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    def to_dict(self) -> dict:
        """Plain JSON/YAML-able mapping; ``from_dict(to_dict())`` gives an equal config."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Section):
                out[f.name] = v.to_dict()
            else:
                out[f.name] = self._encode_field(f.name, v)
        return out


__all__ = ["KINDS", "Leaf", "Section", "check_value", "coerce", "flag_of", "opt", "parse_count", "section", "walk"]
