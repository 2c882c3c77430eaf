"""Batches from DataLoader workers to the training process through shared memory, not the pipe:
the payload format (`encode`, `decode`) and the per-item path's ring.

`MixtureStream.loader` uses, by default, the direct transport of
:mod:`fastmix_data.stream.direct_ring` (the same payload in per-worker rings that the training
process reads itself, past the DataLoader's queues); the per-item ring below is its fallback (a
DataLoader ``timeout``; no FIFOs). What follows describes the per-item ring.

Design problem: a DataLoader worker hands each batch to the training process by pickling it into a
pipe. A batch of 32 texts is ~100 KB; the pipe moves it in 64 KiB pieces with a wake-up each, and
both processes pay for it. On a small machine that costs more CPU than mixing the batch.

Solution: each worker iteration writes its batches into a *ring file* in shared memory
(``/dev/shm`` when it exists) of S slots; batch j of the iteration goes to slot j mod S and the
worker returns only a small descriptor (where the arrays and texts are). The training process
copies the batch out (texts become ``str``) and acknowledges it by writing how many batches of that
ring it has taken into the ring's header. A worker writes a slot only when the batch that used it
before has been acknowledged; if not, or if the batch does not fit in a slot, or shared memory is
full, the batch is returned inline as before. So nothing waits on the ring and nothing is lost.

With `MixtureStream.loader`, at most (prefetch items + 1) * batches_per_item batches of a worker are
between it and the training loop, so S = that + 2 slots are always free in time; the fallback is for
other uses.

Slot payload: each numpy array at a 64-byte aligned offset; a text column as an int64 array of the
rows' UTF-8 byte lengths (-1 for a missing value) followed by the rows' bytes back to back (encoded
and decoded with ``surrogatepass``, so any Python str survives).
"""

from __future__ import annotations

import atexit
import itertools
import mmap
import os
import shutil
import struct
import tempfile
from array import array
from typing import Any

import numpy as np

from fastmix_data.leftovers import sweep_run_dirs

_ACKED = struct.Struct("<q")  # header: batches of this ring the training process has taken
DATA_AT = 4096
SLOT_BYTES = 8 << 20  # a batch larger than this goes inline
RING_KEY = "_ring"
_TEXT_KINDS = {str, memoryview, type(None)}


SHM_ENV = "FASTMIX_DATA_SHM"  # another directory than /dev/shm for the rings


def _shared_root() -> str:
    """``$FASTMIX_DATA_SHM``, else ``/dev/shm``, when it exists and is writable; else the temp directory."""
    shm = os.environ.get(SHM_ENV) or "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


def align(n: int) -> int:
    return (n + 63) & ~63


class RingWriter:
    """The worker side: one ring file per worker iteration.

    Args:
        directory: the stream's ring directory (made here if missing).
        worker: the DataLoader worker id (rings of one worker replace each other).
        slots: S, the number of slots.
    """

    def __init__(self, directory: str, worker: int, slots: int, slot_bytes: int = SLOT_BYTES):
        self.slots = int(slots)
        self.slot_bytes = int(slot_bytes)
        self.worker = worker
        self.sent = 0
        self.fd: int | None = None
        self.mm: mmap.mmap | None = None
        self.reserved = [0] * self.slots  # bytes of each slot backed by allocated shared memory
        if not hasattr(os, "posix_fallocate"):  # (macOS) no safe way to back the map: send inline
            return
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.path = os.path.join(directory, f"ring-{worker}-{os.getpid()}-{os.urandom(4).hex()}")
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(self.fd, DATA_AT + self.slots * self.slot_bytes)
            os.posix_fallocate(self.fd, 0, DATA_AT)
            self.mm = mmap.mmap(self.fd, DATA_AT + self.slots * self.slot_bytes)
        except OSError:
            self.close()

    def send(self, batch: dict) -> dict:
        """The descriptor of ``batch`` written to the next slot, or ``batch`` itself (texts as
        ``str``) when the slot is still held by the training process, the batch does not fit, or
        shared memory is full."""
        mm = self.mm
        if mm is None:
            return inline(batch)
        seq = self.sent
        if seq >= _ACKED.unpack_from(mm, 0)[0] + self.slots:
            return inline(batch)
        out, layout, pieces, size = encode(batch)
        if size > self.slot_bytes:
            return inline(batch)
        slot = seq % self.slots
        base = DATA_AT + slot * self.slot_bytes
        if size > self.reserved[slot]:
            # Back the slot with memory first: writing to an unbacked page of a full tmpfs through
            # a map would kill the process (SIGBUS); fallocate fails cleanly instead.
            try:
                os.posix_fallocate(self.fd, base, size)
            except OSError:  # shared memory full: stop using the ring
                self.close()
                return inline(batch)
            self.reserved[slot] = size
        write_pieces(mm, base, pieces)
        self.sent += 1
        out[RING_KEY] = (self.worker, self.path, seq, base, layout)
        return out

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RingReader:
    """The training-process side: turns descriptors back into batches and acknowledges them.

    Args:
        directory: the stream's ring directory; removed by `close` (and at exit).
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.owner_pid = os.getpid()
        self._maps: dict[int, tuple[str, int, mmap.mmap]] = {}  # worker -> (path, fd, map)
        atexit.register(self.close)

    def receive(self, batch: dict) -> dict:
        """``batch`` with its ring payload copied out (arrays owned by the batch, texts as str)."""
        ring = batch.get(RING_KEY)
        if ring is None:
            return batch
        worker, path, seq, base, layout = ring
        mm = self._map(worker, path)
        out = decode({k: v for k, v in batch.items() if k != RING_KEY}, layout, mm, base)
        _ACKED.pack_into(mm, 0, seq + 1)
        return out

    def _map(self, worker: int, path: str) -> mmap.mmap:
        held = self._maps.get(worker)
        if held is not None and held[0] == path:
            return held[2]
        if held is not None:  # the worker started a new iteration: its old ring is done
            self._release(held, unlink=True)
        fd = os.open(path, os.O_RDWR)
        mm = mmap.mmap(fd, os.fstat(fd).st_size)
        self._maps[worker] = (path, fd, mm)
        return mm

    @staticmethod
    def _release(held: tuple[str, int, mmap.mmap], unlink: bool) -> None:
        path, fd, mm = held
        try:
            mm.close()
        except BufferError:  # a view of it is still alive somewhere: the map goes with it
            pass
        os.close(fd)
        if unlink:
            try:
                os.unlink(path)
            except OSError:
                pass

    def close(self) -> None:
        for held in self._maps.values():
            self._release(held, unlink=False)
        self._maps = {}
        if os.getpid() == self.owner_pid:
            # the ring directory, and its twin in the temp directory (spill files, see direct_ring)
            for directory in (self.directory, temp_spill_directory(self.directory)):
                if os.path.isdir(directory):
                    shutil.rmtree(directory, ignore_errors=True)


def encode(batch: dict) -> tuple[dict, tuple, list, int]:
    """A batch's slot payload: (the values that are not arrays or texts, the layout of the payload,
    its pieces ((offset, bytes-like) from the payload's start; `write_pieces`), its size in bytes).

    Each numpy array (or tuple of arrays) at a 64-byte aligned offset; a text column (a list of str,
    UTF-8 memoryviews and None) as an int64 array of the rows' byte lengths (-1: None) and the rows'
    bytes back to back. The layout's offsets are relative to the payload's start (`decode`)."""
    layout: list[tuple] = []
    pieces: list = []
    out = {}
    size = 0

    def put(part) -> int:  # after the previous part, padded to 64 bytes (the padding is not written)
        nonlocal size
        at = size
        pieces.append((at, part))
        size = align(size + len(part))
        return at

    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            layout.append(("array", key, value.dtype.str, value.shape, put(_bytes_of(value))))
        elif isinstance(value, tuple) and value and all(isinstance(v, np.ndarray) for v in value):
            entries = tuple((v.dtype.str, v.shape, put(_bytes_of(v))) for v in value)
            layout.append(("arrays", key, entries, None, None))
        elif isinstance(value, list) and (kinds := set(map(type, value))) <= _TEXT_KINDS:
            lengths, data = _text_parts(value, kinds)
            at_lengths = put(lengths)
            at_text = put(data)
            layout.append(("text", key, len(value), at_lengths, at_text))
        else:
            out[key] = value
    return out, tuple(layout), pieces, size


def _text_parts(rows: list, kinds: set) -> tuple[bytes, bytes]:
    """A text column's two slot parts: the rows' UTF-8 byte lengths as int64 (-1: None) and the rows'
    bytes back to back. Arrow rows (UTF-8 memoryviews, the common case) take two C-level passes (an
    ``array`` of their lengths, one ``bytes.join``) and no per-row bytecode."""
    if kinds == {memoryview}:
        return array("q", map(len, rows)).tobytes(), b"".join(rows)
    encoded = [v.encode("utf-8", "surrogatepass") if type(v) is str else v for v in rows]
    lengths = array("q", [-1 if v is None else len(v) for v in encoded])
    return lengths.tobytes(), b"".join([v for v in encoded if v is not None])


def decode(out: dict, layout: tuple, mm: mmap.mmap, base: int, widen: bool = False) -> dict:
    """``out`` with the arrays and texts of the payload at ``base`` of ``mm`` (see `encode`) copied in
    (arrays owned by the batch, unsigned ones as int64 when ``widen``: token ids, widened in the
    copy; texts as str)."""
    for kind, key, a, b, c in layout:
        if kind == "array":
            out[key] = _array(mm, base + c, a, b, widen)
        elif kind == "arrays":
            out[key] = tuple(_array(mm, base + at, dtype, shape, widen) for dtype, shape, at in a)
        else:  # text: a = rows, b = offset of the lengths (bytes), c = offset of the UTF-8 bytes
            out[key] = _texts(mm, a, base + b, base + c)
    return out


def write_pieces(mm: mmap.mmap, at: int, pieces: list) -> None:
    """The pieces of `encode` written into ``mm``, the payload starting at ``at``."""
    for offset, piece in pieces:
        mm[at + offset : at + offset + len(piece)] = piece


def _bytes_of(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array)).cast("B")


def inline(batch: dict) -> dict:
    """``batch`` as the DataLoader pipe can carry it: UTF-8 memoryview texts become ``str``."""
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, list) and any(type(v) is memoryview for v in value):
            out[key] = [str(v, "utf-8", "surrogatepass") if type(v) is memoryview else v for v in value]
    return out


def _array(mm: mmap.mmap, at: int, dtype: str, shape: Any, widen: bool = False) -> np.ndarray:
    view = np.ndarray(shape, dtype=dtype, buffer=mm, offset=at)
    return view.astype(np.int64) if widen and view.dtype.kind == "u" else view.copy()


def _texts(mm: mmap.mmap, rows: int, at_lengths: int, at_text: int) -> list:
    """The text column of a slot as ``str`` (None for a missing value): each row decoded straight
    from the map (no copy of the column's bytes first); the lengths read as a list and summed into
    the rows' ends in C (numpy's reductions cost more than the sums on 32 rows)."""
    with memoryview(mm) as whole:
        lengths = whole[at_lengths : at_lengths + 8 * rows].cast("q").tolist()
        missing = rows > 0 and min(lengths) < 0
        sizes = [max(n, 0) for n in lengths] if missing else lengths
        ends = list(itertools.accumulate(sizes, initial=at_text))
        out = [str(whole[i:j], "utf-8", "surrogatepass") for i, j in zip(ends, ends[1:])]
    if missing:
        out = [None if n < 0 else t for n, t in zip(lengths, out)]
    return out


def temp_spill_directory(directory: str) -> str:
    """Where the direct transport's spill files go when the ring directory ``directory`` is full: a
    directory of the same name (so with the training process's pid: `fastmix_data.leftovers` removes
    it once that process is dead) in the temp directory."""
    return os.path.join(tempfile.gettempdir(), os.path.basename(directory))


def ring_directory() -> str:
    """A fresh ring directory name for one stream (made by the first worker that writes); rings of
    killed processes are removed first (the pid in the name, see `fastmix_data.leftovers`)."""
    sweep_run_dirs(_shared_root())
    return os.path.join(_shared_root(), f"fastmix-rings-{os.getpid()}-{os.urandom(4).hex()}")
