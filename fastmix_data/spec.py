"""`MixtureSpec`: what a mixture is made of -> opened sources, their items and slices, and its plan.

The one owner of "mixture spec -> plan", used by the stream (`MixtureStream`) and by the exporters
(`export.manifest`): both open sources, parse exhaustion policies, size items (rows or packed
sequences), cut sources into slices for the canonical partitions and build the pure plan the same
way, so a manifest and a stream of the same spec agree item for item.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastmix_data.errors import SourceError, WeightsError
from fastmix_data.plan.partition import (
    DEFAULT_PARTITIONS,
    MIN_SLICE_ITEMS,
    SourceLayout,
    effective_partitions,
)
from fastmix_data.plan.planner import Exhaustion, MixturePlan, WeightChange
from fastmix_data.plan.weights import UNITS
from fastmix_data.sources import check_options, open_source
from fastmix_data.sources.base import Source

log = logging.getLogger(__name__)

def open_sources(
    sources: Mapping[str, Any], options: Mapping[str, Any], error: type[Exception] = SourceError
) -> tuple[list[Source], list[dict | None]]:
    """Open every source: {name: directory | glob | list | URL | {"path": ..., reader options} | Source}.

    Args:
        options: reader options for every source (`open_source`'s keywords, ``engine`` included);
            a dict spec's own options override them.
        error: raised for a dict spec without a ``path`` (the caller's error class).

    Returns:
        The opened sources, and per source the options it was opened with (None for a `Source`
        given already open), for exporters that record them.
    """
    opened: list[Source] = []
    used: list[dict | None] = []
    for name, spec in sources.items():
        if isinstance(spec, Source) and not isinstance(spec, (str, list, dict)):
            opened.append(spec)
            used.append(None)
            continue
        kw = dict(options)
        if isinstance(spec, Mapping):
            if "path" not in spec:
                raise error(f"source {name!r}: a dict spec needs a 'path' (directory, glob or list)")
            kw.update({k: v for k, v in spec.items() if k != "path"})
            spec = spec["path"]
        check_options(name, kw)
        opened.append(open_source(name, spec, **kw))
        used.append(kw)
    return opened, used


@dataclass
class MixtureSpec:
    """A mixture: sources, seed, units, packing, exhaustion and partitions (not its weights).

    Attributes:
        sources: {name: directory | glob | list of shard paths | {"path": ..., reader options} | Source}.
        seed: seeds every shuffle and the packing order.
        seq_len: packing mode when set: items are ``seq_len + 1`` tokens from one source.
        weight_units: "samples" (default) or "tokens".
        exhaustion: {name: "repeat" | "cap" | "drop" | "stop" | {"policy", "max_epochs"}}.
        shuffle: shuffle pieces per epoch and items within them (default True).
        tokenizer: packing-mode tokenizer for text columns: None (bytes), or any callable/tokenizer.
        eos_id: end-of-document id of the user tokenizer; for pre-tokenized sources, of the
            tokenizer that made their ids (default: none appended; the byte tokenizer's 256 is an
            ordinary id of other vocabularies).
        partitions: P, the canonical partitions (default `DEFAULT_PARTITIONS`, 8): every worker
            and rank reads only the slices of its partitions; content depends on P, not on W or R.
            Set it to the number of processes W x R of the job (or a multiple): a process serving
            P / (W x R) partitions keeps a decoded row group (or packed piece) per partition and source.
        chunk_items: items one partition serves at a time (default: the stream's per-rank batch
            size; a batch size must be a multiple of it). Fix it to keep content identical when
            the rank count (and so the per-rank batch at a fixed global batch) changes.
        source_options: reader options for every source (text_field, ids_field, cache_dir, ...).
    """

    sources: Mapping[str, Any]
    seed: int = 0
    seq_len: int | None = None
    weight_units: str = "samples"
    exhaustion: Mapping[str, Any] | None = None
    shuffle: bool = True
    tokenizer: Any = None
    eos_id: int | None = None
    partitions: int = DEFAULT_PARTITIONS
    source_options: dict = field(default_factory=dict)
    chunk_items: int | None = None

    def validate(self, error: type[Exception] = ValueError) -> None:
        """Check the spec without opening anything.

        Raises:
            WeightsError: unknown units.
            ``error``: no sources, exhaustion naming unknown sources, a bad seq_len or partition count."""
        if not self.sources:
            raise error("a mixture needs at least one source")
        if self.seq_len is not None and self.seq_len < 1:
            raise error(f"seq_len must be >= 1, got {self.seq_len}")
        if self.weight_units not in UNITS:
            raise WeightsError(f"unknown weight_units {self.weight_units!r}; use one of {UNITS}")
        if not isinstance(self.partitions, int) or self.partitions < 1:
            raise error(f"partitions must be a positive int, got {self.partitions!r}")
        if self.chunk_items is not None and (not isinstance(self.chunk_items, int) or self.chunk_items < 1):
            raise error(f"chunk_items must be a positive int, got {self.chunk_items!r}")
        unknown = sorted(set(self.exhaustion or {}) - set(self.sources), key=str)
        if unknown:
            raise error(f"exhaustion names unknown sources {unknown}; sources are {list(self.sources)}")

    def open(
        self, cache_shards: int = 2, sources: Sequence[Source] | None = None, error: type[Exception] = ValueError
    ) -> OpenedMixture:
        """Open the sources (or use ``sources``, already opened), size their items and slices.

        Raises:
            ``error``: a bad exhaustion policy (see `validate` for the rest)."""
        from fastmix_data.stream.items import ItemSource
        from fastmix_data.stream.tokenize import ByteTokenizer, as_tokenizer

        self.validate(error)
        names = list(self.sources)
        opened = list(sources) if sources is not None else open_sources(self.sources, self.source_options, error)[0]
        tok = as_tokenizer(self.tokenizer, self.eos_id)
        ids_eos = self.eos_id if isinstance(tok, ByteTokenizer) else (self.eos_id if self.eos_id is not None else tok.eos_id)
        items = [ItemSource(s, self.seed, self.seq_len, tok, cache_shards, self.shuffle, ids_eos_id=ids_eos) for s in opened]
        partitions = effective_partitions([it.total_items for it in items], self.partitions)
        if partitions != self.partitions:
            log.info("%d of %d partitions: the largest source fills no more with %d items each",
                     partitions, self.partitions, MIN_SLICE_ITEMS)  # fmt: skip
        dtype = max((it.dtype for it in items), key=lambda d: d.itemsize)
        for it in items:
            it.dtype = dtype
            if partitions > 1:
                it.set_partitions(partitions)
        policies = [Exhaustion.of((self.exhaustion or {}).get(n), n, error) for n in names]
        return OpenedMixture(self, names, opened, items, tok, policies, dtype, ids_eos, partitions)


@dataclass
class OpenedMixture:
    """A `MixtureSpec` with its sources opened: everything the plan needs, and the readers.

    Attributes:
        items: per source, its `ItemSource` (items per shard, slices, reading and packing).
        dtype: the token dtype of every packed or served id (uint16 or uint32).
        ids_eos: the end-of-document id packing appends to pre-tokenized rows (None: none).
        partitions: the partitions in use: the largest divisor of the spec's P that the largest
            source fills with `MIN_SLICE_ITEMS` items each (`effective_partitions`).
    """

    spec: MixtureSpec
    names: list[str]
    sources: list[Source]
    items: list
    tokenizer: Any
    policies: list[Exhaustion]
    dtype: np.dtype
    ids_eos: int | None
    partitions: int = 1

    @property
    def tokens_per_item(self) -> np.ndarray:
        return np.array([it.mean_tokens_per_item() for it in self.items], dtype=np.float64)

    def plan(
        self, history: list[WeightChange], *, chunk: int = 1, limit: int | None = None, seed: int | None = None,
        policies: Sequence[Exhaustion] | None = None, whole: bool = False,
    ) -> MixturePlan:  # fmt: skip
        """The pure plan of this mixture under ``history`` (item-unit weights).

        Args:
            chunk: the per-rank batch size (the unit one partition serves).
            limit: total items served, then the stream ends.
            seed, policies: override the spec's (probes: their own seed, ``repeat``).
            whole: plan without partitions (one slice holding the same pieces; probes)."""
        layouts = [_one_slice(it.layout) if whole else it.layout for it in self.items]
        return MixturePlan(
            self.names, [list(it.items_per_shard) for it in self.items], self.spec.seed if seed is None else seed,
            list(history), list(self.policies if policies is None else policies), self.spec.shuffle, limit,
            partitions=1 if whole else self.partitions, chunk=chunk, layouts=layouts,
        )  # fmt: skip


def _one_slice(layout: SourceLayout) -> SourceLayout:
    """The same pieces as ``layout``, in one slice (shard order)."""
    if len(layout.slices) == 1:
        return layout
    pieces = sorted((p for s in layout.slices for p in s), key=lambda p: (p.shard, p.lo, p.hi))
    return SourceLayout(layout.items_per_shard, (tuple(pieces),))
