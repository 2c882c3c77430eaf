"""`TrackedLoader`: a torch DataLoader over a `MixtureStream` that reports consumption to it.

With workers, `MixtureStream.loader` configures what its workers send through one `WorkerOutput`
(set on the stream while ``iter()`` starts the workers, which copy the stream): packed numpy batches,
by default written straight to one shared-memory ring per worker that the training process reads
(:mod:`fastmix_data.stream.direct_ring`; the DataLoader only starts, feeds and stops the workers).
Without that (no FIFOs or ``posix_fallocate``, a DataLoader ``timeout``): R batches per DataLoader
item, through a shared-memory ring (:mod:`fastmix_data.stream.batch_ring`) or pickled. The training
process makes tensors and serves the batches in global order.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastmix_data.stream import direct_ring
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
        direct: (ring directory, name) of the direct rings (`direct_ring.DirectRings`); then nothing
            goes through the DataLoader and ``per_item`` and ``ring`` do not apply.
    """

    per_item: int = 1
    ring: tuple[str, int] | None = None
    direct: tuple[str, str] | None = None


JOIN_S = 30.0  # at the end of an iteration: the longest wait for the DataLoader to see its workers return


class TrackedLoader:
    """Iterates a DataLoader and reports each received batch to its stream (`MixtureStream.observe`)."""

    def __init__(
        self,
        stream: MixtureStream,
        loader: torch.utils.data.DataLoader,
        to_tensors: bool = False,
        use_ring: bool = True,
        per_item: int = 1,
        prefetch: int = 2,
    ):
        self.per_item = int(per_item)
        self.prefetch = int(prefetch)  # batches per worker ahead (the user's prefetch_factor)
        self._direct_name: str | None = None  # persistent workers: the rings' name of their first iteration
        self._live: _Waiter | None = None  # persistent workers: the iteration whose workers may still write
        self.slot_bytes = direct_ring.SLOT_BYTES  # a direct ring's slot (a larger batch is spilled to a file)
        self.transport: str | None = None  # the last iteration's: "direct", "items" (per DataLoader item), None
        self.items_delivered = 0  # DataLoader items the direct transport received (none: it bypasses them)
        self.spilled = 0  # batches of the direct transport that came through spill files
        self.stream = stream
        # held here: at interpreter exit a never-closed iteration is finalised after module globals
        # (this module's `sys`, direct_ring's structs) may already be gone
        self._finalizing = sys.is_finalizing
        self.loader = loader
        self.to_tensors = to_tensors
        self.ring = RingReader(ring_directory()) if to_tensors and use_ring else None
        if self.ring is not None:
            stream._ring_readers.append(self.ring)

    def __iter__(self):
        """Start the workers now, as ``iter(DataLoader)`` does, and return the batches' iterator."""
        per_item = self.per_item if self.to_tensors else 1
        output = None
        rings = self._direct_rings()
        self.transport = "direct" if rings is not None else "items" if self.to_tensors else None
        if rings is not None:
            output = WorkerOutput(direct=(self.ring.directory, rings.name))
        elif self.to_tensors:
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
        except BaseException:
            if rings is not None:
                rings.release()
            raise
        finally:
            self.stream.worker_output = None
            if frozen:
                gc.unfreeze()
        if rings is not None:
            return self._serve_direct(_Waiter(items, rings), rings)
        return self._serve(items, per_item)

    def _direct_rings(self) -> direct_ring.DirectRings | None:
        """This iteration's direct rings, or None when the direct transport does not apply (no ring,
        a DataLoader timeout, no FIFOs or posix_fallocate, or they cannot be made: the per-item path)."""
        loader = self.loader
        if self.ring is None or loader.num_workers == 0 or loader.timeout or not direct_ring.usable():
            return None
        persistent = loader.persistent_workers
        if persistent and self.transport == "items":  # its workers keep what their first iteration used
            return None
        if persistent and self._live is not None:  # the previous iteration's workers must return first
            self._live.stop()
        name = self._direct_name or os.urandom(4).hex()
        try:
            rings = direct_ring.DirectRings(self.ring.directory, name, loader.num_workers,
                                           direct_slots(self.prefetch), self.slot_bytes)  # fmt: skip
        except OSError:
            if self._direct_name is not None:  # persistent workers already write to rings
                raise
            return None
        if persistent:
            self._direct_name = name
        return rings

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

    def _serve_direct(self, waiter: _Waiter, rings: direct_ring.DirectRings) -> Iterator[dict]:
        """Batches read from the workers' rings, served in global order: each from the ring that
        served the batch W before it, when that ring has it next (`_in_turn`: one record read), else
        as `_next_direct` finds it (every ring and the workers' states looked at)."""
        if self.loader.persistent_workers:
            self._live = waiter
        waiter.start()
        expected, started = self.stream._next_batch, False
        owners: list = [None] * len(rings.rings)  # owners[g % W]: the ring that served batch g - W
        try:
            while True:
                packed = self._in_turn(owners, expected) if started else None
                if packed is None:
                    seen = rings.progress()
                    packed, expected, ring, end = self._next_direct(rings, waiter, expected, started)
                    if end:
                        return
                    if packed is None:
                        if not waiter.finished:
                            rings.wait(seen)
                        continue
                    started = True
                    if ring is not None:
                        owners[expected % len(owners)] = ring
                if self.stream._admit(packed):
                    yield self._served(packed)
                    expected += 1
        finally:
            if not self._finalizing():  # at exit the workers return as their parent is gone
                waiter.stop()
                self.items_delivered += waiter.delivered
                self.spilled += sum(ring.spilled for ring in rings.rings)
                rings.release(unlink=not self.loader.persistent_workers)

    def _in_turn(self, owners: list, expected: int) -> dict | None:
        """Batch ``expected`` if the ring that served batch ``expected`` - W (each worker builds
        every W-th batch) has it next, built under the history in force (one record read); else
        None. A worker's failure is then seen when its ring has nothing next (`_next_direct`)."""
        ring = owners[expected % len(owners)]
        head = None if ring is None else ring.head()
        if head is None or head[0] != expected or head[1] != self.stream._version_at(expected):
            return None
        return ring.take(widen=self._widen)

    def _next_direct(self, rings, waiter: _Waiter, expected: int, started: bool):
        """(batch ``expected`` if it can be had now, else None; expected; the ring it came from;
        the end).

        Each ring's next batch is read when it is ``expected``; one already served or stale is
        skipped (its worker, told of the change, writes it again). A worker's valid batches come in
        increasing order, so when every ring has ended or has a later batch next, no worker will
        write ``expected`` (it ended before it learnt of a change, or the plan ended): it is built
        here, as with num_workers=0. Until the first batch is served, ``expected`` is the smallest
        batch every worker has written (persistent workers start where their copy of the stream
        does)."""
        returned = waiter.finished and waiter.error is None  # read before the rings: all written
        states = [ring.state() for ring in rings.rings]
        heads = [self._head(ring, expected if started else None) for ring in rings.rings]
        if waiter.error is not None or direct_ring.FAILED in states:
            raise waiter.failure()
        ended = [h is None and (returned or s != direct_ring.RUNNING) for s, h in zip(states, heads)]
        if not started and expected not in heads and all(h is not None or e for h, e in zip(heads, ended)):
            expected = min((h for h in heads if h is not None), default=expected)
        if expected in heads:
            ring = rings.rings[heads.index(expected)]
            return ring.take(widen=self._widen), expected, ring, False
        if all(e or (h is not None and h > expected) for h, e in zip(heads, ended)):
            packed = self.stream._build_here(expected)
            return packed, expected, None, packed is None and all(ended)
        return None, expected, None, False

    def _head(self, ring, served_below: int | None) -> int | None:
        """The batch index next in ``ring`` after skipping batches below ``served_below`` and stale
        ones (counted as rebuilt), or None when the ring has nothing new."""
        while (head := ring.head()) is not None:
            g, version = head
            if (served_below is not None and g < served_below) or self.stream._stale(g, version):
                ring.take(keep=False)
                continue
            return g
        return None

    @property
    def _widen(self) -> bool:
        """Whether token ids become int64 in the training process (else they stay uint16/uint32)."""
        return not self.stream.narrow_tokens

    def _served(self, packed: dict) -> dict:
        """The user-facing batch of a packed one that `MixtureStream._admit` counted."""
        return unpack(packed, widen=self._widen)[0]


MIN_SLOTS = 16  # a direct ring's slots: max(prefetch_factor + 2, this); 4 and 8 cost CPU and samples/s (partitions-direct.md)


def direct_slots(prefetch: int) -> int:
    """S of a direct ring: the batches a worker may be ahead of the training process (its
    ``prefetch_factor``, the batch being written and one more; at least `MIN_SLOTS`, about what the
    per-item path holds with its default of 8 batches per item)."""
    return max(prefetch + 2, MIN_SLOTS)


class _Waiter(threading.Thread):
    """Iterates the DataLoader while the workers write to their direct rings: no batch comes through
    it; it ends when every worker has returned (StopIteration) or with a worker's exception (the
    DataLoader's, unchanged), and wakes the serving loop then."""

    def __init__(self, items: Iterator, rings: direct_ring.DirectRings):
        super().__init__(daemon=True, name="fastmix-data-loader-waiter")
        self.items: Iterator | None = items
        self.rings = rings
        self.wake_fd = rings.waker()
        self.error: BaseException | None = None
        self.delivered = 0  # DataLoader items (none expected: the workers yield nothing)
        self.finished = False

    def run(self) -> None:
        try:
            for _ in self.items:
                self.delivered += 1
        except BaseException as exc:  # a worker's exception, or the DataLoader's own (a killed worker)
            self.error = exc
        finally:
            self.items = None  # the DataLoader iterator shuts its workers down when dropped
            self.finished = True
            try:
                os.write(self.wake_fd, b"\0")
            finally:
                os.close(self.wake_fd)

    def stop(self) -> None:
        """The workers told to return, and their return awaited (bounded by `JOIN_S`)."""
        if self.rings.rings:
            self.rings.stop()
        if self.is_alive():
            self.join(JOIN_S)

    def failure(self) -> BaseException:
        """The exception to raise for a failed worker: the one the DataLoader delivers, once the
        other workers returned (it delivers in its round-robin order)."""
        self.stop()
        return self.error or RuntimeError("a DataLoader worker of the stream failed and the DataLoader did not say why")


def as_is(batch: dict) -> dict:
    """collate_fn of `MixtureStream.loader` with workers: the worker's packed batch, unchanged."""
    return batch


def counts_of(batch, k: int) -> np.ndarray:
    """(2, k) int64: per source, the samples and tokens of a user-facing batch (for `observe`)."""
    meta = np.stack([np.asarray(batch["source"]), np.asarray(batch["num_tokens"])])
    return per_batch_counts(meta, meta.shape[1], k, tokens_row=1)[0]
