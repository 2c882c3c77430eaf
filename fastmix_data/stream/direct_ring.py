"""Batches from `MixtureStream.loader` workers straight to the training process, past the DataLoader.

Design problem: with the per-item transport (:mod:`fastmix_data.stream.batch_ring`) every batch, or
item of R batches, still goes through the DataLoader's protocol: an index sent to the worker, a
descriptor pickled into its result queue, the queue's feeder thread, the training process's receive,
unpickle and wake-up. On a 2-core machine that was ~8 % of a worker's CPU and ~17 % of the training
process's (benchmarks/results/partitions-last.md).

Solution: the DataLoader only starts, feeds and stops the workers. The training process makes one
*ring file* per worker and iteration (`DirectRings`) and one FIFO; a worker's stream writes every
batch into its ring, in order, one slot each (`write_all`), and yields nothing through the DataLoader:
its generator returns at the end (the DataLoader sees the worker's StopIteration) or raises (the
DataLoader delivers the exception, which a thread of the training process waits for). The training
process reads the rings' slots in order and acknowledges them; a worker whose ring is full waits
for an acknowledgement (sleep-polling: it is ahead). Wire format (all int64 little-endian):

* header: 0 acknowledged (batches the training process has taken), 8 written (batches the worker
  has written), 16 state (0 running, 1 done, 2 failed; by the worker), 24 closed (set by the training
  process when its iterator ends or is dropped: the worker returns at once), 32 S (slots), 40 slot
  bytes; from 64, one record per slot: (payload kind, batch index, weight version), where the kind is
  the pickled descriptor's length in bytes (> 0: in the slot), -1 (a spill file in the ring
  directory) or -2 (a spill file in the temp directory);
* slot s of S at `data_at` (S) + s * slot bytes: batch j goes to slot j mod S, written only when
  batch j - S has been acknowledged: the descriptor (values that are not arrays or texts, except the
  batch index and weight version, which only the record holds, and the layout of
  `batch_ring.encode`), padded to 64 bytes, then the payload. The descriptor's bytes are the same
  for every batch of a stream that has no such other values and the same shapes (the common case):
  the training process unpickles them only when they differ from the previous slot's;
* a batch that does not fit in a slot, or whose slot cannot be backed by memory (`posix_fallocate`
  fails: shared memory full), is pickled whole into a spill file ``<ring>.<j>.spill`` in the ring
  directory (or, if that fails too, in `batch_ring.temp_spill_directory`) that the training process
  reads and removes: nothing waits on the DataLoader's queue, nothing is lost;
* the training process, when it has nothing to serve, sets a *reader waits* word (48) in every
  header, looks at the rings once more, and polls the FIFO with a timeout (`WAKE_TIMEOUT_S`);
  a worker writes one byte into it after a batch while that word is set, and at its end
  (non-blocking: a full FIFO already wakes the reader). A lost wake-up (the word read just before
  it was set) costs at most the timeout;
* a worker whose ring is full sleeps (0.5 ms, doubling up to 5 ms) until half of the slots are free.

A worker also returns when its parent process is gone (``os.getppid()`` changed; looked at while it
waits for a free slot: nobody takes from its ring then). A worker that
cannot open its ring (it has no state word to set) leaves a marker file ``<ring>.unopened``; the
training process looks for it after a wait that timed out, on rings with nothing written yet.
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import struct
import time

from fastmix_data.stream.batch_ring import (
    SLOT_BYTES,
    align,
    decode,
    encode,
    inline,
    temp_spill_directory,
    write_pieces,
)

_HEADER = struct.Struct("<qqqqqqq")  # acknowledged, written, state, closed, slots, slot bytes, reader waits
_ACKED, _WRITTEN, _STATE, _CLOSED, _WAITING = 0, 8, 16, 24, 48
_INT = struct.Struct("<q")
_STATE_WORDS = struct.Struct("<qq")  # written, state
_RECORD = struct.Struct("<qqq")  # per slot: kind (descriptor bytes, or a spill), batch index, weight version
RECORDS_AT = 64
_IN_RECORD = ("batch_index", "weight_version")  # a batch's values that only its record carries
RUNNING, DONE, FAILED = 0, 1, 2
SPILL_RING, SPILL_TEMP = -1, -2
WAKE_TIMEOUT_S = 0.05  # the reader's poll timeout: the backstop for a lost wake-up
_POLL_S = (0.0005, 0.005)  # a worker's wait for free slots: first sleep, longest sleep (doubling)


def data_at(slots: int) -> int:
    """Where slot 0 starts: after the header and the slots' records, page aligned."""
    return (RECORDS_AT + _RECORD.size * slots + 4095) & ~4095


def usable() -> bool:
    """Whether this platform has what the direct transport needs (posix_fallocate, FIFOs, poll)."""
    return hasattr(os, "posix_fallocate") and hasattr(os, "mkfifo") and hasattr(select, "poll")


def ring_path(directory: str, name: str, worker: int) -> str:
    return os.path.join(directory, f"ring-{name}-{worker}")


def fifo_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"wake-{name}")


def _spill_path(ring: str, seq: int, where: int) -> str:
    if where == SPILL_RING:
        return f"{ring}.{seq}.spill"
    parent, name = os.path.split(ring)
    return os.path.join(temp_spill_directory(parent), f"{name}.{seq}.spill")


class DirectWriter:
    """The worker side of one ring (made by the training process before the workers start)."""

    def __init__(self, path: str, fifo: str):
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        self.slots, self.slot_bytes = _HEADER.unpack_from(self.mm, 0)[4:6]
        self.data_at = data_at(self.slots)
        self.reserved = [0] * self.slots  # bytes of each slot backed by allocated shared memory
        self.parent = os.getppid()
        self.sent = 0
        self._descriptor: tuple = (None, b"")  # (layout, pickled descriptor) of the last batch without values
        try:
            self.wake_fd: int | None = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader any more: the closed flag or the parent's end stops us
            self.wake_fd = None

    def stopped(self) -> bool:
        """The training process closed the ring (its iterator ended) or is gone."""
        return _INT.unpack_from(self.mm, _CLOSED)[0] != 0 or os.getppid() != self.parent

    def _wait_for_slot(self) -> bool:
        """Until slot ``sent`` mod S is free (True), or the ring was closed or the parent died
        (False). A full ring is waited on until half of it is free: fewer wake-ups, as many batches.
        The parent is looked for only then (a system call): a ring nobody takes from fills up."""
        if self.sent < _INT.unpack_from(self.mm, _ACKED)[0] + self.slots:
            return _INT.unpack_from(self.mm, _CLOSED)[0] == 0
        delay = _POLL_S[0]
        while not self.stopped():
            if self.sent <= _INT.unpack_from(self.mm, _ACKED)[0] + self.slots // 2:
                return True
            time.sleep(delay)
            delay = min(2 * delay, _POLL_S[1])
        return False

    def put(self, batch: dict) -> bool:
        """Write ``batch`` (a packed batch) as the ring's next one; False when the ring was closed or
        the parent died (the worker should return)."""
        if not self._wait_for_slot():
            return False
        seq, slot = self.sent, self.sent % self.slots
        out, layout, pieces, size = encode(batch)
        head = self._descriptor_of(out, layout)
        base = self.data_at + slot * self.slot_bytes
        total = align(len(head)) + size
        if total <= self.slot_bytes and self._reserve(slot, base, total):
            self.mm[base : base + len(head)] = head
            write_pieces(self.mm, base + align(len(head)), pieces)
            kind = len(head)
        else:
            kind = self._spill(seq, batch)
        _RECORD.pack_into(self.mm, RECORDS_AT + _RECORD.size * slot, kind, batch["batch_index"],
                          batch["weight_version"])  # fmt: skip
        self.sent += 1
        _INT.pack_into(self.mm, _WRITTEN, self.sent)  # after the slot and its record (x86-64: in order)
        if _INT.unpack_from(self.mm, _WAITING)[0]:  # the reader sleeps on the FIFO (else: no system call)
            self._wake()
        return True

    def _descriptor_of(self, out: dict, layout: tuple) -> bytes:
        """The slot's pickled (values, layout), the values without those of the record (the last
        batch's bytes again when it had no values and the same layout)."""
        values = {k: v for k, v in out.items() if k not in _IN_RECORD}
        if values or layout != self._descriptor[0]:
            head = pickle.dumps((values, layout), protocol=pickle.HIGHEST_PROTOCOL)
            self._descriptor = (None, b"") if values else (layout, head)
            return head
        return self._descriptor[1]

    def _reserve(self, slot: int, base: int, size: int) -> bool:
        """Back ``size`` bytes of the slot with memory: writing to an unbacked page of a full tmpfs
        through a map would kill the process (SIGBUS); fallocate fails cleanly instead."""
        if size <= self.reserved[slot]:
            return True
        try:
            os.posix_fallocate(self.fd, base, size)
        except OSError:
            return False
        self.reserved[slot] = size
        return True

    def _spill(self, seq: int, batch: dict) -> int:
        """``batch`` pickled into its spill file (ring directory, else the temp directory); its kind."""
        data = pickle.dumps(inline(batch), protocol=pickle.HIGHEST_PROTOCOL)
        for where in (SPILL_RING, SPILL_TEMP):
            path = _spill_path(self.path, seq, where)
            try:
                if where == SPILL_TEMP:
                    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                return where
            except OSError as exc:
                error = exc
                try:
                    os.unlink(path)
                except OSError:
                    pass
        raise OSError(f"batch {batch['batch_index']} fits neither a ring slot nor a spill file: {error}")

    def _wake(self) -> None:
        if self.wake_fd is not None:
            try:
                os.write(self.wake_fd, b"\0")
            except OSError:  # full (the reader will look anyway) or no reader any more
                pass

    def finish(self, state: int) -> None:
        _INT.pack_into(self.mm, _STATE, state)
        self._wake()
        self.mm.close()
        os.close(self.fd)
        if self.wake_fd is not None:
            os.close(self.wake_fd)


def write_all(batches, path: str, fifo: str) -> None:
    """A `loader()` worker's stream: every batch of ``batches`` into the ring at ``path``, until the
    end, the ring's closing or the parent's end; the ring's state says done or failed."""
    try:
        writer = DirectWriter(path, fifo)
    except BaseException as exc:  # no ring to say so in: a marker file says it (`DirectRings.wait`)
        _mark_unopened(path, exc)
        raise
    try:
        for batch in batches:
            if not writer.put(batch):
                break
    except BaseException:
        writer.finish(FAILED)
        raise
    writer.finish(DONE)


def _unopened_path(ring: str) -> str:
    return f"{ring}.unopened"


def _mark_unopened(ring: str, exc: BaseException) -> None:
    """A worker that could not open its ring leaves a marker next to it (best effort: if the marker
    cannot be written either, the training process learns of the failure only once the other
    workers have ended, as the DataLoader delivers results in worker order)."""
    try:
        with open(_unopened_path(ring), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n")
    except OSError:
        pass


class _Ring:
    """The training process's side of one worker's ring."""

    def __init__(self, path: str, slots: int, slot_bytes: int):
        self.path = path
        tmp = f"{path}.{os.getpid()}.new"
        size = data_at(slots) + slots * slot_bytes
        self.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(self.fd, size)
            os.posix_fallocate(self.fd, 0, data_at(slots))
            self.mm = mmap.mmap(self.fd, size)
            _HEADER.pack_into(self.mm, 0, 0, 0, RUNNING, 0, slots, slot_bytes, 0)
            os.replace(tmp, path)  # a persistent worker's next iteration opens the new file by its name
        except BaseException:
            os.close(self.fd)
            os.unlink(tmp)
            raise
        self.slots, self.slot_bytes, self.data_at, self.taken = slots, slot_bytes, data_at(slots), 0
        self.spilled = 0  # batches read from spill files
        self.unopened = False  # its worker could not open it (`check_opened`)
        self._descriptor: tuple = (b"", None)  # (bytes, layout) of the last slot's descriptor without values

    def head(self) -> tuple[int, int] | None:
        """(batch index, weight version) of the next unread batch, or None."""
        if self.taken >= _INT.unpack_from(self.mm, _WRITTEN)[0]:
            return None
        _, g, version = _RECORD.unpack_from(self.mm, RECORDS_AT + _RECORD.size * (self.taken % self.slots))
        return g, version

    def take(self, keep: bool = True, widen: bool = False) -> dict | None:
        """The next batch (copied out, unsigned arrays as int64 when ``widen``; None when not
        ``keep``), acknowledged."""
        slot = self.taken % self.slots
        kind, g, version = _RECORD.unpack_from(self.mm, RECORDS_AT + _RECORD.size * slot)
        out = None
        if kind > 0:
            if keep:
                base = self.data_at + slot * self.slot_bytes
                values, layout = self._values_and_layout(base, kind)
                out = {"batch_index": g, "weight_version": version, **values}
                out = decode(out, layout, self.mm, base + align(kind), widen)
        else:
            path = _spill_path(self.path, self.taken, kind)
            self.spilled += 1
            if keep:
                with open(path, "rb") as f:
                    out = pickle.load(f)
            os.unlink(path)
        self.taken += 1
        _INT.pack_into(self.mm, _ACKED, self.taken)
        return out

    def _values_and_layout(self, base: int, kind: int) -> tuple[dict, tuple]:
        """The descriptor of the slot at ``base`` (see `DirectWriter._descriptor_of`), unpickled
        only when its bytes differ from the last one's without values."""
        raw = self.mm[base : base + kind]
        if raw == self._descriptor[0]:
            return {}, self._descriptor[1]
        values, layout = pickle.loads(raw)
        self._descriptor = (b"", None) if values else (raw, layout)
        return values, layout

    def state(self) -> int:
        return FAILED if self.unopened else _INT.unpack_from(self.mm, _STATE)[0]

    def check_opened(self) -> None:
        """A ring its worker has written nothing to yet: whether the worker left the marker of a
        ring it could not open (then `state` says failed)."""
        if not self.unopened and _INT.unpack_from(self.mm, _WRITTEN)[0] == 0:
            self.unopened = os.path.exists(_unopened_path(self.path))

    def stop(self) -> None:
        """Tell the worker to return (before its next batch, or at once while it waits for a slot)."""
        _INT.pack_into(self.mm, _CLOSED, 1)

    def release(self, unlink: bool) -> None:
        """Release the map (and remove the file and its unread spill files); a worker's marker of a
        ring it could not open is removed either way."""
        _remove(_unopened_path(self.path))
        if unlink:
            written = _INT.unpack_from(self.mm, _WRITTEN)[0]
            for seq in range(self.taken, written):
                kind = _RECORD.unpack_from(self.mm, RECORDS_AT + _RECORD.size * (seq % self.slots))[0]
                if kind < 0:
                    _remove(_spill_path(self.path, seq, kind))
            _remove(self.path)
        try:
            self.mm.close()
        except BufferError:  # a view of it is still alive somewhere: the map goes with it
            pass
        os.close(self.fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class DirectRings:
    """The training process's rings of one DataLoader iteration, and the FIFO that wakes it.

    Args:
        directory: the stream's ring directory (made here if missing).
        name: names this iteration's files (persistent workers keep the name of their first
            iteration: each iteration's new files replace the previous ones).
        workers: the DataLoader's num_workers.
        slots: S, slots per ring (batches a worker may be ahead of the training process).
    """

    def __init__(self, directory: str, name: str, workers: int, slots: int, slot_bytes: int = SLOT_BYTES):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.name = name
        self.fifo = fifo_path(directory, name)
        if not os.path.exists(self.fifo):
            os.mkfifo(self.fifo, 0o600)
        # our own write end keeps the FIFO from reading as closed (EOF) when no worker has it open
        self.wake_read = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.wake_write = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        self._poll = select.poll()  # (not select.select: no limit on the descriptor's number)
        self._poll.register(self.wake_read, select.POLLIN)
        self.rings: list[_Ring] = []
        try:
            for w in range(workers):
                self.rings.append(_Ring(ring_path(directory, name, w), slots, slot_bytes))
        except BaseException:
            self.release(unlink=True)
            raise

    def progress(self) -> tuple:
        """What the workers have written and their states (compare it with a later one)."""
        return tuple(_STATE_WORDS.unpack_from(ring.mm, _WRITTEN) for ring in self.rings)

    def wait(self, seen: tuple, timeout: float = WAKE_TIMEOUT_S) -> None:
        """Until a worker wrote (or ended) after ``progress()`` was ``seen``, or ``timeout``; the FIFO
        drained. The rings say that the reader waits (their workers then write a byte after each
        batch) before they are compared with ``seen`` once more."""
        for ring in self.rings:
            _INT.pack_into(ring.mm, _WAITING, 1)
        ready = self.progress() != seen or self._poll.poll(timeout * 1000)
        for ring in self.rings:
            _INT.pack_into(ring.mm, _WAITING, 0)
            if not ready:  # a timeout: a worker may have failed before it could write anything
                ring.check_opened()
        if ready:
            try:
                while len(os.read(self.wake_read, 65536)) == 65536:
                    pass
            except BlockingIOError:
                pass

    def waker(self) -> int:
        """A descriptor of its own (to close) whose one-byte write wakes `wait`: for another thread."""
        return os.dup(self.wake_write)

    def stop(self) -> None:
        """Every worker told to return (see `DirectWriter.stopped`)."""
        for ring in self.rings:
            ring.stop()

    def release(self, unlink: bool = True) -> None:
        """Maps and the FIFO's descriptors released (files removed unless persistent workers will
        open the next iteration's files under the same names)."""
        for ring in self.rings:
            ring.release(unlink)
        self.rings = []
        for fd in (self.wake_read, self.wake_write):
            os.close(fd)
        if unlink:
            _remove(self.fifo)
