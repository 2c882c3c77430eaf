"""Serve a manifest: its sources, its pure plan, and a `MixtureStream` that serves exactly it.

Sources are rebuilt from the manifest's own shard records (path, rows, tokens, bytes, sha256 and the
columns it read), so opening a manifest of thousands of shards re-hashes nothing; every shard's size
is checked when the manifest is read (``verify="size"``, or ``"sha256"`` to re-hash) and again, with
its row count, whenever a shard is decoded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from fastmix_data.errors import ManifestError
from fastmix_data.export._util import join_inside
from fastmix_data.export.manifest import load_manifest, plan_fingerprint, validate_manifest
from fastmix_data.export.manifest_check import layouts_of, plan_of
from fastmix_data.plan.planner import MixturePlan
from fastmix_data.sources import READERS
from fastmix_data.sources.base import ShardInfo
from fastmix_data.sources.mds import INDEX, mds_shard_locations
from fastmix_data.sources.reader import Columns
from fastmix_data.sources.source import ShardedSource

PLAN_KEYS = (
    "sources", "weights", "seed", "seq_len", "weight_units", "exhaustion", "shuffle", "max_items", "partitions",
    "chunk_items",
)  # fmt: skip


def _mds_root(path: str, root: str, cache: dict[str, str]) -> str:
    """The MDS dataset directory (holding index.json) of a shard: its directory or one above it,
    never above the manifest root."""
    root = os.path.abspath(root)
    directory = os.path.dirname(path)
    seen = []
    while directory not in cache:
        seen.append(directory)
        if os.path.isfile(os.path.join(directory, INDEX)):
            cache[directory] = directory
            break
        if directory == root or os.path.dirname(directory) == directory:
            raise ManifestError(
                f"MDS shard {path} has no index.json in its directory or above it (inside {root})"
            )
        directory = os.path.dirname(directory)
    for d in seen:
        cache[d] = cache[directory]
    return cache[directory]


def manifest_sources(manifest: Mapping[str, Any], *, allow_unsafe: bool = False) -> list[ShardedSource]:
    """The manifest's sources, as `ShardedSource` objects built from its shard records.

    ``manifest`` is checked field by field (not its files: see :func:`load_manifest`); paths are
    joined under its root.
    """
    validate_manifest(manifest, verify="none")
    root = manifest["root"]
    out, resolved = [], {}
    for src in manifest["sources"]:
        paths = [join_inside(root, sh["path"], f"shard of source {src['name']!r}", resolved) for sh in src["shards"]]
        fmt = src["format"]
        if fmt not in READERS:
            raise ManifestError(
                f"source {src['name']!r} has unknown format {fmt!r}; known: {sorted(READERS)}"
            )
        locations: dict[str, tuple[str, int]] = {}
        if fmt == "mds":
            roots: dict[str, str] = {}
            loaded: set[str] = set()
            for p in paths:
                r = _mds_root(p, root, roots)
                if r not in loaded:
                    loaded.add(r)
                    locations.update(mds_shard_locations(r))
            unlisted = [p for p in paths if p not in locations]
            if unlisted:
                raise ManifestError(
                    f"MDS shard {unlisted[0]} of source {src['name']!r} is not listed in its index.json"
                )
        cols = src["columns"]
        columns = Columns(text=cols.get("text"), ids=cols.get("ids"), extra=tuple(cols.get("extra") or ()))
        reader = READERS[fmt](
            text_field=columns.text, ids_field=columns.ids, allow_unsafe=allow_unsafe, locations=locations
        )
        shards = [
            ShardInfo(
                path=p, rows=int(sh["rows"]), tokens=sh["tokens"], bytes=int(sh["bytes"]), sha256=sh["sha256"]
            )
            for p, sh in zip(paths, src["shards"])
        ]
        out.append(ShardedSource(src["name"], fmt, shards, reader, columns))
    return out


def manifest_plan(manifest: Mapping[str, Any]) -> MixturePlan:
    """The pure plan a manifest describes (no I/O): the same function the stream serves from.
    The manifest is checked field by field first (:func:`validate_manifest` with verify="none")."""
    validate_manifest(manifest, verify="none")
    return plan_of(manifest)


def stream_fingerprint(stream: Any, root: str) -> str:
    """The plan fingerprint of a live stream's configuration, as a manifest under ``root`` records it."""
    from fastmix_data.export.manifest import manifest_from_stream

    plan = stream.manifest_plan()
    batches = -(-int(plan.limit or 0) // stream.global_batch_items)
    return manifest_from_stream(stream, batches, root=root)["fingerprint"]


def stream_from_manifest(
    manifest: str | os.PathLike | Mapping[str, Any],
    batch_size: int,
    *,
    verify: str = "size",
    root: str | None = None,
    **overrides: Any,
):
    """A `MixtureStream` that serves exactly the manifest's plan.

    The stream has the manifest's sources (joined under its root), seed, shuffle, seq_len, weight
    history (item weights as recorded, bit for bit), exhaustion policies and ``max_items`` = the
    budget in items. Served in full it yields ``floor(items / (batch_size * world_size))`` global
    batches: a last partial batch is not served, so choose a batch size that divides the budget.

    Args:
        manifest: a manifest path or dict.
        batch_size: items per batch per rank.
        verify: "none", "size" (default) or "sha256" checks of the shards before serving.
        root: override the manifest's root (a moved dataset).
        overrides: other MixtureStream arguments that do not change the plan (rank, world_size,
            cache_shards, tokenizer, eos_id, allow_unsafe, ...).

    Raises:
        ManifestError: an invalid manifest, changed shards, an override that would change the plan
            (edit the manifest instead), or a tokenizer other than the one the manifest was packed with.
    """
    from fastmix_data.stream.mixture import MixtureStream

    m = load_manifest(manifest, verify=verify, root=root)
    seq_len = _check_overrides(m, overrides)
    sources = manifest_sources(m, allow_unsafe=bool(overrides.pop("allow_unsafe", False)))
    history = m["history"]
    partitions, chunk, _ = layouts_of(m)
    if partitions > 1 and batch_size % chunk:
        raise ManifestError(
            f"the manifest's plan has {partitions} partitions serving {chunk} items per chunk; pass a "
            f"batch_size that is a multiple of {chunk} (got {batch_size}), or build a manifest for this batch size"
        )
    first = history[0].get("requested") or {s.name: w for s, w in zip(sources, history[0]["weights"])}
    stream = MixtureStream(
        {s.name: s for s in sources},
        first if history[0].get("requested") else history[0]["weights"],
        batch_size,
        seed=int(m["seed"]),
        seq_len=seq_len,
        weight_units=m["weight_units"] if history[0].get("requested") else "samples",
        exhaustion={s["name"]: dict(s["exhaustion"]) for s in m["sources"]},
        shuffle=bool(m["shuffle"]),
        max_items=int(m["budget"]["items"]),
        partitions=partitions,
        **({"chunk_items": chunk} if partitions > 1 else {}),
        **({"eos_id": m["mode"]["ids_eos_id"]} if m["mode"].get("ids_eos_id") is not None and "eos_id" not in overrides else {}),
        **overrides,
    )
    _replay_history(stream, m, [s.name for s in sources])
    got = stream_fingerprint(stream, m["root"])
    if got != plan_fingerprint(m):
        raise ManifestError(
            "the stream built from the manifest would not serve the manifest's plan (its items per shard "
            "differ: was the tokenizer or a shard changed?); regenerate the manifest"
        )
    return stream


def _check_overrides(m: Mapping[str, Any], overrides: Mapping[str, Any]) -> int | None:
    """The manifest's packing length (None: samples), after refusing overrides that would change the
    plan and a tokenizer other than the one the manifest was packed with."""
    from fastmix_data.stream.tokenize import as_tokenizer

    bad = sorted(set(overrides) & set(PLAN_KEYS))
    if bad:
        raise ManifestError(
            f"stream_from_manifest cannot override {bad}: they change the plan the manifest describes; "
            "build a new manifest instead"
        )
    mode = m["mode"]
    seq_len = mode.get("seq_len") if mode["kind"] == "packing" else None
    tok = as_tokenizer(overrides.get("tokenizer"), overrides.get("eos_id"))
    if seq_len is not None and tok.fingerprint() != mode.get("tokenizer"):
        raise ManifestError(
            f"the manifest was packed with tokenizer {mode.get('tokenizer')!r} but this stream's is "
            f"{tok.fingerprint()!r}; pass the same tokenizer= (and eos_id=)"
        )
    return seq_len


def _replay_history(stream, m: Mapping[str, Any], names: list[str]) -> None:
    """Install the manifest's whole weight history in ``stream`` (item weights as recorded, bit for bit),
    so that every later change lands at the position the manifest records."""
    gbi = stream.global_batch_items
    now = time.time()
    state = stream.state_dict()
    state["history"] = [
        {
            "version": int(h["version"]),
            "batch": int(h["position"]) // gbi,
            "position": int(h["position"]),
            "weights": [float(w) for w in h["weights"]],
            "requested": h.get("requested") or {n: float(w) for n, w in zip(names, h["weights"])},
            "units": h.get("units") or m["weight_units"],
            "time": now,
        }
        for h in m["history"]
    ]
    stream.load_state_dict(state)
