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

import collections
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fastmix_data.errors import ConfigError, SourceError, StateError, WeightsError
from fastmix_data.plan.planner import Exhaustion, MixturePlan, PlanSlice, WeightChange, probe_seed
from fastmix_data.plan.weights import UNITS, normalize_weights, to_item_units
from fastmix_data.sources import check_options, open_source
from fastmix_data.sources.base import Source
from fastmix_data.storage.prefetch import prefetch_block
from fastmix_data.stream.batch_ring import RingReader, RingWriter, ring_directory
from fastmix_data.stream.channel import WeightChannel
from fastmix_data.stream.distributed import Coordinator, rank_and_world, stream_namespace, worker_and_count
from fastmix_data.stream.items import ItemSource, pick
from fastmix_data.stream.shared_shards import SharedShards
from fastmix_data.stream.state_check import changed_shards, check_state, shard_digests
from fastmix_data.stream.tokenize import as_tokenizer

log = logging.getLogger(__name__)

STATE_FORMAT = "fastmix_data/stream-state"
STATE_VERSION = 2  # 2: history entries of a following stream carry "publisher" (docs/stream.md)
READABLE_STATE_VERSIONS = (1, 2)
BLOCK_BATCHES = 128  # default: batches a worker plans and reads in one pass (sample mode; see docs/stream.md)
BLOCK_TOKENS = 1 << 22  # packing mode: a block holds at most this many tokens (32 MiB of int64)
FIRST_BLOCK_BATCHES = 2  # a worker's first block; each next one doubles up to block_batches (first batch sooner)
# Workers share decoded shards from this many on: with 2 the exchange costs about what it saves
# (benchmarks/results/mixer.md), with 4 it saves a fifth of the workers' CPU.
SHARE_MIN_WORKERS = 3


def _open_all(sources: Mapping[str, Any], **opts) -> list[Source]:
    out = []
    for name, spec in sources.items():
        if isinstance(spec, Source) and not isinstance(spec, (str, list, dict)):
            out.append(spec)
            continue
        kw = dict(opts)
        if isinstance(spec, Mapping):
            if "path" not in spec:
                raise SourceError(f"source {name!r}: a dict spec needs a 'path' (directory, glob or list)")
            kw.update({k: v for k, v in spec.items() if k != "path"})
            spec = spec["path"]
        check_options(name, kw)
        out.append(open_source(name, spec, **kw))
    return out


def _shared_shards(sources: Sequence[Source], items: Sequence[ItemSource]) -> SharedShards:
    """Slots for the workers' shared decoded shards, sized by the largest decoded shard (estimated
    from the index: text bytes, or 8 bytes per token id, plus offsets)."""
    largest = 1
    for source, item_source in zip(sources, items):
        per_token = 8 if item_source.has_ids else 1
        for info in source.shards:
            size = 16 * info.rows + (per_token * info.tokens if info.tokens is not None else 4 * info.bytes)
            largest = max(largest, size)
    return SharedShards.for_shards(largest, min_slots=4 * len(sources))


def _check_int(name: str, value: Any, lo: int, optional: bool = False) -> None:
    """Refuse a non-integer (bool, float, str) or too small stream argument, naming it."""
    if value is None and optional:
        return
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}{' or None' if optional else ''}, got {value!r}")


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
        cache_shards: decoded shards kept per source and process.
        block_batches: batches each worker plans and reads in one pass (per-batch work is then
            slicing). Default 128 in sample mode; in packing mode as many as hold 4M tokens (at most
            128). It never delays a weight change: batches are still claimed one at a time, and a
            change drops what was built ahead. A worker's first block is 2 batches, each next one
            twice the last up to ``block_batches``, so the first batch does not wait for a whole block.
        share_decoded: with ``SHARE_MIN_WORKERS`` (3) or more DataLoader workers, decode each
            shard once between them and pass it on through shared memory
            (:mod:`fastmix_data.stream.shared_shards`).
        follow: a URI or :class:`fastmix_data.live.Follow`: the weights come from a publisher
            (``WeightPublisher``, ``fastmix-data search --publish``), and every rank and worker
            switches at one recorded global batch without the training loop calling anything
            (docs/live.md). ``set_weights`` is then refused.
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
        block_batches: int | None = None,
        share_decoded: bool = True,
        follow: Any = None,
        **source_options: Any,
    ):
        super().__init__()
        if not isinstance(sources, Mapping) or not sources:
            raise WeightsError(f"a MixtureStream needs a mapping of at least one source, got {sources!r}"[:200])
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        _check_int("seq_len", seq_len, 1, optional=True)
        _check_int("block_batches", block_batches, 1, optional=True)
        _check_int("cache_shards", cache_shards, 1)
        _check_int("max_items", max_items, 1, optional=True)
        if block_batches is None:
            per_batch = batch_size * (1 if seq_len is None else seq_len + 1)
            block_batches = BLOCK_BATCHES if seq_len is None else max(1, min(BLOCK_BATCHES, BLOCK_TOKENS // per_batch))
        if weight_units not in UNITS:
            raise WeightsError(f"unknown weight_units {weight_units!r}; use one of {UNITS}")
        if exhaustion is not None and not isinstance(exhaustion, Mapping):
            raise ConfigError(f"exhaustion must be a mapping {{source: policy}}, got {exhaustion!r}"[:200])
        exhaustion = dict(exhaustion or {})
        unknown = sorted(set(exhaustion) - set(sources), key=str)
        if unknown:
            raise WeightsError(f"exhaustion names unknown sources {unknown}; sources are {list(sources)}")
        self.names = list(sources)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.seq_len = seq_len
        self.weight_units = weight_units
        self.shuffle = shuffle
        self.block_batches = int(block_batches)
        self._numpy_in_workers = False  # set by TrackedLoader while it starts its workers
        self._ring: tuple[str, int] | None = None  # (directory, slots): ditto, see batch_ring
        self._per_item = 1  # ditto: batches a loader() worker sends per DataLoader item
        self._ring_readers: list[RingReader] = []
        self.tokenizer = as_tokenizer(tokenizer, eos_id)
        detected = rank_and_world()
        _check_int("rank", rank, 0, optional=True)
        _check_int("world_size", world_size, 1, optional=True)
        self.rank = detected[0] if rank is None else int(rank)
        self.world_size = detected[1] if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.sources = _open_all(sources, **source_options)
        self.items = [ItemSource(s, self.seed, seq_len, self.tokenizer, cache_shards, shuffle) for s in self.sources]
        self.shared = _shared_shards(self.sources, self.items) if share_decoded else None
        self.tokens_per_item = np.array([it.mean_tokens_per_item() for it in self.items])
        self.policies = [Exhaustion.of(exhaustion.get(n), n, ConfigError) for n in self.names]
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
        self._weights_lock = threading.Lock()  # serialises set_weights calls from threads
        self._coordinator = Coordinator(self.rank, self.world_size, stream_namespace() if self.world_size > 1 else "")
        self.follower = None
        self.channel = WeightChannel(self.history, first_batch=0, gated=follow is not None)
        if follow is not None:
            from fastmix_data.live.follower import Follow, Follower

            self.follower = Follower(self, Follow.of(follow))

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
        return _config_digest(self._config_summary())

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
        packed_out = not in_main and self._numpy_in_workers  # loader() workers send packed numpy batches
        ring = RingWriter(self._ring[0], worker, self._ring[1]) if packed_out and self._ring else None
        if ring is not None and ring.mm is None:  # no usable shared memory: the pipe, as without one
            ring = None
        share = workers >= SHARE_MIN_WORKERS and not in_main
        for item_source in self.items:  # workers decode each shard once between them
            item_source.shared = self.shared if share else None
            item_source.raw_text = ring is not None and self.seq_len is None
        batches = self._batches(g, worker, workers, in_main, packed_out)
        try:
            if packed_out and self._per_item > 1:  # loader() workers: R of their batches per item
                while chunk := list(itertools.islice(batches, self._per_item)):
                    yield chunk if ring is None else [ring.send(b) for b in chunk]
            elif ring is not None:
                for batch in batches:
                    yield ring.send(batch)
            else:  # the training process and plain DataLoader workers: nothing added per batch
                yield from batches
        finally:
            if ring is not None:
                ring.close()

    def _batches(self, g: int, worker: int, workers: int, in_main: bool, packed_out: bool) -> Iterator[dict]:
        """Batches g, g + W, ... of worker ``worker`` of ``workers`` (packed when ``packed_out``)."""
        ahead: collections.deque[dict] = collections.deque()  # built batches g, g + W, ...
        block = min(FIRST_BLOCK_BATCHES, self.block_batches)
        while True:
            # Claim before serving: a change published since the last claim drops what was built
            # ahead with the old history (content is a function of the history, never of timing).
            changed = self.channel.claim(g)
            if changed is not None:
                self._set_history(changed)
                ahead.clear()
            if not ahead:
                indices = [g + j * workers for j in range(block)]
                block = min(2 * block, self.block_batches)
                sl = self._plan_block(indices)
                prefetch_block(self.sources, self.plan.orders, sl)  # remote sources: fetch this block's and the next shards
                whole = indices[: len(sl.position) // self.batch_size]
                ahead.extend(self._materialise(sl, whole, rotation=(worker, workers)))
                if not ahead:
                    return
            batch = ahead.popleft()
            self._cursor = {"next": g + workers, "worker": worker, "num_workers": workers}
            if not packed_out:
                batch, counts = _unpack(batch)
                if in_main:
                    self._count(g, batch["weight_version"], counts)
            g += workers
            yield batch

    def _plan_block(self, batch_indices: list[int]) -> PlanSlice:
        """The plan of this rank's part of global batches ``batch_indices`` (ascending), one call."""
        starts = [b * self.global_batch_items + self.rank * self.batch_size for b in batch_indices]
        return self.plan.plan_ranges(starts, self.batch_size)

    def _materialise(
        self, sl: PlanSlice, batch_indices: Sequence[int], rotation: tuple[int, int] = (0, 1)
    ) -> list[dict]:
        """Batches of ``batch_size`` consecutive items of ``sl``, one per batch index.

        Items are read grouped by (source, epoch, shard) over the whole block, so per-batch work is
        slicing. The batches are *packed* (numpy, the integer arrays in one ``_meta`` array): what a
        `loader()` worker sends, pickled inline; `_unpack` makes the user-facing tensor batch. Each
        batch owns its arrays, so a batch that crosses processes carries itself, not its block.
        Worker w of W (``rotation``) reads the block's shards starting w/W of the way through, so
        workers decode different shards at the same time (see `SharedShards`).
        """
        size = self.batch_size
        n = len(batch_indices) * size
        if n == 0:
            return []
        meta = np.empty((5, n), dtype=np.int64)  # source, shard, item, epoch, num_tokens
        meta[0], meta[1], meta[2], meta[3] = sl.source[:n], sl.shard[:n], sl.item[:n], sl.epoch[:n]
        version = sl.version[:n].reshape(-1, size).max(axis=1).tolist()
        order, groups = _groups(meta[0], meta[3], meta[1])
        first = rotation[0] * len(groups) // rotation[1]
        visit = list(range(first, len(groups))) + list(range(first))
        columns: dict[str, list] = {}
        if self.seq_len is not None:
            tokens = np.empty((n, self.seq_len + 1), dtype=np.int64)
            starts = np.empty((n, self.seq_len + 1), dtype=bool)
            for (src, epoch, shard), idx in (groups[i] for i in visit):
                tokens[idx], starts[idx] = self.items[src].sequences(epoch, shard, meta[2, idx])
            meta[4] = self.seq_len + 1
        else:
            gathered = {}
            for i in visit:
                (src, _epoch, shard), idx = groups[i]
                gathered[i] = (idx, self.items[src].gather(shard, meta[2, idx]))
            picked = [gathered[i] for i in range(len(groups))]
            for idx, rows in picked:
                meta[4, idx] = rows.tokens
            columns = _columns_in_order(picked, n, order)
        counts = _per_batch_counts(meta, size, len(self.names))
        out = []
        for j, g in enumerate(batch_indices):
            lo, hi = j * size, (j + 1) * size
            # Each batch owns its arrays (copies of its slice of the block).
            batch: dict[str, Any] = {
                "_meta": meta[:, lo:hi].copy(),
                "_counts": counts[j],
                "batch_index": g,
                "weight_version": version[j],
            }
            if self.seq_len is not None:
                batch["tokens"], batch["doc_start"] = tokens[lo:hi].copy(), starts[lo:hi].copy()
            for key, col in columns.items():
                batch[key] = col[lo:hi]
            if "input_ids" in batch:
                batch["_ids"] = _flat_rows(batch.pop("input_ids"))
            out.append(batch)
        return out

    # ------------------------------------------------------------------------------ live weights
    def set_weights(self, weights: Mapping[str, float] | Sequence[float]) -> int:
        """Change the mixture; return the global batch index from which it applies.

        The change applies at the first global batch that no worker on any rank has started
        (with a plain DataLoader: at most num_workers * prefetch_factor batches after the last one
        the training loop received; with `loader`, num_workers * R * (ceil(prefetch_factor / R) + 1)
        for R = batches_per_item, see docs/stream.md). Under torch.distributed every rank must call
        this at the same point of its loop (it is a collective, carried by the job's c10d store, never
        by the training's process group); rank 0's weights are used.

        Thread-safe: calls from several threads are serialised (each returns the batch from which
        its own weights apply; a later call that gets the same batch replaces the earlier one).

        Raises:
            WeightsError: NaN, negative, all zero, not numbers, unknown or missing sources; a following
                stream.
            CoordinationError: several ranks and no store to reach them (no process group, no torchrun).
        """
        requested = normalize_weights(weights, self.names)
        if self.channel.gated:
            raise WeightsError(
                "this stream follows published weights (follow=); publish the change instead "
                "(fastmix_data.live.WeightPublisher)"
            )
        with self._weights_lock:  # concurrent calls from threads: one change at a time
            return self._publish(requested)

    def _publish(self, requested: np.ndarray) -> int:
        """Publish one change through the weight channel (callers hold ``_weights_lock``)."""
        started = self.channel.begin_change()
        try:
            mine = {"started": started, "next": self._next_batch, "weights": [float(x) for x in requested]}
            agreed = self._coordinator.reduce(mine, _agree_change)
            effective, requested = agreed["effective"], np.asarray(agreed["weights"])
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
        for first in range(0, int(steps), self.block_batches):
            block = list(range(first, min(first + self.block_batches, int(steps))))
            sl = plan.plan(first * self.batch_size, (block[-1] + 1) * self.batch_size)
            for packed in self._materialise(sl, block):
                batch, _ = _unpack(packed)
                batch["probe"] = probe_id
                yield batch

    # ------------------------------------------------------------------------------ consumption
    def _observe(self, batch: Mapping) -> None:
        meta = np.stack([np.asarray(batch["source"]), np.asarray(batch["num_tokens"])])
        counts = _per_batch_counts(meta, meta.shape[1], len(self.names), tokens_row=1)[0]
        self._count(int(batch["batch_index"]), int(batch["weight_version"]), counts)

    def _count(self, g: int, version: int, counts: np.ndarray) -> None:
        """Record the consumption of batch g: its weight version, and ``counts`` (2, K) int64: per
        source, samples and tokens in the batch."""
        self._next_batch = max(self._next_batch, g + 1)
        if version not in self._observed:
            self._observed[version] = time.time()
        self._samples_observed += counts[0]
        self._tokens_observed += counts[1]

    def observe(self, batch: Mapping) -> None:
        """Record that the training loop received ``batch`` (done for you by `loader()` and with
        num_workers=0). Feeds `state_dict()` (next batch) and `stats()` (latency, tokens)."""
        self._observe(batch)

    def loader(
        self, *, shared_memory_batches: bool = True, batches_per_item: int = 2, **dataloader_kwargs
    ) -> TrackedLoader:
        """A torch DataLoader over this stream that reports consumed batches back to it.

        The fast path with workers: each worker sends ``batches_per_item`` of its batches per
        DataLoader item (the DataLoader's per-item work is then shared by them), as numpy arrays
        and UTF-8 bytes written to a ring of shared-memory slots (``shared_memory_batches``, see
        :mod:`fastmix_data.stream.batch_ring`; False: pickled through the DataLoader's pipe), and
        this process makes tensors and ``str`` and serves the batches in order. ``prefetch_factor``
        counts batches per worker, as for a plain DataLoader (it becomes
        ceil(prefetch_factor / batches_per_item) items). A plain ``DataLoader(stream,
        batch_size=None)`` also works (then call `observe` on each batch for telemetry): its
        workers return tensors, which cost a shared-memory segment per storage (~1 ms per batch on
        a small VM; benchmarks/results/mixer.md). As with a DataLoader, ``iter()`` of the result
        starts the workers."""
        if batches_per_item < 1:
            raise ConfigError(f"batches_per_item must be >= 1, got {batches_per_item}")
        dataloader_kwargs.setdefault("batch_size", None)
        workers = dataloader_kwargs.get("num_workers", 0)
        convert = workers > 0 and "collate_fn" not in dataloader_kwargs
        if convert:
            dataloader_kwargs["collate_fn"] = _as_is
            prefetch = dataloader_kwargs.get("prefetch_factor") or 2  # the DataLoader's default
            dataloader_kwargs["prefetch_factor"] = -(-prefetch // batches_per_item)
        loader = torch.utils.data.DataLoader(self, **dataloader_kwargs)
        return TrackedLoader(
            self, loader, to_tensors=convert, use_ring=shared_memory_batches, per_item=batches_per_item
        )

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Small JSON state: format version, fingerprint, next batch, weight history, probes, and
        8 hex digits per shard (so that a refused resume names the shards that changed)."""
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
            "shards": shard_digests(self.sources),  # names the changed shards if a resume is refused
        }

    def load_state_dict(self, state: Mapping, *, allow_fingerprint_mismatch: bool = False) -> None:
        """Continue exactly after the state's last consumed batch (O(#shards + #weight changes)).

        Raises:
            StateError: not a stream state, an unknown version, a field missing, of the wrong type
                or out of range (named), or a fingerprint that differs from this stream's
                (different sources, shards, seed, batch layout...; the changed shards are named)
                unless ``allow_fingerprint_mismatch``.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise StateError(f"not a fastmix_data stream state (format {state.get('format') if isinstance(state, Mapping) else type(state)!r})")
        if state.get("version") not in READABLE_STATE_VERSIONS:
            raise StateError(f"stream state version {state.get('version')!r} is not supported (this build reads {READABLE_STATE_VERSIONS})")
        check_state(state, self.names, self.global_batch_items)  # every field, named when wrong
        if not allow_fingerprint_mismatch and "config" in state and state["fingerprint"] != _config_digest(state["config"]):
            raise StateError(
                "stream state field fingerprint does not match the state's own config: the state was edited "
                "or damaged; use an unmodified state"
            )
        if state["fingerprint"] != self.fingerprint() and not allow_fingerprint_mismatch:
            diff = _diff(state.get("config", {}), self._config_summary())
            shards = changed_shards(state.get("shards"), self.sources)
            raise StateError(
                "the saved stream state was made for a different stream; resuming would not continue the "
                f"same sequence. Differences (saved -> now): {diff}."
                + (f" Changed shards: {'; '.join(shards)}." if shards else "")
                + " Pass allow_fingerprint_mismatch=True to resume anyway."
            )
        history = state["history"]
        self._set_history(history)
        self.probes = [dict(p) for p in state.get("probes", [])]
        self._next_batch = int(state["next_batch"])
        self._resume_cursor = state.get("cursor")
        if torch.utils.data.get_worker_info() is None:
            self.channel.reset(self.history, self._next_batch)
            if self.follower is not None:
                self.follower.reset(self.history)
        else:
            self.channel.adopt(self.history)

    # ------------------------------------------------------------------------------ telemetry
    def stats(self) -> dict:
        """Requested vs realised share per source over the consumed batches, and more.

        Returns a dict with, per source: requested and realised shares in samples and tokens,
        samples and tokens served, epochs completed; plus the weight-update latency per change
        (in batches, and seconds until the first batch with the new version was received, from the
        decision and, for a followed change, from its publication); ``follow``: the follower's
        telemetry (docs/live.md), None when not following.
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
            published = (h.get("publisher") or {}).get("published")
            latency.append(
                {
                    "version": h["version"],
                    "effective_batch": h["batch"],
                    "latency_seconds": None if seen is None else max(0.0, seen - h["time"]),
                    "since_publish_seconds": None if seen is None or published is None else max(0.0, seen - published),
                }
            )
        return {
            "batches": self._next_batch,
            "items": int(realised.sum()),
            "max_abs_count_deviation": float(np.abs(realised - requested).max()) if end else 0.0,
            "sources": per_source,
            "weight_updates": latency,
            "ended_at": self.plan.end,
            "follow": self.follower.stats() if self.follower is not None else None,
        }

    def close(self) -> None:
        """Remove the stream's temporary files (weight channel, shared decoded shards) now rather
        than at interpreter exit. The stream cannot serve DataLoader workers afterwards."""
        if self.follower is not None:
            self.follower.close()
        self.channel.close()
        if self.shared is not None:
            self.shared.close()
        for reader in self._ring_readers:
            reader.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ring_readers"] = []  # training-process side only (open maps)
        del state["_weights_lock"]
        state["follower"] = None  # ditto (threads, store connections); workers follow through the channel
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._weights_lock = threading.Lock()

    def manifest_plan(self) -> MixturePlan:
        """The pure plan behind this stream (for exporters)."""
        if torch.utils.data.get_worker_info() is None:
            self._sync_history()
        return self.plan


class TrackedLoader:
    """Iterates a DataLoader and reports each received batch to its stream (`MixtureStream.observe`)."""

    def __init__(
        self,
        stream: MixtureStream,
        loader: torch.utils.data.DataLoader,
        to_tensors: bool = False,
        use_ring: bool = True,
        per_item: int = 1,
    ):
        self.per_item = int(per_item)
        self.stream = stream
        self.loader = loader
        self.to_tensors = to_tensors
        self.ring = RingReader(ring_directory()) if to_tensors and use_ring else None
        if self.ring is not None:
            stream._ring_readers.append(self.ring)

    def __iter__(self):
        """Start the workers now, as ``iter(DataLoader)`` does, and return the batches' iterator."""
        # read by the workers started by iter() (persistent workers keep what they saw first)
        per_item = self.per_item if self.to_tensors else 1
        self.stream._numpy_in_workers = self.to_tensors
        self.stream._per_item = per_item
        if self.ring is not None:
            self.stream._ring = (self.ring.directory, ((self.loader.prefetch_factor or 2) + 1) * per_item + 2)
        try:
            items = iter(self.loader)
        finally:
            self.stream._numpy_in_workers = False
            self.stream._per_item = 1
            self.stream._ring = None
        return self._serve(items, per_item)

    def _serve(self, items: Iterator, per_item: int) -> Iterator[dict]:
        if not self.to_tensors:
            for batch in items:
                if self.loader.num_workers > 0:
                    self.stream._observe(batch)
                yield batch
            return
        received: dict[int, dict] = {}  # by batch index, until every earlier batch was served
        expected = self.stream._next_batch  # worker w starts at this + w (unless resumed per worker)
        full_round = self.loader.num_workers * per_item
        for item in items:
            for packed in item if isinstance(item, list) else [item]:
                if self.ring is not None:
                    packed = self.ring.receive(packed)
                received[packed["batch_index"]] = packed
            if expected not in received and len(received) >= full_round:
                expected = min(received)  # a round from every worker is here: nothing earlier comes
            while expected in received:
                yield self._served(received.pop(expected))
                expected += 1
        for g in sorted(received):  # the stream ended: what is left, in order
            yield self._served(received.pop(g))

    def _served(self, packed: dict) -> dict:
        batch, counts = _unpack(packed)
        self.stream._count(batch["batch_index"], batch["weight_version"], counts)
        return batch


META_KEYS = ("source", "shard", "item", "epoch", "num_tokens")  # the rows of a packed batch's "_meta"


def _agree_change(payloads: list[dict]) -> dict:
    """Where a `set_weights` change applies, from every rank's claims and position, with rank 0's
    weights (run on rank 0 by `Coordinator.reduce`)."""
    return {
        "effective": max(max(p["started"] for p in payloads) + 1, max(p["next"] for p in payloads)),
        "weights": payloads[0]["weights"],
    }


def _as_is(batch: dict) -> dict:
    """collate_fn of `MixtureStream.loader` with workers: the worker's packed batch, unchanged."""
    return batch


def _unpack(packed: dict) -> tuple[dict, np.ndarray]:
    """A packed batch (see `MixtureStream._materialise`) as the user-facing batch of tensors, and its
    per-source counts (``_counts``, see `_per_batch_counts`). The integer rows are views of one
    tensor (one storage per batch)."""
    batch = dict(packed)
    meta = batch.pop("_meta")
    counts = batch.pop("_counts")
    batch.update(zip(META_KEYS, torch.from_numpy(meta).unbind(0)))
    for key in ("tokens", "doc_start"):
        if key in batch:
            batch[key] = torch.from_numpy(batch[key])
    if "_ids" in batch:
        flat, lengths = batch.pop("_ids")
        batch["input_ids"] = list(torch.from_numpy(flat).split(lengths.tolist()))
    return batch, counts


def _per_batch_counts(meta: np.ndarray, size: int, k: int, tokens_row: int = 4) -> np.ndarray:
    """int64 (batches, 2, k): per batch of ``size`` consecutive columns of ``meta`` and per source,
    the number of items and their tokens (row 0 of ``meta``: source ids, ``tokens_row``: tokens)."""
    nb = meta.shape[1] // size
    cell = meta[0, : nb * size] + k * np.repeat(np.arange(nb), size)
    samples = np.bincount(cell, minlength=nb * k).reshape(nb, k)
    tokens = np.bincount(cell, weights=meta[tokens_row, : nb * size], minlength=nb * k).reshape(nb, k)
    return np.stack([samples, tokens.astype(np.int64)], axis=1)


def _groups(source: np.ndarray, epoch: np.ndarray, shard: np.ndarray):
    """Positions grouped by (source, epoch, shard): (order, [((src, epoch, shard), positions)]).

    Groups come in the order of their first position, which is the order a source visits its
    shards, so a small LRU shard cache keeps the shard a block ends in for the next block; ``order``
    is the groups' positions concatenated. One int64 key per position, sorted once."""
    key = (source << 52) | (epoch << 32) | shard  # sources < 2^11, epochs < 2^20, shards < 2^32
    by_key = np.argsort(key, kind="stable")
    cuts = np.flatnonzero(np.diff(key[by_key])) + 1
    parts = np.split(by_key, cuts)
    parts.sort(key=lambda idx: int(idx[0]))
    groups = []
    for idx in parts:
        k = int(key[idx[0]])
        groups.append(((k >> 52, (k >> 32) & 0xFFFFF, k & 0xFFFFFFFF), idx))
    return np.concatenate(parts), groups


def _columns_in_order(picked: list, n: int, order: np.ndarray) -> dict[str, list]:
    """Per column, the gathered rows of every group put back in position order.

    ``picked`` holds (positions, Gathered) per group, groups in the order of ``order`` (the sorted
    positions), so concatenating the groups gives the values at order[0], order[1], ..."""
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    back = inverse.tolist()
    columns: dict[str, list] = {}
    for key, attr in (("text", "texts"), ("input_ids", "ids")):
        parts = [(idx, getattr(rows, attr)) for idx, rows in picked]
        if all(p is None for _, p in parts):
            continue
        # a source without the column contributes None for its rows
        flat = list(itertools.chain.from_iterable(p if p is not None else [None] * len(idx) for idx, p in parts))
        columns[key] = pick(flat, back)
    extra_keys = list(dict.fromkeys(k for _, rows in picked for k in rows.extra))
    for key in extra_keys:
        flat = list(itertools.chain.from_iterable(rows.extra.get(key, [None] * len(idx)) for idx, rows in picked))
        columns[key] = pick(flat, back)
    return columns


def _flat_rows(rows: list) -> tuple[np.ndarray, np.ndarray]:
    """A batch's ids rows as (one flat int64 array, row lengths); rows of sources without ids are
    empty."""
    rows = [np.zeros(0, dtype=np.int64) if r is None else r for r in rows]
    flat = np.concatenate(rows).astype(np.int64, copy=False) if rows else np.zeros(0, dtype=np.int64)
    return flat, np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))


def _config_digest(config: Any) -> str:
    """The fingerprint of a stream configuration (`MixtureStream._config_summary`)."""
    try:
        text = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):  # not JSON (an edited state): matches no fingerprint
        return ""
    return hashlib.sha256(text.encode()).hexdigest()


def _diff(saved: Mapping, now: Mapping) -> str:
    parts = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            parts.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return "; ".join(parts) if parts else "(configuration identical; shard contents differ)"
