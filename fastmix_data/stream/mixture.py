"""`MixtureStream`: a torch IterableDataset serving a deterministic mixture under live weights.

Design problem: a training job wants a mixture of sharded sources whose weights may change while
it runs, served identically whatever the number of DataLoader workers, ranks or prefetch depth,
resumable exactly from a small checkpoint, with every worker and rank reading only its share of
the data.

Solution: every batch is computed from a pure plan (:mod:`fastmix_data.plan`): global batch g on
rank r holds global item positions [g*B*R + r*B, g*B*R + (r+1)*B), one *chunk* of the canonical
partition (g*R + r) mod P, which reads only its slice of every source. Worker w of W produces batches
start + w, start + w + W, ... (the order in which a DataLoader collects them), so with W*R dividing
P a process reads 1/(W*R) of the data. Weight changes enter the plan's history at the first global
batch the training loop of no rank has received (the weight channel carries them to the workers);
workers build ahead under the history they know, and a batch built under a history that has since
changed at or before its index is stale: the training process never serves it (its worker, told of
the change, builds it again). So content never depends on timing. The state is the history plus the
next batch.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fastmix_data.errors import ConfigError, StateError, WeightsError
from fastmix_data.plan.partition import DEFAULT_PARTITIONS
from fastmix_data.plan.planner import Exhaustion, PlanSlice, WeightChange, probe_seed
from fastmix_data.plan.weights import normalize_weights, to_item_units
from fastmix_data.spec import MixtureSpec
from fastmix_data.storage.prefetch import MAX_BLOCKS_AHEAD, prefetch_block
from fastmix_data.stream import batches as batch_format
from fastmix_data.stream import direct_ring, worker_memory
from fastmix_data.stream.batch_ring import RingWriter
from fastmix_data.stream.channel import WeightChannel
from fastmix_data.stream.distributed import Coordinator, rank_and_world, stream_namespace, worker_and_count
from fastmix_data.stream.loader import TrackedLoader, WorkerOutput, as_is, counts_of
from fastmix_data.stream.state_check import changed_shards, check_state, shard_digests

log = logging.getLogger(__name__)

STATE_FORMAT = "fastmix_data/stream-state"
# 2: history entries of a following stream carry "publisher"; 3: canonical partitions (partitions,
# chunk_items and ids_eos_id in the config, so in the fingerprint), narrow ids, the ids' EOS
STATE_VERSION = 3
READABLE_STATE_VERSIONS = (1, 2, 3)  # older states are refused by their fingerprint (no partitions)
BLOCK_BATCHES = 128  # default: batches a worker plans and reads in one pass (sample mode; see docs/stream.md)
BLOCK_TOKENS = 1 << 22  # packing mode: a block holds at most this many tokens
PREFETCH_BLOCKS = 2  # prefetch looks at most this many full blocks of batches ahead (and its byte budget)
FIRST_BLOCK_BATCHES = 2  # a worker's first block; each next one doubles up to block_batches (first batch sooner)
BATCHES_PER_ITEM = 8  # loader(): batches per DataLoader item (benchmarks/results/optimistic.md)


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
        batch_size: items per batch per rank (samples, or packed sequences in packing mode); also
            the chunk one canonical partition serves.
        seed: seeds every shuffle and the packing order; the stream is a pure function of it.
        seq_len: packing mode when set: items are ``seq_len + 1`` tokens from one source.
        weight_units: "samples" (default) or "tokens" (exact in packing mode; in sample mode
            converted with each source's mean tokens per sample from the shard index).
        exhaustion: {name: "repeat" | "cap" | "drop" | "stop" | {"policy", "max_epochs"}}.
        shuffle: shuffle piece order per epoch and items within pieces (default True).
        tokenizer: packing-mode tokenizer for text columns: None (bytes), or any callable/tokenizer.
        eos_id: end-of-document id of a user tokenizer; with pre-tokenized sources, that of the
            tokenizer that made their ids (default none: the byte tokenizer's 256 is not appended
            to ids; ``doc_start`` marks document boundaries regardless).
        partitions: P, the number of canonical partitions (default 8). With W workers on R ranks
            and W*R dividing P, each process reads 1/(W*R) of every source; otherwise
            1/gcd(W*R, P). Content depends on P and ``chunk_items``, never on W or R. Set it to the
            job's W*R (or a multiple): a process keeps one decoded row group per partition it serves
            and source.
        chunk_items: items a partition serves at a time (default ``batch_size``, which must be a
            multiple of it); fix it (e.g. to the smallest per-rank batch you will use) to keep the
            content when the rank count changes at a fixed global batch.
        rank, world_size: override torch.distributed / RANK, WORLD_SIZE detection.
        max_items: total items (over all ranks) the stream serves, then it ends (a budget).
        cache_shards: decoded shards (or as many rows of row groups) kept per source and process.
        block_batches: batches each worker plans and reads in one pass (per-batch work is then
            slicing). Default 128 in sample mode; in packing mode as many as hold 4M tokens (at most
            128). It never delays a weight change: a change drops what was built ahead under the
            old history and the next block is rebuilt from the first batch it alters. A worker's
            first block is 2 batches, each next one twice the last up to ``block_batches``, so the
            first batch does not wait for a whole block.
        narrow_tokens: keep token ids uint16/uint32 in the batches the training loop receives
            (``tokens``, ``input_ids``; widen them on the device) instead of int64 (default False).
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
        partitions: int = DEFAULT_PARTITIONS,
        chunk_items: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        cache_shards: int = 2,
        max_items: int | None = None,
        block_batches: int | None = None,
        narrow_tokens: bool = False,
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
        _check_int("partitions", partitions, 1)
        _check_int("chunk_items", chunk_items, 1, optional=True)
        if chunk_items is not None and batch_size % chunk_items:
            raise ConfigError(f"batch_size {batch_size} is not a multiple of chunk_items {chunk_items}")
        if block_batches is None:
            per_batch = batch_size * (1 if seq_len is None else seq_len + 1)
            block_batches = BLOCK_BATCHES if seq_len is None else max(1, min(BLOCK_BATCHES, BLOCK_TOKENS // per_batch))
        if exhaustion is not None and not isinstance(exhaustion, Mapping):
            raise ConfigError(f"exhaustion must be a mapping {{source: policy}}, got {exhaustion!r}"[:200])
        self.spec = MixtureSpec(sources, int(seed), seq_len, weight_units, dict(exhaustion or {}), shuffle, tokenizer,
                                eos_id, int(partitions), dict(source_options), chunk_items)  # fmt: skip
        self.names = list(sources)
        self.batch_size = int(batch_size)
        self.block_batches = int(block_batches)
        self.narrow_tokens = bool(narrow_tokens)
        self.worker_output: WorkerOutput | None = None  # set by loader() while it starts its workers
        self._ring_readers: list = []
        detected = rank_and_world()
        _check_int("rank", rank, 0, optional=True)
        _check_int("world_size", world_size, 1, optional=True)
        self.rank = detected[0] if rank is None else int(rank)
        self.world_size = detected[1] if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.mixture = self.spec.open(cache_shards, error=ConfigError)
        self.sources, self.items, self.tokenizer = self.mixture.sources, self.mixture.items, self.mixture.tokenizer
        self.policies = self.mixture.policies
        self.tokens_per_item = self.mixture.tokens_per_item
        requested = normalize_weights(weights, self.names)
        first = self._history_entry(0, 0, requested, time.time())
        self.chunk_items = chunk_items or self.batch_size
        self.plan = self.mixture.plan([], chunk=self.chunk_items, limit=max_items)
        self._set_history([first])
        self.probes: list[dict] = []
        self._next_batch = 0
        self._cursor: dict | None = None
        self._resume_cursor: dict | None = None
        self._observed: dict[int, float] = {}
        self._received = np.zeros((2, len(self.names)), dtype=np.int64)  # per source: samples, tokens
        self._weights_lock = threading.Lock()  # serialises set_weights calls and the serving of each batch
        self._known_version = 0  # the channel's history version that self.history is
        self._rebuilt = 0  # batches received stale (built under an older history) and built again
        self._send_now = False  # a worker: send the item now (see _items)
        self._coordinator = Coordinator(self.rank, self.world_size, stream_namespace() if self.world_size > 1 else "")
        self.follower = None
        self.channel = WeightChannel(self.history, first_batch=0, gated=follow is not None)
        if follow is not None:
            from fastmix_data.live.follower import Follow, Follower

            self.follower = Follower(self, Follow.of(follow))

    # ------------------------------------------------------------------------------ basics
    seed = property(lambda self: self.spec.seed)
    seq_len = property(lambda self: self.spec.seq_len)
    weight_units = property(lambda self: self.spec.weight_units)
    shuffle = property(lambda self: self.spec.shuffle)
    partitions = property(lambda self: self.spec.partitions)

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

    @property
    def token_dtype(self) -> np.dtype:
        """The dtype of token ids in the workers and the shared-memory ring (uint16 or uint32)."""
        return self.mixture.dtype

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
        self._lookahead = None  # a plan made under the old history
        self.history = [dict(h) for h in history]
        self.plan.with_history([WeightChange(h["version"], h["position"], tuple(h["weights"])) for h in self.history])

    def _sync_history(self) -> None:
        """Take the channel's history if its version moved since this process last read it (one
        read of a shared mapping when it did not)."""
        if self.channel.version(raise_failure=False) == self._known_version:
            return
        self._known_version, history = self.channel._read_history()
        if history != self.history:
            self._set_history(history)

    def _version_at(self, g: int) -> int:
        """The version of the history entry in force at global batch g (the last one at or before
        it). Every entry is made once, after the entries before it, so two histories with the same
        entry in force at g agree on everything that batch g's content depends on."""
        last = self.history[-1]
        if last["batch"] <= g:  # (the common case: a batch after the last change)
            return last["version"]
        return next(h["version"] for h in reversed(self.history) if h["batch"] <= g)

    def _admit(self, packed: dict) -> bool:
        """In the training process, before serving a packed batch: wait for a grant past it
        (following), then count it as received, unless it is stale (built under a history whose
        entry in force at its index is no longer the one in force): then count a rebuild and return
        False. Under the weights lock, so a concurrent `set_weights` places its change after it."""
        g = packed["batch_index"]
        if self.follower is not None:
            self.channel.gate(g)
        with self._weights_lock:
            self._sync_history()
            if packed["weight_version"] != self._version_at(g):
                self._rebuilt += 1
                return False
            self._count(g, packed["weight_version"], packed["_counts"])
            return True

    def _stale(self, g: int, version: int) -> bool:
        """In the training process: whether batch g built under history entry ``version`` is stale
        (see `_admit`; the history taken from the channel first when it looks so); counted."""
        if version == self._version_at(g):
            return False
        with self._weights_lock:
            self._sync_history()
            if version == self._version_at(g):
                return False
            self._rebuilt += 1
            return True

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
            "ids_eos_id": self.mixture.ids_eos,
            "weight_units": self.weight_units,
            "shuffle": self.shuffle,
            "exhaustion": [[p.policy, p.max_epochs] for p in self.policies],
            "max_items": self.plan.limit,
            "partitions": self.partitions,
            "chunk_items": self.chunk_items,
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
        if not in_main:
            worker_memory.disable_huge_pages()  # huge-page faults for every decode: half a worker's CPU
        output = None if in_main else self.worker_output  # loader() workers send packed numpy batches
        direct = output.direct if output is not None else None
        ring = RingWriter(output.ring[0], worker, output.ring[1]) if output is not None and output.ring else None
        if ring is not None and ring.mm is None:  # no usable shared memory: the pipe, as without one
            ring = None
        parts = self.mixture.partitions
        for item_source in self.items:
            item_source.raw_text = (ring is not None or direct is not None) and self.seq_len is None
            item_source.cursors = parts // math.gcd(workers * self.world_size, parts)  # partitions served here
        batches = self._batches(g, worker, workers, in_main, packed_out=output is not None)
        if direct is not None:  # every batch into this worker's ring; nothing through the DataLoader
            directory, name = direct
            direct_ring.write_all(batches, direct_ring.ring_path(directory, name, worker),
                                  direct_ring.fifo_path(directory, name))  # fmt: skip
            return
        try:
            if output is not None and output.per_item > 1:  # loader() workers: R of their batches per item
                for chunk in self._items(batches, output.per_item):
                    yield chunk if ring is None else [ring.send(b) for b in chunk]
            elif ring is not None:
                for batch in batches:
                    yield ring.send(batch)
            else:  # the training process and plain DataLoader workers: nothing added per batch
                yield from batches
        finally:
            if ring is not None:
                ring.close()

    def _items(self, batches: Iterator[dict], per_item: int) -> Iterator[list[dict]]:
        """``per_item`` batches per DataLoader item, except that the first item, and an item in which
        a weight change was learnt, end at their first batch built under the history (the training
        loop waits for it: it is not held back while the rest of the item is built)."""
        chunk: list[dict] = []
        self._send_now = True
        for batch in batches:
            chunk.append(batch)
            if len(chunk) == per_item or self._send_now:
                self._send_now = False
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _batches(self, g: int, worker: int, workers: int, in_main: bool, packed_out: bool) -> Iterator[dict]:
        """Batches g, g + W, ... of worker ``worker`` of ``workers`` (packed when ``packed_out``).

        The training process (``in_main``) and `loader` workers (``packed_out``) build optimistically:
        a changed history drops what was built ahead and rewinds to this worker's first batch that
        the change alters (the training process discards the copies already sent; `_admit`). A plain
        DataLoader's worker claims each batch first (`WeightChannel.claim`)."""
        claiming = not (in_main or packed_out)
        ahead: collections.deque[dict] = collections.deque()  # built batches g, g + W, ...
        first, block = g, min(FIRST_BLOCK_BATCHES, self.block_batches)
        while True:
            changed = self.channel.claim(g) if claiming else None
            if changed is not None:
                self._set_history(changed)
                ahead.clear()
            elif not claiming and (rewound := self._learn(g, first, workers)) is not None:
                g, block = rewound, min(FIRST_BLOCK_BATCHES, self.block_batches)
                ahead.clear()
                self._send_now = True  # `_items` sends the next batch at once
            if not ahead:
                indices = [g + j * workers for j in range(block)]
                block = min(2 * block, self.block_batches)
                sl = self._plan_block(indices)
                self._prefetch(sl, g + len(indices) * workers, block, workers)
                whole = indices[: len(sl.position) // self.batch_size]
                ahead.extend(self._materialise(sl, whole, own=not packed_out))
                if not ahead:
                    return
            batch = ahead.popleft()
            if in_main and not self._admit(batch):
                ahead.clear()  # changed since it was built: build again from g
                continue
            self._cursor = {"next": g + workers, "worker": worker, "num_workers": workers}
            if not packed_out:
                batch, _ = batch_format.unpack(batch, widen=not self.narrow_tokens)
            g += workers
            yield batch

    def _learn(self, g: int, first: int, workers: int) -> int | None:
        """An optimistic reader's check before each batch (one mapped read): None when the history
        is unchanged, else, with the new history taken, the batch to build next: this worker's first
        batch at or after the first one the change alters (its batches since ``first`` were sent)."""
        if self.channel.version() == self._known_version:
            return None
        old = self.history
        self._sync_history()
        lo = max(_first_change(old, self.history), first)
        return g - (g - lo) // workers * workers if g > lo else g

    def _build_here(self, g: int) -> dict | None:
        """Packed batch g built in this process (None past the end of the plan)."""
        built = self._materialise(sl := self._plan_of([g]), [g][: len(sl.position) // self.batch_size])
        return built[0] if built else None

    def _plan_block(self, batch_indices: list[int]) -> PlanSlice:
        """The plan of this rank's part of global batches ``batch_indices`` (ascending), one call
        (a coming block's plan, made ahead for prefetch, is reused while the history is unchanged)."""
        hit = (self._lookahead or {}).pop(tuple(batch_indices), None)
        if hit is not None:
            return hit[0]
        return self._plan_of(batch_indices)

    def _plan_of(self, batch_indices: Sequence[int]) -> PlanSlice:
        starts = [b * self.global_batch_items + self.rank * self.batch_size for b in batch_indices]
        return self.plan.plan_ranges(starts, self.batch_size)

    def _materialise(self, sl: PlanSlice, batch_indices: Sequence[int], own: bool = True) -> list[dict]:
        """Packed batches (`stream.batches`) of ``batch_size`` consecutive items of ``sl`` (``own``:
        their token arrays are copies, not views of the block's; see `batches.build`)."""
        return batch_format.build(self.items, sl, batch_indices, self.batch_size, self.seq_len, self.token_dtype, own)

    def _prefetch(self, sl: PlanSlice, first: int, size: int, workers: int) -> None:
        """Remote sources: fetch what block ``sl`` reads and, after it, what this process's coming
        blocks (from its batch ``first``, the next one ``size`` batches) read, up to each source's
        prefetch budget, into the node-local cache (docs/sources.md, Prefetch). Only this process's
        own partitions are planned, so it fetches only its share."""
        remote = [k for k, s in enumerate(self.sources) if getattr(s, "remote", False)]
        if remote:
            coming = self._coming_blocks(first, size, workers, remote)
            prefetch_block(self.sources, batch_format.block_reads(self.items, sl, remote), coming)

    def _coming_blocks(self, first: int, size: int, workers: int, remote: list[int]) -> Iterator[dict]:
        """Per coming block of this process (batches first, first + W, ...; sizes doubling up to
        ``block_batches`` as `_batches` makes them), its reads of the ``remote`` sources, lazily, up
        to `PREFETCH_BLOCKS` full blocks of batches ahead. Each block is planned once: its plan is
        kept (at most `MAX_BLOCKS_AHEAD` + 1 blocks) and served when its turn comes, unless the
        weight history changes first."""
        if self._lookahead is None:
            self._lookahead = {}
        horizon = first + PREFETCH_BLOCKS * self.block_batches * workers  # batches: bounds planning ahead
        while first < horizon:
            indices = tuple(first + j * workers for j in range(size))
            hit = self._lookahead.get(indices)
            if hit is None:
                sl = self._plan_of(indices)
                hit = self._lookahead[indices] = (sl, batch_format.block_reads(self.items, sl, remote))
                while len(self._lookahead) > MAX_BLOCKS_AHEAD + 1:  # another iteration's leftovers
                    self._lookahead.pop(next(iter(self._lookahead)))
            yield hit[1]
            if len(hit[0].position) < size * self.batch_size:  # the end of the plan
                return
            first, size = first + size * workers, min(2 * size, self.block_batches)

    # ------------------------------------------------------------------------------ live weights
    def set_weights(self, weights: Mapping[str, float] | Sequence[float]) -> int:
        """Change the mixture; return the global batch index from which it applies.

        The change applies at the first global batch that the training loop of no rank has received
        (with `loader` or ``num_workers=0``: what the workers built ahead under the old weights is
        built again, never served; with a plain DataLoader, whose workers claim their batches: at
        most num_workers * prefetch_factor batches later, see docs/stream.md). Under
        torch.distributed every rank must call this at the same point of its loop (it is a
        collective, carried by the job's c10d store, never by the training's process group); rank
        0's weights are used.

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
        with self._weights_lock:  # one change at a time, and no batch served meanwhile (`_admit`)
            return self._publish(requested)

    def _publish(self, requested: np.ndarray) -> int:
        """Publish one change through the weight channel (callers hold ``_weights_lock``): at the
        first batch that no rank's training loop has received (nor a claiming worker started)."""
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
            self._known_version = self.channel.finish_change(self.history)
            raise
        self._known_version = self.channel.finish_change(history)
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
        plan = self.mixture.plan(
            [WeightChange(0, 0, tuple(item_w))], seed=probe_seed(self.seed, probe_id),
            policies=[Exhaustion() for _ in self.names], whole=True,
        )  # fmt: skip
        for first in range(0, int(steps), self.block_batches):
            block = list(range(first, min(first + self.block_batches, int(steps))))
            sl = plan.plan(first * self.batch_size, (block[-1] + 1) * self.batch_size)
            for packed in self._materialise(sl, block):
                batch, _ = batch_format.unpack(packed, widen=not self.narrow_tokens)
                batch["probe"] = probe_id
                yield batch

    # ------------------------------------------------------------------------------ consumption
    def _observe(self, batch: Mapping) -> None:
        self._count(int(batch["batch_index"]), int(batch["weight_version"]), counts_of(batch, len(self.names)))

    def _count(self, g: int, version: int, counts: np.ndarray) -> None:
        """Record the consumption of batch g: its weight version, and ``counts`` (2, K) int64: per
        source, samples and tokens in the batch."""
        self._next_batch = max(self._next_batch, g + 1)
        if version not in self._observed:
            self._observed[version] = time.time()
        self._received += counts

    def observe(self, batch: Mapping) -> None:
        """Record that the training loop received ``batch`` (done for you by `loader()` and with
        num_workers=0). Feeds `state_dict()` (next batch) and `stats()` (latency, tokens)."""
        self._observe(batch)

    def loader(
        self, *, shared_memory_batches: bool = True, batches_per_item: int = BATCHES_PER_ITEM, **dataloader_kwargs
    ) -> TrackedLoader:
        """A torch DataLoader over this stream that reports consumed batches back to it.

        The fast path with workers: each worker writes its batches, as numpy arrays and UTF-8 bytes,
        straight into a ring of shared-memory slots that this process reads (the DataLoader only
        starts, feeds and stops the workers; :mod:`fastmix_data.stream.direct_ring`), and this
        process makes tensors and ``str`` and serves the batches in order. ``prefetch_factor``
        counts batches per worker ahead, as for a plain DataLoader (a ring holds max(prefetch_factor
        + 2, 16) of them). Where that transport does not apply (a DataLoader ``timeout``, no
        ``posix_fallocate`` or FIFOs) and with ``shared_memory_batches=False``, the batches go
        through the DataLoader, ``batches_per_item`` of them per item (default 8; only these paths
        use it; then ``prefetch_factor`` becomes ceil(prefetch_factor / batches_per_item) items),
        written to shared-memory slots (:mod:`fastmix_data.stream.batch_ring`) or, with
        ``shared_memory_batches=False``, pickled through the DataLoader's pipe. A plain
        ``DataLoader(stream, batch_size=None)`` also works (then call `observe` on each batch for
        telemetry): its workers return tensors, which cost a shared-memory segment per storage
        (~1 ms per batch on a small VM; benchmarks/results/mixer.md). As with a DataLoader,
        ``iter()`` of the result starts the workers."""
        if batches_per_item < 1:
            raise ConfigError(f"batches_per_item must be >= 1, got {batches_per_item}")
        dataloader_kwargs.setdefault("batch_size", None)
        workers = dataloader_kwargs.get("num_workers", 0)
        convert = workers > 0 and "collate_fn" not in dataloader_kwargs
        prefetch = dataloader_kwargs.get("prefetch_factor") or 2  # batches per worker (the DataLoader's default)
        if convert:
            dataloader_kwargs["collate_fn"] = as_is
            dataloader_kwargs["prefetch_factor"] = -(-prefetch // batches_per_item)
        loader = torch.utils.data.DataLoader(self, **dataloader_kwargs)
        return TrackedLoader(self, loader, to_tensors=convert, use_ring=shared_memory_batches,
                             per_item=batches_per_item, prefetch=prefetch)  # fmt: skip

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
            self._known_version = self.channel.reset(self.history, self._next_batch)
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
        requested = self.plan.expected_before(end)
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
                "samples_received": int(self._received[0, i]),
                "tokens_received": int(self._received[1, i]),
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
            "rebuilt_batches": self._rebuilt,
            "follow": self.follower.stats() if self.follower is not None else None,
        }

    def close(self) -> None:
        """Remove the stream's temporary files (weight channel, batch rings) now rather than at
        interpreter exit. The stream cannot serve DataLoader workers afterwards."""
        if self.follower is not None:
            self.follower.close()
        self.channel.close()
        for reader in self._ring_readers:
            reader.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ring_readers"] = []  # training-process side only (open maps)
        state["_lookahead"] = None
        del state["_weights_lock"]
        state["follower"] = None  # ditto (threads, store connections); workers follow through the channel
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._weights_lock = threading.Lock()

    def manifest_plan(self):
        """The pure plan behind this stream (for exporters)."""
        if torch.utils.data.get_worker_info() is None:
            self._sync_history()
        return self.plan


def _first_change(old: list[dict], new: list[dict]) -> int:
    """The first global batch whose weights differ between two histories (a huge number if none)."""
    a, b = ({(h["version"], h["batch"], tuple(h["weights"])) for h in x} for x in (old, new))
    return min((batch for _, batch, _ in a ^ b), default=1 << 62)  # entries in one history only


def _agree_change(payloads: list[dict]) -> dict:
    """Where a `set_weights` change applies: after every rank's received batches (and its claiming
    workers' claims), with rank 0's weights (run on rank 0 by `Coordinator.reduce`)."""
    return {
        "effective": max(max(p["started"] for p in payloads) + 1, max(p["next"] for p in payloads)),
        "weights": payloads[0]["weights"],
    }


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
