"""Field-by-field validation of a manifest, independent of its fingerprint.

Design problem: the fingerprint covers only what determines the plan, and an editor can recompute
it; the derived counts (``take``, ``epochs``, token counts, shares) are not covered at all, yet the
converters turn them into another loader's mixture. A manifest with a negative ``take`` or a
zero history vector must be refused where it is read, naming the field, not turned into a
different mixture with exit code 0.

Solution: two passes, both run by :func:`~fastmix_data.export.manifest.validate_manifest` (so by
``read_manifest``, ``load_manifest``, ``stream_from_manifest``, ``resample``, every converter and the
CLI). :func:`check_fields` checks each field's type and range and the sums that tie them together
(source totals, the budget); :func:`check_counts` recomputes every shard's ``take`` and ``epochs``
from the manifest's own plan (O(#shards + #weight changes)) and bounds the token counts. Messages
name the field as ``sources[1](web).shards[2](web/shard-00000.tar).take``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastmix_data.errors import ManifestError, WeightsError
from fastmix_data.plan.partition import Piece, SourceLayout
from fastmix_data.plan.planner import POLICIES, Exhaustion, MixturePlan, WeightChange
from fastmix_data.plan.weights import UNITS, check_item_weights

FORMATS = ("parquet", "webdataset", "mds", "hf")  # sources.FORMATS (not imported: no reader imports here)
MODES = ("samples", "packing")
MAX_COUNT = 1 << 62  # counts, positions and sizes above this are nonsense (and overflow int64 sums)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHARE_TOLERANCE = 1e-6  # realised shares are recomputed from rounded counts


def _bad(where: str, value: Any, want: str) -> ManifestError:
    shown = repr(value)
    return ManifestError(f"{where} is {shown[:80]}{'...' if len(shown) > 80 else ''}; {want}")


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _int(obj: Mapping, key: str, where: str, lo: int = 0, none: bool = False) -> int | None:
    v = obj[key]
    if v is None and none:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < MAX_COUNT:
        raise _bad(_at(where, key), v, f"must be an integer >= {lo}" + (" or null" if none else ""))
    return v


def _number(obj: Mapping, key: str, where: str, hi: float | None = None) -> float:
    v = obj[key]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise _bad(f"{where}.{key}", v, "must be a finite number >= 0")
    if hi is not None and v > hi:
        raise _bad(f"{where}.{key}", v, f"must be at most {hi}")
    return float(v)


def _str(obj: Mapping, key: str, where: str, none: bool = False, choices: Sequence[str] = ()) -> str | None:
    v = obj[key]
    if v is None and none:
        return None
    if not isinstance(v, str) or not v or (choices and v not in choices):
        want = f"must be one of {list(choices)}" if choices else "must be a non-empty string"
        raise _bad(_at(where, key), v, want + (" or null" if none else ""))
    return v


def _mapping(obj: Mapping, key: str, where: str) -> Mapping:
    v = obj[key]
    if not isinstance(v, Mapping):
        raise _bad(f"{where}.{key}", v, "must be a JSON object")
    return v


def _shares(value: Any, where: str, names: Sequence[str], none: bool = False) -> None:
    """A {source: share} mapping with finite values >= 0 (keys are checked by the caller)."""
    if value is None and none:
        return
    if not isinstance(value, Mapping):
        raise _bad(where, value, "must be a JSON object {source: weight}")
    for name, v in value.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise _bad(f"{where}.{name}", v, "must be a finite number >= 0")


# ------------------------------------------------------------------------------------------ fields
def check_fields(m: Mapping[str, Any]) -> None:
    """Type, range and sum checks of every field (all fields are present: checked before).

    Raises:
        ManifestError: naming the first offending field and its value.
    """
    if not isinstance(m["fingerprint"], str) or not _SHA256.match(m["fingerprint"]):
        raise _bad("fingerprint", m["fingerprint"], "must be 64 lower-case hex digits")
    _int(m, "seed", "")
    if not isinstance(m["shuffle"], bool):
        raise _bad("shuffle", m["shuffle"], "must be true or false")
    mode = m["mode"]
    kind = _str(mode, "kind", "mode", choices=MODES)
    if kind == "packing":
        _int(mode, "seq_len", "mode", lo=1)
        _str(mode, "tokenizer", "mode")
    elif "tokenizer" in mode:
        _str(mode, "tokenizer", "mode", none=True)
    _str(m, "weight_units", "", choices=UNITS)
    names = [_source_name(s, i) for i, s in enumerate(m["sources"])]
    _check_history(m["history"], names)
    _check_weights(m["weights"], names)
    budget = m["budget"]
    _int(budget, "items", "budget")
    _int(budget, "tokens", "budget") if "tokens" in budget else None
    if "ended_early" in budget and not isinstance(budget["ended_early"], bool):
        raise _bad("budget.ended_early", budget["ended_early"], "must be true or false")
    packing_len = mode["seq_len"] + 1 if kind == "packing" else None
    for i, src in enumerate(m["sources"]):
        _check_source(src, f"sources[{i}]({src['name']})", packing_len)


def _source_name(src: Mapping, i: int) -> str:
    if not isinstance(src["name"], str) or not src["name"]:
        raise _bad(f"sources[{i}].name", src["name"], "must be a non-empty string")
    return src["name"]


def _check_history(history: Sequence[Mapping], names: list[str]) -> None:
    last_version = last_position = -1
    for i, h in enumerate(history):
        where = f"history[{i}]"
        version = _int(h, "version", where)
        position = _int(h, "position", where)
        if version <= last_version:
            raise _bad(f"{where}.version", version, f"versions must increase (previous {last_version})")
        if position <= last_position:
            raise _bad(f"{where}.position", position, f"positions must increase (previous {last_position})")
        last_version, last_position = version, position
        try:
            check_item_weights(h["weights"], names, f"{where}.weights")
            if h.get("requested") is not None:
                if not isinstance(h["requested"], Mapping):
                    raise _bad(f"{where}.requested", h["requested"], "must be a JSON object or null")
                check_item_weights(
                    [h["requested"].get(n, 0) for n in names], names, f"{where}.requested"
                )
        except WeightsError as exc:
            raise ManifestError(str(exc)) from None
        if h.get("units") is not None and h["units"] not in UNITS:
            raise _bad(f"{where}.units", h["units"], f"must be one of {list(UNITS)}")


def _check_weights(weights: Mapping, names: list[str]) -> None:
    for key in ("requested", "initial"):
        if key in weights:
            _shares(weights[key], f"weights.{key}", names, none=True)
    for key in ("requested_items", "requested_tokens", "realised_items", "realised_tokens"):
        if key in weights:
            _shares(weights[key], f"weights.{key}", names)


def _check_source(src: Mapping, where: str, packing_len: int | None) -> None:
    """Check one source's fields and its shards' (their sums: `check_counts`)."""
    _str(src, "format", where, choices=FORMATS)
    if not isinstance(src["reader"], Mapping):
        raise _bad(f"{where}.reader", src["reader"], "must be a JSON object")
    cols = _mapping(src, "columns", where)
    for key in ("text", "ids"):
        if key not in cols:
            raise ManifestError(f"{where}.columns lacks {key!r}")
        _str(cols, key, f"{where}.columns", none=True)
    if cols["text"] is None and cols["ids"] is None:
        raise ManifestError(f"{where}.columns has neither a text nor an ids column")
    extra = cols.get("extra", [])
    if not isinstance(extra, list) or not all(isinstance(x, str) and x for x in extra):
        raise _bad(f"{where}.columns.extra", extra, "must be a list of column names")
    exhaustion = _mapping(src, "exhaustion", where)
    if "policy" not in exhaustion:
        raise ManifestError(f"{where}.exhaustion lacks 'policy'")
    _str(exhaustion, "policy", f"{where}.exhaustion", choices=POLICIES)
    if "max_epochs" in exhaustion:
        _int(exhaustion, "max_epochs", f"{where}.exhaustion", lo=1, none=True)
    if not src["shards"]:
        raise ManifestError(f"{where}.shards is empty; a source needs at least one shard")
    for j, sh in enumerate(src["shards"]):
        here = f"{where}.shards[{j}]" + (f"({sh['path']})" if isinstance(sh.get("path"), str) else "")
        _str(sh, "path", here)
        for key in ("rows", "bytes", "items", "take", "take_tokens", "epochs"):
            _int(sh, key, here)
        _int(sh, "tokens", here, none=True)
        if not isinstance(sh["sha256"], str) or not _SHA256.match(sh["sha256"]):
            raise _bad(f"{here}.sha256", sh["sha256"], "must be 64 lower-case hex digits")
        if packing_len is None and sh["items"] != sh["rows"]:
            raise _bad(f"{here}.items", sh["items"], f"must equal rows ({sh['rows']}) in sample mode")
        if packing_len is not None and sh["take_tokens"] != sh["take"] * packing_len:
            raise _bad(f"{here}.take_tokens", sh["take_tokens"], f"must be take x {packing_len} in packing mode")
    for key in ("rows", "bytes", "items", "take", "tokens", "take_tokens"):
        _int(src, key, where)
    _number(src, "epochs", where)


# ------------------------------------------------------------------------------------------ counts
def layouts_of(manifest: Mapping[str, Any]) -> tuple[int, int, list | None]:
    """(partitions, chunk, per-source `SourceLayout` or None) of a manifest."""
    parts = manifest.get("partitions")
    if not parts:
        return 1, 1, None
    layouts = []
    for src, slices in zip(manifest["sources"], parts["slices"]):
        items = tuple(int(sh["items"]) for sh in src["shards"])
        layouts.append(SourceLayout(items, tuple(tuple(Piece(*map(int, x)) for x in sl) for sl in slices)))
    return int(parts["count"]), int(parts["chunk"]), layouts


def plan_of(m: Mapping[str, Any]) -> MixturePlan:
    """The pure plan a manifest's fields describe (no I/O, no validation: see `manifest_plan`)."""
    partitions, chunk, layouts = layouts_of(m)
    return MixturePlan(
        [s["name"] for s in m["sources"]],
        [[int(sh["items"]) for sh in s["shards"]] for s in m["sources"]],
        int(m["seed"]),
        [
            WeightChange(int(h["version"]), int(h["position"]), tuple(float(w) for w in h["weights"]))
            for h in m["history"]
        ],
        [Exhaustion(s["exhaustion"]["policy"], s["exhaustion"].get("max_epochs")) for s in m["sources"]],
        bool(m["shuffle"]),
        int(m["budget"]["items"]),
        partitions=partitions,
        chunk=chunk,
        layouts=layouts,
    )


def check_counts(m: Mapping[str, Any]) -> None:
    """Every shard's ``take`` and ``epochs`` as the manifest's own plan gives them; token counts
    and shares consistent with them (within rounding).

    Raises:
        ManifestError: naming the first shard or field that differs, with both values.
    """
    plan = plan_of(m)
    plan.segments()
    n = int(m["budget"]["items"])
    if plan.end is not None and plan.end < n:
        raise ManifestError(
            f"budget.items is {n} but the manifest's plan ends at position {plan.end} (exhaustion "
            "policies); regenerate the manifest"
        )
    takes = plan.shard_takes(n)
    take_tokens = []
    for k, src in enumerate(m["sources"]):
        where = f"sources[{k}]({src['name']})"
        take, epochs = takes[k]
        for j, sh in enumerate(src["shards"]):
            for key, want in (("take", take[j]), ("epochs", epochs[j])):
                if sh[key] != int(want):
                    raise ManifestError(
                        f"{where}.shards[{j}]({sh['path']}).{key} is {sh[key]} but the manifest's plan "
                        f"gives {int(want)}; derived counts may not be edited: regenerate the manifest"
                    )
        for key in ("rows", "bytes", "items", "take"):
            total = sum(sh[key] for sh in src["shards"])
            if src[key] != total:
                raise _bad(f"{where}.{key}", src[key], f"must be the sum over its shards ({total})")
        shard_sum = sum(sh["take_tokens"] for sh in src["shards"])
        if abs(src["take_tokens"] - shard_sum) > len(src["shards"]) / 2 + 1:
            raise _bad(f"{where}.take_tokens", src["take_tokens"], f"must be the sum over its shards (~{shard_sum})")
        take_tokens.append(src["take_tokens"])
        epochs = src["take"] / max(src["items"], 1)
        if not math.isclose(src["epochs"], epochs, rel_tol=1e-9, abs_tol=1e-9):
            raise _bad(f"{where}.epochs", src["epochs"], f"must be take / items ({epochs:.6g})")
    if sum(s["take"] for s in m["sources"]) != n:
        raise ManifestError(
            f"the sources' take values sum to {sum(s['take'] for s in m['sources'])} but budget.items is {n}; "
            "regenerate the manifest rather than editing it"
        )
    budget = m["budget"]
    if "tokens" in budget and abs(budget["tokens"] - sum(take_tokens)) > len(take_tokens) / 2 + 1:
        raise _bad("budget.tokens", budget["tokens"], f"must be the sum of the sources' take_tokens ({sum(take_tokens)})")
    _check_realised(m, n, np.asarray([s["take"] for s in m["sources"]], dtype=np.float64), np.asarray(take_tokens, dtype=np.float64))


def _check_realised(m: Mapping[str, Any], n: int, items: np.ndarray, tokens: np.ndarray) -> None:
    """Realised shares against the counts: items exactly; tokens within the rounding of the
    recorded token counts (the shares were computed before rounding)."""
    weights = m["weights"]
    k = len(items)
    checks = (
        ("realised_items", items, max(n, 1), SHARE_TOLERANCE),
        ("realised_tokens", tokens, max(tokens.sum(), 1.0), (k + 1) / max(tokens.sum(), 1.0) + SHARE_TOLERANCE),
    )
    for key, counts, total, tolerance in checks:
        if key not in weights:
            continue
        for name, count in zip((s["name"] for s in m["sources"]), counts):
            got = weights[key].get(name)
            if got is None or abs(got - count / total) > tolerance:
                raise _bad(f"weights.{key}.{name}", got, f"must be the realised share {count / total:.6g}")
