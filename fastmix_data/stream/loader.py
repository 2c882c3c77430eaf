"""`TrackedLoader`: a torch DataLoader over a `MixtureStream` that reports consumption to it.

With workers, `MixtureStream.loader` configures what its workers send through one `WorkerOutput`
(set on the stream while ``iter()`` starts the workers, which copy the stream): packed numpy batches,
R of them per DataLoader item, written to a shared-memory ring (:mod:`fastmix_data.stream.batch_ring`).
The training process makes tensors and serves the batches in global order.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastmix_data.stream.batch_ring import RingReader, ring_directory
from fastmix_data.stream.batches import per_batch_counts, unpack

if TYPE_CHECKING:
    from fastmix_data.stream.mixture import MixtureStream


@dataclass(frozen=True)
class WorkerOutput:
    """What `MixtureStream.loader` workers send.

    Attributes:
        per_item: batches per DataLoader item (``batches_per_item``).
        ring: (ring directory, slots) of the shared-memory ring, or None (pickled through the pipe).
    """

    per_item: int = 1
    ring: tuple[str, int] | None = None


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
        per_item = self.per_item if self.to_tensors else 1
        output = None
        if self.to_tensors:
            slots = ((self.loader.prefetch_factor or 2) + 1) * per_item + 2
            output = WorkerOutput(per_item, None if self.ring is None else (self.ring.directory, slots))
        # read by the workers started by iter() (persistent workers keep what they saw first)
        self.stream.worker_output = output
        # Forked workers inherit this process's objects (a remote source's S3 client and its parsed
        # service model, hundreds of thousands of objects); a worker's first full collection would
        # walk them all and copy every page it touches. Frozen at the fork, they are outside the
        # workers' collections; this process unfreezes them at once. Not when the application has
        # frozen objects itself: unfreeze() would undo its freeze too.
        frozen = self.loader.num_workers > 0 and gc.get_freeze_count() == 0
        if frozen:
            gc.freeze()
        try:
            items = iter(self.loader)
        finally:
            self.stream.worker_output = None
            if frozen:
                gc.unfreeze()
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
        started = False
        for item in items:
            for packed in item if isinstance(item, list) else [item]:
                if self.ring is not None:
                    packed = self.ring.receive(packed)
                received[packed["batch_index"]] = packed  # a rebuilt copy replaces its stale one
            if not started and expected not in received and len(received) >= full_round:
                expected = min(received)  # a round from every worker is here: nothing earlier comes
            while expected in received:
                started = True
                if not self.stream._admit(packed := received.pop(expected)):
                    break  # stale: its worker, told of the change, sends it again
                yield self._served(packed)
                expected += 1
        # The workers ended: the rest in order; a batch missing or stale here (its worker ended
        # before it learnt of a change) is built in this process, as with num_workers=0.
        while (packed := received.pop(expected, None) or self.stream._build_here(expected)) is not None:
            if self.stream._admit(packed):
                yield self._served(packed)
                expected += 1

    def _served(self, packed: dict) -> dict:
        """The user-facing batch of a packed one that `MixtureStream._admit` counted."""
        return unpack(packed, widen=not self.stream.narrow_tokens)[0]


def as_is(batch: dict) -> dict:
    """collate_fn of `MixtureStream.loader` with workers: the worker's packed batch, unchanged."""
    return batch


def counts_of(batch, k: int) -> np.ndarray:
    """(2, k) int64: per source, the samples and tokens of a user-facing batch (for `observe`)."""
    meta = np.stack([np.asarray(batch["source"]), np.asarray(batch["num_tokens"])])
    return per_batch_counts(meta, meta.shape[1], k, tokens_row=1)[0]
