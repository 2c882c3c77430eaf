"""`MixtureStream`: a torch IterableDataset serving a deterministic mixture under live weights.

Design problem: a training job wants a mixture of sharded sources whose weights may change while
it runs, served identically whatever the number of DataLoader workers, ranks or prefetch depth,
and resumable exactly from a small checkpoint.

Solution: every batch is computed from a pure plan (:mod:`fastmix_data.plan`): global batch g on
rank r holds global item positions [g*B*R + r*B, g*B*R + (r+1)*B). Worker w of W produces batches
start + w, start + w + W, ... (the order in which a DataLoader collects them). Weight changes enter
the plan's history at a global batch that no worker on any rank has started yet (the weight channel
agrees on it), so content never depends on timing. The state is the history plus the next batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fastmix_data.errors import StateError, WeightsError
from fastmix_data.plan.planner import Exhaustion, MixturePlan, PlanSlice, WeightChange, probe_seed
from fastmix_data.plan.weights import UNITS, normalize_weights, to_item_units
from fastmix_data.sources import open_source
from fastmix_data.sources.base import Source
from fastmix_data.stream.channel import WeightChannel
from fastmix_data.stream.distributed import agree_max, broadcast_floats, rank_and_world, worker_and_count
from fastmix_data.stream.items import ItemSource
from fastmix_data.stream.tokenize import as_tokenizer

log = logging.getLogger(__name__)

STATE_FORMAT = "fastmix_data/stream-state"
STATE_VERSION = 1
PLAN_AHEAD = 64  # global batches planned per call of the planner


def _open_all(sources: Mapping[str, Any], **opts) -> list[Source]:
    out = []
    for name, spec in sources.items():
        if isinstance(spec, Source) and not isinstance(spec, (str, list, dict)):
            out.append(spec)
            continue
        kw = dict(opts)
        if isinstance(spec, Mapping):
            kw.update({k: v for k, v in spec.items() if k != "path"})
            spec = spec["path"]
        out.append(open_source(name, spec, **kw))
    return out


def _exhaustion(spec: Any, name: str) -> Exhaustion:
    if spec is None:
        return Exhaustion()
    if isinstance(spec, Exhaustion):
        return spec
    if isinstance(spec, str):
        return Exhaustion(spec)
    if isinstance(spec, Mapping):
        return Exhaustion(spec.get("policy", "repeat"), spec.get("max_epochs"))
    raise ValueError(f"source {name!r}: exhaustion must be a policy name or {{'policy':..,'max_epochs':..}}, got {spec!r}")


class MixtureStream(torch.utils.data.IterableDataset):
    """A deterministic, resumable mixture of sharded sources under live weights.

    Args:
        sources: {name: directory | glob | list of shard paths | {"path": ..., reader options} | Source}.
        weights: {name: weight} for every source (normalised; 0 excludes a source).
        batch_size: items per batch per rank (samples, or packed sequences in packing mode).
        seed: seeds every shuffle and the packing order; the stream is a pure function of it.
        seq_len: packing mode when set: items are ``seq_len + 1`` tokens from one source.
        weight_units: "samples" (default) or "tokens" (exact in packing mode; in sample mode
            converted with each source's mean tokens per sample from the shard index).
        exhaustion: {name: "repeat" | "cap" | "drop" | "stop" | {"policy", "max_epochs"}}.
        shuffle: shuffle shard order per epoch and items within shards (default True).
        tokenizer: packing-mode tokenizer for text columns: None (bytes), or any callable/tokenizer.
        eos_id: end-of-document id appended by a user tokenizer (the byte tokenizer uses 256).
        rank, world_size: override torch.distributed / RANK, WORLD_SIZE detection.
        max_items: total items (over all ranks) the stream serves, then it ends (a budget).
        source_options: reader options for every source (text_field, ids_field, on_corrupt, ...).
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        weights: Mapping[str, float] | Sequence[float],
        batch_size: int,
        seed: int = 0,
        *,
        seq_len: int | None = None,
        weight_units: str = "samples",
        exhaustion: Mapping[str, Any] | None = None,
        shuffle: bool = True,
        tokenizer: Any = None,
        eos_id: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        cache_shards: int = 2,
        max_items: int | None = None,
        **source_options: Any,
    ):
        super().__init__()
        if not sources:
            raise WeightsError("a MixtureStream needs at least one source")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len is not None and seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if weight_units not in UNITS:
            raise WeightsError(f"unknown weight_units {weight_units!r}; use one of {UNITS}")
        exhaustion = dict(exhaustion or {})
        unknown = sorted(set(exhaustion) - set(sources))
        if unknown:
            raise WeightsError(f"exhaustion names unknown sources {unknown}; sources are {list(sources)}")
        self.names = list(sources)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.seq_len = seq_len
        self.weight_units = weight_units
        self.shuffle = shuffle
        self.tokenizer = as_tokenizer(tokenizer, eos_id)
        detected = rank_and_world()
        self.rank = detected[0] if rank is None else int(rank)
        self.world_size = detected[1] if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.sources = _open_all(sources, **source_options)
        self.items = [ItemSource(s, self.seed, seq_len, self.tokenizer, cache_shards, shuffle) for s in self.sources]
        self.tokens_per_item = np.array([it.mean_tokens_per_item() for it in self.items])
        self.policies = [_exhaustion(exhaustion.get(n), n) for n in self.names]
        requested = normalize_weights(weights, self.names)
        first = self._history_entry(0, 0, requested, time.time())
        self.plan = MixturePlan(
            self.names, [it.items_per_shard for it in self.items], self.seed, [], self.policies, shuffle, max_items
        )
        self._set_history([first])
        self.probes: list[dict] = []
        self._next_batch = 0
        self._cursor: dict | None = None
        self._resume_cursor: dict | None = None
        self._observed: dict[int, float] = {}
        self._tokens_observed = np.zeros(len(self.names), dtype=np.int64)
        self._samples_observed = np.zeros(len(self.names), dtype=np.int64)
        self.channel = WeightChannel(self.history, first_batch=0)

    # ------------------------------------------------------------------------------ basics
    @property
    def source_names(self) -> list[str]:
        return list(self.names)

    @property
    def global_batch_items(self) -> int:
        """Items per global batch (batch_size * world_size)."""
        return self.batch_size * self.world_size

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.tokenizer, "vocab_size", None)

    def _history_entry(self, version: int, batch: int, requested: np.ndarray, t: float) -> dict:
        item_w = to_item_units(requested, self.weight_units, self.tokens_per_item)
        return {
            "version": version,
            "batch": batch,
            "position": batch * self.global_batch_items,
            "weights": [float(x) for x in item_w],
            "requested": {n: float(x) for n, x in zip(self.names, requested)},
            "units": self.weight_units,
            "time": t,
        }

    def _set_history(self, history: list[dict]) -> None:
        self.history = [dict(h) for h in history]
        self.plan.with_history([WeightChange(h["version"], h["position"], tuple(h["weights"])) for h in self.history])

    def _sync_history(self) -> None:
        _, history = self.channel._read_history()
        if len(history) != len(self.history) or history[-1]["version"] != self.history[-1]["version"]:
            self._set_history(history)

    def fingerprint(self) -> str:
        """Hex digest of everything that determines the stream's content (not its weights)."""
        return hashlib.sha256(json.dumps(self._config_summary(), sort_keys=True).encode()).hexdigest()

    def _config_summary(self) -> dict:
        return {
            "sources": [{"name": s.name, "format": s.format, "fingerprint": s.fingerprint()} for s in self.sources],
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "tokenizer": self.tokenizer.fingerprint(),
            "weight_units": self.weight_units,
            "shuffle": self.shuffle,
            "exhaustion": [[p.policy, p.max_epochs] for p in self.policies],
            "max_items": self.plan.limit,
        }

    # ------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_and_count()
        cursor = self._resume_cursor
        if cursor and cursor.get("worker") == worker and cursor.get("num_workers") == workers:
            g = int(cursor["next"])
        else:
            g = self._next_batch + worker
        self._resume_cursor = None
        in_main = torch.utils.data.get_worker_info() is None
        chunk = None  # (first position, end position, PlanSlice) of planned-ahead global batches
        while True:
            changed = self.channel.claim(g)
            if changed is not None:
                self._set_history(changed)
                chunk = None
            n0 = g * self.global_batch_items + self.rank * self.batch_size
            if chunk is None or not chunk[0] <= n0 < chunk[1] - self.batch_size + 1:
                chunk = self._plan_chunk(g)
            sl = _slice(chunk[2], n0 - chunk[0], self.batch_size)
            if len(sl.position) < self.batch_size:
                return
            batch = self._materialise(sl, g)
            self._cursor = {"next": g + workers, "worker": worker, "num_workers": workers}
            if in_main:
                self._observe(batch)
            g += workers
            yield batch

    def _plan_chunk(self, g: int) -> tuple[int, int, PlanSlice]:
        """Plan PLAN_AHEAD global batches from batch g at once (planning has a fixed cost per call).

        Planned-ahead batches stay valid because a weight change only ever takes effect after every
        batch claimed so far, and a change seen at claim time drops the chunk."""
        start = g * self.global_batch_items
        end = start + PLAN_AHEAD * self.global_batch_items
        return start, end, self.plan.plan(start, end)

    def _materialise(self, sl: PlanSlice, batch_index: int) -> dict:
        n = len(sl.position)
        # The per-item integers are rows of ONE tensor: a DataLoader worker ships each tensor
        # storage through its own shared-memory segment (~0.4 ms each), views share one.
        meta = torch.empty((5, n), dtype=torch.int64)
        for row, values in enumerate((sl.source, sl.shard, sl.item, sl.epoch)):
            meta[row] = torch.from_numpy(values)
        out: dict[str, Any] = {
            "source": meta[0],
            "shard": meta[1],
            "item": meta[2],
            "epoch": meta[3],
            "num_tokens": meta[4],
            "batch_index": batch_index,
            "weight_version": int(sl.version.max()) if n else -1,
        }
        groups = _groups(sl)
        if self.seq_len is not None:
            tokens = np.empty((n, self.seq_len + 1), dtype=np.int64)
            starts = np.empty((n, self.seq_len + 1), dtype=bool)
            for (src, epoch, shard), idx in groups:
                tokens[idx], starts[idx] = self.items[src].sequences(epoch, shard, sl.item[idx])
            out["tokens"] = torch.from_numpy(tokens)
            out["doc_start"] = torch.from_numpy(starts)
            meta[4] = self.seq_len + 1
            return out
        texts: list | None = None
        ids: list | None = None
        extra: dict[str, list] = {}
        for (src, _epoch, shard), idx in groups:
            rows = self.items[src].rows(shard, sl.item[idx])
            if rows.texts is not None:
                texts = texts if texts is not None else [None] * n
                for i, t in zip(idx, rows.texts):
                    texts[i] = t
            if rows.ids is not None:
                ids = ids if ids is not None else [None] * n
                for i, t in zip(idx, rows.ids):
                    ids[i] = np.asarray(t, dtype=np.int64)
            for key, vals in rows.extra.items():
                col = extra.setdefault(key, [None] * n)
                for i, v in zip(idx, vals):
                    col[i] = v
        if texts is not None:
            out["text"] = texts
        if ids is not None:
            lengths = [len(x) for x in ids]
            # views of one flat tensor: one shared-memory segment per batch, not one per row
            out["input_ids"] = list(torch.from_numpy(np.concatenate(ids)).split(lengths))
            meta[4] = torch.tensor(lengths, dtype=torch.int64)
        out.update(extra)
        if ids is None and texts is not None:
            meta[4] = torch.tensor([0 if t is None else len(t.encode()) + 1 for t in texts], dtype=torch.int64)
        elif ids is None:
            meta[4] = 0
        return out

    # ------------------------------------------------------------------------------ live weights
    def set_weights(self, weights: Mapping[str, float] | Sequence[float]) -> int:
        """Change the mixture; return the global batch index from which it applies.

        The change applies at the first global batch that no worker on any rank has started
        (with a DataLoader: at most num_workers * prefetch_factor batches after the last one the
        training loop received). Under torch.distributed every rank must call this at the same
        point of its loop (it is a collective); rank 0's weights are used.

        Raises:
            WeightsError: NaN, negative, all zero, unknown or missing sources.
        """
        requested = normalize_weights(weights, self.names)
        started = self.channel.begin_change()
        try:
            effective = max(agree_max(started) + 1, agree_max(self._next_batch))
            requested = np.asarray(broadcast_floats([float(x) for x in requested]))
            self._sync_history()
            if effective < self.history[-1]["batch"]:
                effective = self.history[-1]["batch"]
            entry = self._history_entry(self.history[-1]["version"] + 1, effective, requested, time.time())
            history = [h for h in self.history if h["batch"] < effective] + [entry]
        except BaseException:
            self.channel.finish_change(self.history)
            raise
        self.channel.finish_change(history)
        self._set_history(history)
        log.info("weights v%d %s take effect at global batch %d", entry["version"], entry["requested"], effective)
        return effective

    @property
    def weights(self) -> dict[str, float]:
        """The latest requested weights (in ``weight_units``)."""
        self._sync_history()
        return dict(self.history[-1]["requested"])

    # ------------------------------------------------------------------------------ probes
    def probe(self, weights: Mapping[str, float] | Sequence[float], steps: int) -> Iterator[dict]:
        """Serve ``steps`` batches of a temporary mixture, in this process.

        The main stream's position and weight history are untouched: probe items are drawn from
        their own seeded order (so a probe never consumes the main stream's draws). Each probe is
        recorded in ``self.probes`` (id, weights, steps, the main batch it was taken at).
        """
        requested = normalize_weights(weights, self.names)
        item_w = to_item_units(requested, self.weight_units, self.tokens_per_item)
        probe_id = len(self.probes)
        self.probes.append(
            {"id": probe_id, "weights": [float(x) for x in requested], "steps": int(steps), "at_batch": self._next_batch}
        )
        plan = MixturePlan(
            self.names,
            [it.items_per_shard for it in self.items],
            probe_seed(self.seed, probe_id),
            [WeightChange(0, 0, tuple(item_w))],
            [Exhaustion() for _ in self.names],
            self.shuffle,
        )
        for step in range(int(steps)):
            sl = plan.plan(step * self.batch_size, (step + 1) * self.batch_size)
            batch = self._materialise(sl, step)
            batch["probe"] = probe_id
            yield batch

    # ------------------------------------------------------------------------------ consumption
    def _observe(self, batch: Mapping) -> None:
        g = int(batch["batch_index"])
        self._next_batch = max(self._next_batch, g + 1)
        version = int(batch["weight_version"])
        self._observed.setdefault(version, time.time())
        src = batch["source"].numpy()
        self._samples_observed += np.bincount(src, minlength=len(self.names))
        self._tokens_observed += np.bincount(src, weights=batch["num_tokens"].numpy(), minlength=len(self.names)).astype(
            np.int64
        )

    def observe(self, batch: Mapping) -> None:
        """Record that the training loop received ``batch`` (done for you by `loader()` and with
        num_workers=0). Feeds `state_dict()` (next batch) and `stats()` (latency, tokens)."""
        self._observe(batch)

    def loader(self, **dataloader_kwargs) -> TrackedLoader:
        """A torch DataLoader over this stream that reports consumed batches back to it.

        The fast path with workers: batches cross the process boundary as numpy arrays (pickled
        inline) and become tensors in this process; a worker returning tensors pays one
        shared-memory segment per tensor storage (~1 ms per batch here)."""
        dataloader_kwargs.setdefault("batch_size", None)
        convert = dataloader_kwargs.get("num_workers", 0) > 0 and "collate_fn" not in dataloader_kwargs
        if convert:
            dataloader_kwargs["collate_fn"] = _numpy_batch
        return TrackedLoader(self, torch.utils.data.DataLoader(self, **dataloader_kwargs), to_tensors=convert)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Small JSON state: format version, fingerprint, next batch, weight history, probes."""
        if torch.utils.data.get_worker_info() is None:
            self._sync_history()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "config": self._config_summary(),
            "next_batch": self._next_batch,
            "cursor": self._cursor if torch.utils.data.get_worker_info() is not None else None,
            "history": [dict(h) for h in self.history],
            "probes": [dict(p) for p in self.probes],
        }

    def load_state_dict(self, state: Mapping, *, allow_fingerprint_mismatch: bool = False) -> None:
        """Continue exactly after the state's last consumed batch (O(#shards + #weight changes)).

        Raises:
            StateError: not a stream state, an unknown version, or a fingerprint that differs from
                this stream's (different sources, shards, seed, batch layout...) unless
                ``allow_fingerprint_mismatch``.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise StateError(f"not a fastmix_data stream state (format {state.get('format') if isinstance(state, Mapping) else type(state)!r})")
        if state.get("version") != STATE_VERSION:
            raise StateError(f"stream state version {state.get('version')!r} is not supported (this build reads {STATE_VERSION})")
        if state["fingerprint"] != self.fingerprint() and not allow_fingerprint_mismatch:
            diff = _diff(state.get("config", {}), self._config_summary())
            raise StateError(
                "the saved stream state was made for a different stream; resuming would not continue the "
                f"same sequence. Differences (saved -> now): {diff}. Pass allow_fingerprint_mismatch=True "
                "to resume anyway."
            )
        history = state["history"]
        if any(len(h["weights"]) != len(self.names) for h in history):
            raise StateError(f"the state's weight history has vectors for a different number of sources than {self.names}")
        self._set_history(history)
        self.probes = [dict(p) for p in state.get("probes", [])]
        self._next_batch = int(state["next_batch"])
        self._resume_cursor = state.get("cursor")
        if torch.utils.data.get_worker_info() is None:
            self.channel.reset(self.history, self._next_batch)
        else:
            self.channel.adopt(self.history)

    # ------------------------------------------------------------------------------ telemetry
    def stats(self) -> dict:
        """Requested vs realised share per source over the consumed batches, and more.

        Returns a dict with, per source: requested and realised shares in samples and tokens,
        samples and tokens served, epochs completed; plus the weight-update latency per change
        (in batches, and seconds until the first batch with the new version was received).
        """
        if torch.utils.data.get_worker_info() is None:
            self._sync_history()
        end = self._next_batch * self.global_batch_items
        realised = self.plan.draws_before(end).astype(np.float64)
        requested = np.zeros(len(self.names))
        for seg in self.plan.segments():
            hi = end if seg.end is None else min(end, seg.end)
            if hi > seg.start:
                requested += seg.weights * (hi - seg.start)
        total = max(realised.sum(), 1.0)
        tok_req = requested * self.tokens_per_item
        tok_real = realised * self.tokens_per_item
        per_source = {}
        for i, name in enumerate(self.names):
            per_source[name] = {
                "requested_share": requested[i] / total,
                "realised_share": realised[i] / total,
                "requested_token_share": tok_req[i] / max(tok_req.sum(), 1.0),
                "realised_token_share": tok_real[i] / max(tok_real.sum(), 1.0),
                "samples": int(realised[i]),
                "tokens_estimated": float(tok_real[i]),
                "samples_received": int(self._samples_observed[i]),
                "tokens_received": int(self._tokens_observed[i]),
                "epochs": float(realised[i] / max(int(self.plan.totals[i]), 1)),
                "skipped_shards": [list(x) for x in getattr(self.sources[i], "skipped", [])],
            }
        latency = []
        for h in self.history[1:]:
            seen = self._observed.get(h["version"])
            latency.append(
                {
                    "version": h["version"],
                    "effective_batch": h["batch"],
                    "latency_seconds": None if seen is None else max(0.0, seen - h["time"]),
                }
            )
        return {
            "batches": self._next_batch,
            "items": int(realised.sum()),
            "max_abs_count_deviation": float(np.abs(realised - requested).max()) if end else 0.0,
            "sources": per_source,
            "weight_updates": latency,
            "ended_at": self.plan.end,
        }

    def manifest_plan(self) -> MixturePlan:
        """The pure plan behind this stream (for exporters)."""
        if torch.utils.data.get_worker_info() is None:
            self._sync_history()
        return self.plan


class TrackedLoader:
    """Iterates a DataLoader and reports each received batch to its stream (`MixtureStream.observe`)."""

    def __init__(self, stream: MixtureStream, loader: torch.utils.data.DataLoader, to_tensors: bool = False):
        self.stream = stream
        self.loader = loader
        self.to_tensors = to_tensors

    def __iter__(self):
        for batch in self.loader:
            if self.to_tensors:
                batch = _tensor_batch(batch)
            if self.loader.num_workers > 0:
                self.stream._observe(batch)
            yield batch


_ARRAY_KEYS = ("source", "shard", "item", "epoch", "num_tokens", "tokens", "doc_start", "input_ids")


def _numpy_batch(batch: dict) -> dict:
    """In a worker: the batch's tensors as numpy arrays (see `MixtureStream.loader`)."""
    out = dict(batch)
    for key in _ARRAY_KEYS:
        v = out.get(key)
        if isinstance(v, torch.Tensor):
            out[key] = v.numpy()
        elif isinstance(v, list):
            out[key] = [x.numpy() for x in v]
    return out


def _tensor_batch(batch: dict) -> dict:
    """In the training process: the inverse of `_numpy_batch`."""
    out = dict(batch)
    for key in _ARRAY_KEYS:
        v = out.get(key)
        if isinstance(v, np.ndarray):
            out[key] = torch.from_numpy(v)
        elif isinstance(v, list):
            out[key] = [torch.from_numpy(x) for x in v]
    return out


def _slice(sl: PlanSlice, offset: int, n: int) -> PlanSlice:
    """Positions [offset, offset + n) of a planned chunk."""
    end = offset + n
    return PlanSlice(sl.position[offset:end], sl.source[offset:end], sl.draw[offset:end], sl.epoch[offset:end],
                     sl.shard[offset:end], sl.item[offset:end], sl.version[offset:end], ended=sl.ended)


def _groups(sl: PlanSlice):
    """Positions grouped by (source, epoch, shard): one int64 key per position, sorted once."""
    key = (sl.source << 52) | (sl.epoch << 32) | sl.shard  # sources < 2^11, epochs < 2^20, shards < 2^32
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    cuts = np.flatnonzero(np.diff(sorted_key)) + 1
    for idx in np.split(order, cuts):
        k = int(key[idx[0]])
        yield (k >> 52, (k >> 32) & 0xFFFFF, k & 0xFFFFFFFF), idx


def _diff(saved: Mapping, now: Mapping) -> str:
    parts = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            parts.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return "; ".join(parts) if parts else "(configuration identical; shard contents differ)"
