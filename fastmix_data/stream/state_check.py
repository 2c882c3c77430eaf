"""Checks of a saved stream state before `MixtureStream.load_state_dict` trusts it.

Every field is checked for type and range and named when wrong (``history[2].batch is -1; must be
an integer >= 0``), so a damaged or hand-edited state is refused with a `StateError` instead of
failing deep inside the planner or, worse, resuming a different sequence. The state also carries a
compact digest of every shard (``shards``), so that a resume refused because a source changed can
name the shards that changed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastmix_data.errors import StateError, WeightsError
from fastmix_data.plan.weights import UNITS, check_item_weights

MAX = 1 << 62  # batch indices, positions, versions
DIGEST_HEX = 8  # hex digits per shard in the state's "shards" digests


def _bad(where: str, value: Any, want: str) -> StateError:
    shown = repr(value)
    return StateError(f"stream state field {where} is {shown[:80]}{'...' if len(shown) > 80 else ''}; {want}")


def _int(obj: Mapping, key: str, where: str, lo: int = 0) -> int:
    if key not in obj:
        raise StateError(f"stream state field {where}.{key} is missing")
    v = obj[key]
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v < MAX:
        raise _bad(f"{where}.{key}", v, f"must be an integer >= {lo}")
    return v


def check_state(state: Mapping[str, Any], names: Sequence[str], batch_items: int) -> None:
    """Check the fields of a state (format and version already checked) for a stream over
    ``names`` with ``batch_items`` items per global batch.

    Raises:
        StateError: naming the first field that is missing, of the wrong type or out of range.
    """
    if not isinstance(state.get("fingerprint"), str):
        raise _bad("fingerprint", state.get("fingerprint"), "must be a hex string")
    if "config" in state and not isinstance(state["config"], Mapping):
        raise _bad("config", state["config"], "must be a JSON object")
    if state.get("version", 1) >= 3:
        _check_partitions(state.get("config"))
    _int(state, "next_batch", "state")
    cursor = state.get("cursor")
    if cursor is not None:
        if not isinstance(cursor, Mapping):
            raise _bad("cursor", cursor, "must be null or a JSON object")
        _int(cursor, "next", "cursor")
        _int(cursor, "worker", "cursor")
        if _int(cursor, "num_workers", "cursor", lo=1) <= cursor["worker"]:
            raise _bad("cursor.worker", cursor["worker"], f"must be below num_workers ({cursor['num_workers']})")
    _check_history(state.get("history"), names, batch_items)
    _check_probes(state.get("probes", []), names)


def _check_partitions(config: Any) -> None:
    """Version 3: the config names the canonical partitions the content was defined with (P, the
    items one partition serves at a time, dividing the per-rank batch) and the ids' end-of-document
    id (null: none)."""
    if not isinstance(config, Mapping):
        raise StateError("stream state field config is missing; a version 3 state records the stream's configuration")
    _int(config, "partitions", "config", lo=1)
    chunk = _int(config, "chunk_items", "config", lo=1)
    batch = config.get("batch_size")
    if isinstance(batch, int) and not isinstance(batch, bool) and batch % chunk:
        raise _bad("config.chunk_items", chunk, f"must divide config.batch_size ({batch})")
    if "ids_eos_id" not in config:
        raise StateError("stream state field config.ids_eos_id is missing")
    eos = config.get("ids_eos_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or eos < 0):
        raise _bad("config.ids_eos_id", eos, "must be null or an integer >= 0")


def _check_history(history: Any, names: Sequence[str], batch_items: int) -> None:
    if not isinstance(history, list) or not history:
        raise _bad("history", history, "must be a non-empty list of weight changes")
    last_version = last_position = -1
    for i, h in enumerate(history):
        where = f"history[{i}]"
        if not isinstance(h, Mapping):
            raise _bad(where, h, "must be a JSON object")
        version, batch, position = (_int(h, k, where) for k in ("version", "batch", "position"))
        if i == 0 and (batch, position) != (0, 0):
            raise _bad(f"{where}.position", position, "the first weights must apply from position 0")
        if version <= last_version:
            raise _bad(f"{where}.version", version, f"versions must increase (previous {last_version})")
        if position <= last_position:
            raise _bad(f"{where}.position", position, f"positions must increase (previous {last_position})")
        if batch != position // batch_items:
            raise _bad(f"{where}.batch", batch, f"must be position // {batch_items} ({position // batch_items})")
        last_version, last_position = version, position
        try:
            check_item_weights(h.get("weights"), names, f"stream state field {where}.weights")
            requested = h.get("requested")
            if requested is not None:
                if not isinstance(requested, Mapping) or set(requested) != set(names):
                    raise _bad(f"{where}.requested", requested, f"must map each of {list(names)} to a weight")
                check_item_weights([requested[n] for n in names], names, f"stream state field {where}.requested")
        except WeightsError as exc:
            raise StateError(str(exc)) from None
        if h.get("units", "samples") not in UNITS:
            raise _bad(f"{where}.units", h.get("units"), f"must be one of {list(UNITS)}")
        t = h.get("time", 0.0)
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            raise _bad(f"{where}.time", t, "must be a finite number (seconds since the epoch)")
        if h.get("publisher") is not None:
            _check_publisher(h["publisher"], f"{where}.publisher")


def _check_publisher(pub: Any, where: str) -> None:
    """A followed change's record of its publication (docs/live.md): run id, seq, publish time."""
    if not isinstance(pub, Mapping) or not isinstance(pub.get("run_id"), str) or not pub["run_id"]:
        raise _bad(where, pub, "must be null or {run_id: non-empty string, seq, published}")
    _int(pub, "seq", where)
    t = pub.get("published", 0.0)
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise _bad(f"{where}.published", t, "must be a finite number (seconds since the epoch)")


def _check_probes(probes: Any, names: Sequence[str]) -> None:
    if not isinstance(probes, list):
        raise _bad("probes", probes, "must be a list")
    for i, p in enumerate(probes):
        where = f"probes[{i}]"
        if not isinstance(p, Mapping):
            raise _bad(where, p, "must be a JSON object")
        for key in ("id", "steps", "at_batch"):
            _int(p, key, where)
        try:
            check_item_weights(p.get("weights"), names, f"stream state field {where}.weights")
        except WeightsError as exc:
            raise StateError(str(exc)) from None


# ------------------------------------------------------------------------------------------ shards
def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def shard_digests(sources: Sequence[Any]) -> dict[str, dict[str, str]]:
    """Per source: a digest of its shard paths, and per shard 8 hex digits of (path, bytes, sha256),
    concatenated (8 bytes of state per shard)."""
    out = {}
    for src in sources:
        shards = src.shards
        out[src.name] = {
            "paths": _digest(*(s.path for s in shards))[:16],
            "shards": "".join(_digest(s.path, s.bytes, s.sha256)[:DIGEST_HEX] for s in shards),
        }
    return out


def changed_shards(saved: Any, sources: Sequence[Any], limit: int = 5) -> list[str]:
    """What changed in each source's shards since the state was saved (empty when the state has no
    shard digests, e.g. an older state): the shards whose bytes differ, and added or removed ones."""
    if not isinstance(saved, Mapping):
        return []
    out = []
    for src in sources:
        was = saved.get(src.name)
        if not isinstance(was, Mapping) or not isinstance(was.get("shards"), str):
            continue
        old = [was["shards"][i : i + DIGEST_HEX] for i in range(0, len(was["shards"]), DIGEST_HEX)]
        now = [_digest(s.path, s.bytes, s.sha256)[:DIGEST_HEX] for s in src.shards]
        same_paths = was.get("paths") == _digest(*(s.path for s in src.shards))[:16]
        if same_paths and len(old) == len(now):
            bad = [s for s, a, b in zip(src.shards, old, now) if a != b]
            what = [f"{s.path} (now {s.bytes} bytes, sha256 {s.sha256[:12]}...) changed" for s in bad]
        else:
            kept = set(old)
            bad = [s for s, d in zip(src.shards, now) if d not in kept]
            gone = len(set(old) - set(now))
            what = [f"{s.path} is new or changed" for s in bad]
            if gone:
                what.append(f"{gone} shard(s) of the saved state are gone or changed")
        if what:
            shown = "; ".join(what[:limit]) + (f"; and {len(what) - limit} more" if len(what) > limit else "")
            out.append(f"source {src.name!r}: {shown}")
    return out
