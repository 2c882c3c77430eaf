"""The shard-sampling manifest: what a mixture serves, per shard, computed from the plan alone.

Design problem: a team wants to know (or hand to another trainer) exactly which shards a mixture
uses, how much of each and how often, for a budget of billions of tokens over thousands of shards,
without reading the shards and without replaying billions of positions.

Solution: the plan numbers each source's draws across the whole weight history, so the first n
positions use draws 0..D_k-1 of source k, where D_k = ``plan.draws_before(n)`` costs
O(#segments * K log K). Draws run through whole shuffled epochs, so D_k // N_k full epochs take every
item once and the last, partial epoch takes the first D_k % N_k items in that epoch's shard order:
every shard's take follows in O(#partitions x #changes + #pieces) (``MixturePlan.shard_takes``). Only the cached shard index is read (rows,
tokens, bytes, sha256). The format is documented in docs/manifest.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastmix_data.errors import ManifestError, WeightsError
from fastmix_data.export._util import canonical_json, join_inside, parse_budget, relative_inside
from fastmix_data.export.manifest_check import check_counts, check_fields
from fastmix_data.io import sha256_file, write_json_atomic
from fastmix_data.plan.planner import Exhaustion, MixturePlan, WeightChange
from fastmix_data.plan.weights import check_item_weights, normalize_weights, normalized, to_item_units
from fastmix_data.sources.base import Source
from fastmix_data.sources.safety import is_pipe
from fastmix_data.spec import MixtureSpec, open_sources
from fastmix_data.storage import is_url, redact

FORMAT = "fastmix_data/manifest"
VERSION = 1
VERIFY = ("none", "size", "sha256")

_TOP_FIELDS = (
    "format", "version", "fingerprint", "root", "seed", "shuffle", "mode", "weight_units", "budget",
    "weights", "history", "sources",
)  # fmt: skip
_SOURCE_FIELDS = ("name", "format", "reader", "columns", "exhaustion", "shards")
_SHARD_FIELDS = ("path", "rows", "tokens", "bytes", "sha256", "items", "take", "take_tokens", "epochs")
_HISTORY_FIELDS = ("version", "position", "weights")


# --------------------------------------------------------------------------------------- fingerprint
def fingerprint_core(manifest: Mapping[str, Any]) -> dict:
    """Everything that determines the plan, in canonical form (what the fingerprint hashes)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "seed": int(manifest["seed"]),
        "shuffle": bool(manifest["shuffle"]),
        "mode": _mode_core(manifest["mode"]),
        "limit": int(manifest["budget"]["items"]),
        "history": [[int(h["position"]), [float(w) for w in h["weights"]]] for h in manifest["history"]],
        **({"partitions": _partitions_core(manifest["partitions"])} if manifest.get("partitions") else {}),
        "sources": [
            {
                "name": s["name"],
                "format": s["format"],
                "columns": s["columns"],
                "exhaustion": s["exhaustion"],
                "shards": [
                    [
                        sh["path"],
                        int(sh["rows"]),
                        sh["tokens"],
                        int(sh["bytes"]),
                        sh["sha256"],
                        int(sh["items"]),
                    ]
                    for sh in s["shards"]
                ],
            }
            for s in manifest["sources"]
        ],
    }


def _mode_core(mode: Mapping[str, Any]) -> dict:
    # The tokenizer decides packed sequences; in sample mode items are rows whatever the tokenizer.
    if mode.get("kind") == "packing":
        core = {"kind": "packing", "seq_len": int(mode["seq_len"]), "tokenizer": mode.get("tokenizer")}
        if mode.get("ids_eos_id") is not None:
            core["ids_eos_id"] = int(mode["ids_eos_id"])
        return core
    return {"kind": mode.get("kind")}


def _partitions_core(parts: Mapping[str, Any]) -> dict:
    return {
        "count": int(parts["count"]),
        "chunk": int(parts["chunk"]),
        "slices": [[[[int(x) for x in piece] for piece in sl] for sl in src] for src in parts["slices"]],
    }


def plan_fingerprint(manifest: Mapping[str, Any]) -> str:
    """Hex sha256 of :func:`fingerprint_core` (the root and the requested weights are not part of it)."""
    return hashlib.sha256(canonical_json(fingerprint_core(manifest))).hexdigest()


# --------------------------------------------------------------------------------------- building
def _open_sources(sources: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[list[Source], list[dict]]:
    """The opened sources (`spec.open_sources`) and the reader options the manifest records."""
    opened, used = open_sources(sources, options, ManifestError)
    reader_opts = [
        _reader_options_of(src) if kw is None else {
            "text_field": kw.get("text_field", "text"),
            "ids_field": kw.get("ids_field", "input_ids"),
            "extra_fields": list(kw.get("extra_fields", ())),
            **({"format": kw["format"]} if kw.get("format") else {}),
        }
        for src, kw in zip(opened, used)
    ]  # fmt: skip
    return opened, reader_opts


def _check_local(sources: Sequence[Source]) -> None:
    """Refuse sources whose shards are not local files (pipe: commands, URLs): a manifest lists paths
    under its root."""
    for src in sources:
        pipes = [s.path for s in src.shards if is_pipe(s.path) or is_url(s.path)]
        if pipes:
            raise ManifestError(
                f"source {src.name!r} reads {redact(pipes[0])}, which is not a local file; manifests list "
                "local files only (download the shards, or open them from local disk)"
            )


def _history(
    names: list[str], weights: Any, history: Sequence[Any] | None, units: str, tpi: np.ndarray
) -> list[dict]:
    """Version-0 weights plus later changes, as manifest history entries (item-unit weights)."""

    def entry(version: int, position: int, requested: np.ndarray | None, item_w: np.ndarray) -> dict:
        return {
            "version": version,
            "position": int(position),
            "weights": [float(x) for x in item_w],
            "requested": None if requested is None else {n: float(x) for n, x in zip(names, requested)},
            "units": units,
        }

    def convert(change: Any, version: int) -> dict:
        where = f"history entry at position {_position(change)}"
        if isinstance(change, WeightChange):
            w = np.asarray(check_item_weights(list(change.weights), names, where), dtype=np.float64)
            return entry(version, change.position, None, normalized(w, where))
        if "requested" in change and change["requested"] is not None:  # a stream-state history entry
            item_w = np.asarray(check_item_weights(change["weights"], names, f"{where}: weights"))
            return entry(version, change["position"], normalize_weights(change["requested"], names), item_w)
        req = normalize_weights(change["weights"], names)
        return entry(version, change["position"], req, to_item_units(req, units, tpi))

    changes = list(history or [])
    out: list[dict] = []
    if not changes or int(_position(changes[0])) != 0:
        if weights is None:
            raise WeightsError("give weights (or a history whose first entry is at position 0)")
        req = normalize_weights(weights, names)
        out.append(entry(0, 0, req, to_item_units(req, units, tpi)))
    for change in changes:
        e = convert(change, len(out))
        if out and e["position"] <= out[-1]["position"]:
            raise WeightsError(
                f"weight history positions must increase: {e['position']} after {out[-1]['position']}"
            )
        out.append(e)
    return out


def _position(change: Any) -> int:
    """The item position of a history entry (a `WeightChange` or a mapping with position and weights)."""
    if isinstance(change, WeightChange):
        position = change.position
    elif not isinstance(change, Mapping) or "position" not in change or "weights" not in change:
        raise ManifestError(f"a weight history entry must have 'position' and 'weights', got {change!r}"[:300])
    else:
        position = change["position"]
    if not isinstance(position, (int, np.integer)) or isinstance(position, bool) or position < 0:
        raise ManifestError(f"weight history position {position!r} must be an integer >= 0")
    return int(position)


def _plan(names, items_per_shard, seed, history: list[dict], policies, shuffle, limit, parts=(1, 1, None)) -> MixturePlan:
    changes = [WeightChange(h["version"], h["position"], tuple(h["weights"])) for h in history]
    try:
        return MixturePlan(
            list(names), [list(x) for x in items_per_shard], seed, changes, list(policies), shuffle, limit,
            partitions=parts[0], chunk=parts[1], layouts=parts[2],
        )  # fmt: skip
    except ValueError as exc:
        raise ManifestError(str(exc)) from None


def _shard_token_rates(items: Sequence[Any], seq_len: int | None) -> list[np.ndarray]:
    """Per source and shard, tokens per item (exact in packing mode, the shard's mean otherwise)."""
    rates = []
    for it in items:
        sizes = np.asarray(it.items_per_shard, dtype=np.float64)
        if seq_len is not None:
            rates.append(np.full(len(sizes), float(seq_len + 1)))
        else:
            rates.append(
                np.where(sizes > 0, np.asarray(it.shard_tokens, dtype=np.float64) / np.maximum(sizes, 1), 0.0)
            )
    return rates


def _planned_tokens(plan: MixturePlan, rates: list[np.ndarray], n: int) -> float:
    return float(sum(take @ r for (take, _), r in zip(plan.shard_takes(n), rates)))


def _items_for_tokens(plan: MixturePlan, rates: list[np.ndarray], tokens: int) -> int:
    """Smallest n whose planned tokens (per shard: items taken times tokens per item) reach ``tokens``."""

    def reached(n: int) -> bool:
        return _planned_tokens(plan, rates, n) >= tokens

    plan.segments()
    top = max((float(r.max()) for r in rates if len(r)), default=0.0)
    hi = max(1, int(tokens / max(top, 1e-9)))
    while not reached(hi):
        if plan.end is not None and hi >= plan.end:
            return plan.end
        if hi > 1 << 62:
            raise ManifestError(f"a budget of {tokens} tokens cannot be reached: the sources hold no tokens")
        hi *= 2
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def build_manifest(
    sources: Mapping[str, Any],
    weights: Mapping[str, float] | Sequence[float] | None,
    budget: str | int = "1M_samples",
    *,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    seq_len: int | None = None,
    weight_units: str = "samples",
    exhaustion: Mapping[str, Any] | None = None,
    history: Sequence[Any] | None = None,
    shuffle: bool = True,
    tokenizer: Any = None,
    eos_id: int | None = None,
    engine: Any = "local",
    partitions: int = 1,
    batch_size: int | None = None,
    **source_options: Any,
) -> dict:
    """The manifest of a mixture over a budget, from the plan and the cached shard index only.

    Args:
        sources: {name: directory | glob | list of paths | {"path": ..., reader options} | Source}.
        weights: the initial mixture {name: weight} in ``weight_units`` (None when ``history``
            starts at position 0).
        budget: "10B_tokens", "1M_samples" ("sequences"/"items" are synonyms) or an int of items.
            A token budget becomes the smallest item count whose planned tokens reach it (exact in
            packing mode; with each source's mean tokens per sample in sample mode).
        root: directory that contains every shard; manifest paths are relative to it (default: the
            deepest common directory of all shards).
        seed, seq_len, weight_units, exhaustion, shuffle, tokenizer, eos_id: as for MixtureStream.
        history: later weight changes, each {"position": item position, "weights": {...}} in
            ``weight_units`` (or stream-state history entries, or `WeightChange` in item units); a
            first entry at position 0 replaces ``weights``.
        engine: where shards missing from the index cache are indexed: "local" (threads), "ray"
            (one Ray task per shard) or an engine object; the manifest is the same bytes either way.
        partitions, batch_size: the canonical partitions of the stream the manifest describes
            (default 1: none) and its per-rank batch size (or ``chunk_items``), which a partitioned
            plan needs (history positions must then be multiples of it).
        source_options: reader options for every source (text_field, ids_field, cache_dir, ...).

    Returns:
        The manifest dict (see docs/manifest.md); write it with :func:`write_manifest`.

    Raises:
        ManifestError: a shard outside ``root`` (or a symlink pointing outside), a pipe: source,
            a bad budget or exhaustion policy. WeightsError / SourceError as for MixtureStream.
    """
    spec = MixtureSpec(sources, seed, seq_len, weight_units, dict(exhaustion or {}), shuffle, tokenizer, eos_id,
                       partitions)  # fmt: skip
    spec.validate(ManifestError)
    units, amount = parse_budget(budget)
    opened, reader_opts = _open_sources(sources, dict(source_options, engine=engine))
    _check_local(opened)  # before sizing items (which may read shards)
    mixture = spec.open(cache_shards=1, sources=opened, error=ManifestError)
    items, names, tok = mixture.items, mixture.names, mixture.tokenizer
    if mixture.partitions > 1 and batch_size is None:
        raise ManifestError(
            f"partitions={partitions} needs batch_size= (the per-rank batch one partition serves); pass the "
            "stream's batch_size, or partitions=1"
        )
    parts = (mixture.partitions, int(batch_size or 1), [it.layout for it in items])
    tpi = mixture.tokens_per_item
    hist = _history(names, weights, history, weight_units, tpi)
    policies = mixture.policies
    per_shard = [it.items_per_shard for it in items]
    if units == "tokens":
        if seq_len is not None:
            limit = -(-amount // (seq_len + 1))
        else:
            plan = _plan(names, per_shard, seed, hist, policies, shuffle, None, parts)
            limit = _items_for_tokens(plan, _shard_token_rates(items, None), amount)
    else:
        limit = amount
    budget_info = {
        "requested": budget if isinstance(budget, str) else int(budget),
        "units": units,
        "amount": amount,
    }
    return assemble(
        opened, items, names, root=root, seed=seed, shuffle=shuffle, seq_len=seq_len,
        tokenizer=tok.fingerprint(), weight_units=weight_units, policies=policies, history=hist,
        limit=limit, budget=budget_info, reader_options=reader_opts, parts=parts, ids_eos_id=mixture.ids_eos,
        requested_partitions=partitions,
    )  # fmt: skip


def manifest_from_stream(stream: Any, batches_served: int | None = None, *, root: str | None = None) -> dict:
    """The manifest of what ``stream`` served in its first ``batches_served`` global batches.

    Args:
        stream: a MixtureStream (its sources, seed, history and policies are used as they are).
        batches_served: global batches (each ``batch_size * world_size`` items); default: the
            batches the stream has consumed (``stream.stats()["batches"]``).
        root: as for :func:`build_manifest`.
    """
    plan = stream.manifest_plan()
    if batches_served is None:
        batches_served = int(stream.stats()["batches"])
    if batches_served < 0:
        raise ManifestError(f"batches_served must be >= 0, got {batches_served}")
    limit = int(batches_served) * stream.global_batch_items
    plan.segments()
    if plan.end is not None:
        limit = min(limit, plan.end)
    history = [
        {k: h.get(k) for k in ("version", "position", "weights", "requested", "units")}
        for h in stream.history
    ]
    reader_opts = [_reader_options_of(s) for s in stream.sources]
    budget_info = {
        "requested": limit,
        "units": "items",
        "amount": limit,
        "served": {
            "batches": int(batches_served),
            "batch_size": stream.batch_size,
            "world_size": stream.world_size,
        },
    }
    return assemble(
        stream.sources, stream.items, stream.source_names, root=root, seed=stream.seed, shuffle=stream.shuffle,
        seq_len=stream.seq_len, tokenizer=stream.tokenizer.fingerprint(), weight_units=stream.weight_units,
        policies=stream.policies, history=history, limit=limit, budget=budget_info, reader_options=reader_opts,
        parts=(stream.mixture.partitions, stream.chunk_items, [it.layout for it in stream.items]),
        ids_eos_id=stream.mixture.ids_eos, requested_partitions=stream.partitions,
    )  # fmt: skip


def _reader_options_of(source: Source) -> dict:
    columns = getattr(source, "columns", None)
    if columns is None:
        return {}
    return {"text_field": columns.text, "ids_field": columns.ids, "extra_fields": list(columns.extra)}


def _columns_of(source: Source) -> dict:
    columns = getattr(source, "columns", None)
    if columns is None:
        raise ManifestError(
            f"source {source.name!r} does not say which columns it reads; open it with open_source"
        )
    return {"text": columns.text, "ids": columns.ids, "extra": list(columns.extra)}


def _source_entry(name: str, src: Source, it: Any, take_epochs: tuple, rate: np.ndarray, pol: Exhaustion,
                  reader: dict, root: str) -> tuple[dict, float]:
    """One source's manifest entry, its shards' takes included (``take_epochs``: items taken and epochs
    per shard; ``rate``: tokens per taken item per shard), and its unrounded token take."""
    take, epochs = take_epochs
    sizes = np.asarray(it.items_per_shard, dtype=np.int64)
    # packing: exact; samples: whole epochs exact, the partial epoch's share of a shard at its mean
    tok_take = take * rate
    resolved: dict = {}
    shards = [{"path": relative_inside(root, info.path, f"shard of source {src.name!r}", resolved),
               "rows": int(info.rows), "tokens": None if info.tokens is None else int(info.tokens),
               "bytes": int(info.bytes), "sha256": info.sha256, "items": int(sizes[i]), "take": int(take[i]),
               "take_tokens": int(round(float(tok_take[i]))), "epochs": int(epochs[i])}
              for i, info in enumerate(src.shards)]
    take_items, take_tokens = int(take.sum()), float(tok_take.sum())
    entry = {
        "name": name,
        "format": src.format,
        "reader": dict(reader),
        "columns": _columns_of(src),
        "exhaustion": {"policy": pol.policy, "max_epochs": pol.max_epochs},
        "rows": int(sum(s.rows for s in src.shards)),
        "tokens": int(np.asarray(it.shard_tokens, dtype=np.float64).sum()),
        "bytes": int(sum(s.bytes for s in src.shards)),
        "items": int(sizes.sum()),
        "take": take_items,
        "take_tokens": int(round(take_tokens)),
        "epochs": float(take_items / max(int(sizes.sum()), 1)),
        "shards": shards,
    }
    return entry, take_tokens


def _weights_entry(names: Sequence[str], history: list[dict], n: int, expected: np.ndarray, tpi: np.ndarray,
                   take_items: np.ndarray, take_tokens: np.ndarray) -> dict:
    """The manifest's ``weights``: what was requested (the history's last and first entries), and the
    item and token shares the plan expects (``expected`` items per source, ``tpi`` mean tokens per
    item) and realises (``take_items``, ``take_tokens``)."""
    total_tok = max(float(take_tokens.sum()), 1.0)
    exp_tok = expected * tpi
    return {
        "requested": history[-1]["requested"] if history[-1]["requested"] is not None else None,
        "initial": history[0]["requested"],
        "requested_items": {nm: float(x / max(n, 1)) for nm, x in zip(names, expected)},
        "requested_tokens": {nm: float(x / max(exp_tok.sum(), 1.0)) for nm, x in zip(names, exp_tok)},
        "realised_items": {nm: float(x / max(n, 1)) for nm, x in zip(names, take_items)},
        "realised_tokens": {nm: float(x / total_tok) for nm, x in zip(names, take_tokens)},
    }


def assemble(
    sources: Sequence[Source],
    items: Sequence[Any],
    names: Sequence[str],
    *,
    root: str | os.PathLike | None,
    seed: int,
    shuffle: bool,
    seq_len: int | None,
    tokenizer: str,
    weight_units: str,
    policies: Sequence[Exhaustion],
    history: list[dict],
    limit: int,
    budget: dict,
    reader_options: Sequence[dict],
    parts: tuple = (1, 1, None),
    ids_eos_id: int | None = None,
    requested_partitions: int = 1,
) -> dict:
    """Compute the manifest dict from opened sources, their item counts and the plan's inputs
    (``parts``: partitions, chunk and per-source layouts, as `MixturePlan` takes them)."""
    _check_local(sources)
    if root is None:
        dirs = [os.path.dirname(s.path) for src in sources for s in src.shards]
        root = os.path.commonpath(dirs)
    root = os.path.abspath(os.fspath(root))
    per_shard = [list(it.items_per_shard) for it in items]
    plan = _plan(names, per_shard, seed, history, policies, shuffle, int(limit), parts)
    plan.segments()
    n = int(plan.end if plan.end is not None else limit)
    takes = plan.shard_takes(n)
    tpi = np.array([it.mean_tokens_per_item() for it in items], dtype=np.float64)
    rates = _shard_token_rates(items, seq_len)
    out_sources, take_tokens = [], np.zeros(len(names), dtype=np.float64)
    for k, (src, it) in enumerate(zip(sources, items)):
        entry, take_tokens[k] = _source_entry(names[k], src, it, takes[k], rates[k], policies[k],
                                              reader_options[k], root)
        out_sources.append(entry)
    take_items = np.array([e["take"] for e in out_sources], dtype=np.int64)
    if int(take_items.sum()) != n:  # the closed form and the plan must agree; cheap to check
        raise ManifestError(f"internal error: shard takes sum to {int(take_items.sum())}, plan has {n} items")
    expected = plan.expected_before(n)
    budget = dict(budget)
    budget.update({"items": n, "tokens": int(round(take_tokens.sum())), "ended_early": bool(n < limit)})
    if n < limit:
        budget["limit_requested"] = int(limit)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": "",
        "root": root,
        "seed": int(seed),
        "shuffle": bool(shuffle),
        "mode": {"kind": "samples"}
        if seq_len is None
        else {"kind": "packing", "seq_len": int(seq_len), "tokenizer": tokenizer},
        "weight_units": weight_units,
        "budget": budget,
        "weights": _weights_entry(names, history, n, expected, tpi, take_items, take_tokens),
        "history": [dict(h) for h in history],
        "sources": out_sources,
    }
    if seq_len is None:
        manifest["mode"]["tokenizer"] = tokenizer
    elif ids_eos_id is not None:
        manifest["mode"]["ids_eos_id"] = int(ids_eos_id)
    if parts[0] > 1:
        manifest["partitions"] = {
            "count": int(parts[0]),
            "requested": int(requested_partitions),
            "chunk": int(parts[1]),
            "slices": [[[[p.shard, p.lo, p.hi] for p in sl] for sl in layout.slices] for layout in parts[2]],
        }
    manifest["fingerprint"] = plan_fingerprint(manifest)
    return manifest


# --------------------------------------------------------------------------------------- reading / writing
def write_manifest(manifest: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``manifest`` as JSON atomically (temporary file, fsync, rename)."""
    write_json_atomic(path, manifest)


def _require(obj: Any, fields: Sequence[str], where: str, missing: list[str]) -> bool:
    if not isinstance(obj, Mapping):
        missing.append(f"{where} (not an object)")
        return False
    missing.extend(f"{where}.{f}" if where else f for f in fields if f not in obj)
    return True


def validate_manifest(manifest: Any, *, root: str | None = None, verify: str = "size") -> dict:
    """Check a manifest dict: format, version, fields, names, paths, fingerprint, then the files.

    Args:
        root: use this root instead of the manifest's (a moved dataset); a relative manifest root
            is resolved by :func:`read_manifest` against the manifest file's directory.
        verify: "none" (structure only), "size" (every shard exists with its recorded size) or
            "sha256" (and its bytes hash to the recorded digest).

    Returns:
        The manifest (a shallow copy, with ``root`` resolved).

    Raises:
        ManifestError: naming the wrong version, the missing fields, unknown or duplicate sources,
            the escaping paths, or the shards whose size or checksum changed.
    """
    if verify not in VERIFY:
        raise ManifestError(f"verify={verify!r}; use one of {VERIFY}")
    if not isinstance(manifest, Mapping):
        raise ManifestError(f"a manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ManifestError(
            f"not a fastmix_data manifest (format {manifest.get('format')!r}, expected {FORMAT!r})"
        )
    if manifest.get("version") != VERSION:
        raise ManifestError(
            f"manifest version {manifest.get('version')!r} is not supported (this build reads version {VERSION}); "
            "regenerate it with this version of fastmix_data"
        )
    for key, kind in (
        ("sources", list),
        ("history", list),
        ("weights", Mapping),
        ("budget", Mapping),
        ("mode", Mapping),
    ):
        if key in manifest and not isinstance(manifest[key], kind):
            raise ManifestError(
                f"manifest field {key!r} must be a {'list' if kind is list else 'JSON object'}"
            )
    missing: list[str] = []
    _require(manifest, _TOP_FIELDS, "", missing)
    if isinstance(manifest.get("budget"), Mapping):
        _require(manifest["budget"], ("items", "tokens"), "budget", missing)
    if isinstance(manifest.get("weights"), Mapping):  # what the converters and resample read
        _require(manifest["weights"], ("realised_items", "realised_tokens"), "weights", missing)
    if isinstance(manifest.get("mode"), Mapping):
        _require(manifest["mode"], ("kind",), "mode", missing)
    for i, h in enumerate(manifest.get("history") or []):
        _require(h, _HISTORY_FIELDS, f"history[{i}]", missing)
    for i, src in enumerate(manifest.get("sources") or []):
        where = f"sources[{i}]" + (
            f"({src.get('name')})" if isinstance(src, Mapping) and "name" in src else ""
        )
        if _require(src, _SOURCE_FIELDS, where, missing):
            if not isinstance(src.get("shards", []), list):
                raise ManifestError(f"{where}.shards must be a list of shard records, got {src['shards']!r}"[:200])
            for j, sh in enumerate(src.get("shards") or []):
                _require(sh, _SHARD_FIELDS, f"{where}.shards[{j}]", missing)
    if missing:
        shown = ", ".join(missing[:20]) + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
        raise ManifestError(f"manifest is missing fields: {shown}")
    try:
        return _check_contents(manifest, root, verify)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, IndexError) as exc:
        raise ManifestError(f"manifest has a malformed field ({type(exc).__name__}: {exc})") from None


def _check_contents(manifest: Mapping[str, Any], root: str | None, verify: str) -> dict:
    """The manifest with its root made absolute, after checking its sources' names, every field, the
    fingerprint against the contents, the derived counts and (``verify``) the shards on disk."""
    if not isinstance(manifest["root"], str):
        raise ManifestError("manifest field 'root' must be a string")
    if not manifest["sources"]:
        raise ManifestError("manifest lists no sources")
    names = [s["name"] for s in manifest["sources"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ManifestError(f"manifest lists sources {dupes} more than once")
    check_fields(manifest)  # every field's type and range, whatever the fingerprint says
    if not manifest["history"] or int(manifest["history"][0]["position"]) != 0:
        raise ManifestError("manifest history must start with an entry at position 0")
    _check_names(manifest, names)
    out = dict(manifest)
    out["root"] = os.path.abspath(root if root is not None else manifest["root"])
    fp = plan_fingerprint(out)
    if fp != manifest["fingerprint"]:
        raise ManifestError(
            f"manifest fingerprint {manifest['fingerprint']!r} does not match its contents ({fp}); it was edited "
            "by hand or truncated — regenerate it rather than editing it"
        )
    check_counts(out)  # the derived counts (take, epochs, shares), which the fingerprint leaves out
    _check_shards(out, verify)
    return out


def _check_names(manifest: Mapping[str, Any], names: list[str]) -> None:
    """Every history entry and weights table names exactly the manifest's sources ``names``."""
    for i, h in enumerate(manifest["history"]):
        if len(h["weights"]) != len(names):
            raise ManifestError(f"history[{i}] has {len(h['weights'])} weights for sources {names}")
        if isinstance(h.get("requested"), Mapping) and set(h["requested"]) != set(names):
            extra = sorted(set(h["requested"]) - set(names))
            raise ManifestError(
                f"history[{i}].requested names unknown sources {extra} (sources: {names})"
                if extra
                else f"history[{i}].requested lacks sources {sorted(set(names) - set(h['requested']))}"
            )
    for key, value in manifest["weights"].items():
        if isinstance(value, Mapping):
            extra = sorted(set(value) - set(names))
            if extra:
                raise ManifestError(
                    f"weights.{key} names unknown sources {extra}; the manifest's sources are {names}"
                )


def _check_shards(manifest: Mapping[str, Any], verify: str) -> None:
    """Every shard path inside the root; with ``verify`` "size" or "sha256", each shard on disk as the
    manifest records it (all problems listed in one error, the first ten shown)."""
    problems: list[str] = []
    resolved: dict[str, str] = {}  # each directory resolved once (join_inside)
    for src in manifest["sources"]:
        for sh in src["shards"]:
            path = join_inside(manifest["root"], sh["path"], f"shard of source {src['name']!r}", resolved)
            if verify == "none":
                continue
            try:
                size = os.stat(path).st_size
            except OSError:
                problems.append(f"{path} (source {src['name']!r}) is missing")
                continue
            if size != sh["bytes"]:
                problems.append(
                    f"{path} (source {src['name']!r}) has {size} bytes, the manifest says {sh['bytes']}"
                )
            elif verify == "sha256" and sha256_file(path) != sh["sha256"]:
                problems.append(
                    f"{path} (source {src['name']!r}) has a different sha256 than the manifest records"
                )
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ManifestError(
            f"{len(problems)} shard(s) changed since the manifest was made: {shown}. Restore them, or "
            "regenerate the manifest"
        )


def read_manifest(path: str | os.PathLike, verify: str = "size", *, root: str | None = None) -> dict:
    """Load and validate a manifest file (see :func:`validate_manifest`).

    A relative ``root`` in the file is taken relative to the file's own directory.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from None
    if (
        root is None
        and isinstance(obj, Mapping)
        and isinstance(obj.get("root"), str)
        and not os.path.isabs(obj["root"])
    ):
        root = os.path.join(os.path.dirname(os.path.abspath(path)), obj["root"])
    try:
        return validate_manifest(obj, root=root, verify=verify)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None


def load_manifest(
    manifest: str | os.PathLike | Mapping, verify: str = "size", root: str | None = None
) -> dict:
    """A validated manifest from a path or a dict."""
    if isinstance(manifest, Mapping):
        return validate_manifest(manifest, root=root, verify=verify)
    return read_manifest(manifest, verify, root=root)


def summary(manifest: Mapping[str, Any]) -> str:
    """A short human-readable table of a manifest's composition."""
    b = manifest["budget"]
    lines = [
        f"manifest {manifest['fingerprint'][:12]}  items {b['items']:,}  tokens ~{b['tokens']:,}  "
        f"mode {manifest['mode']['kind']}  seed {manifest['seed']}",
        f"{'source':<16}{'shards':>8}{'take':>14}{'epochs':>9}{'item share':>12}{'token share':>13}",
    ]
    w = manifest["weights"]
    for s in manifest["sources"]:
        lines.append(
            f"{s['name']:<16}{len(s['shards']):>8}{s['take']:>14,}{s['epochs']:>9.2f}"
            f"{w['realised_items'][s['name']]:>12.4f}{w['realised_tokens'][s['name']]:>13.4f}"
        )
    return "\n".join(lines)


__all__ = [
    "FORMAT",
    "VERSION",
    "build_manifest",
    "load_manifest",
    "manifest_from_stream",
    "plan_fingerprint",
    "read_manifest",
    "summary",
    "validate_manifest",
    "write_manifest",
]
