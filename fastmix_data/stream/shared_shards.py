"""Decode each shard once per machine, not once per DataLoader worker.

Design problem: worker w serves batches w, w + W, ...; neighbouring batches draw from the same
shards, so every worker needs every shard and, alone, each would decode all of them: decode work
grows with the number of workers instead of being split among them.

Solution: a fixed set of *slot files* in shared memory (``/dev/shm`` when it exists). The shard with
key k lives in slot hash(k) mod S as an uncompressed Arrow IPC stream behind a 64-byte header
(key hash, generation, length). The first worker to need a shard takes the slot's ``flock``, decodes
the shard and writes it there; the others read it back (one ``pread`` and a zero-copy Arrow view)
instead of decoding. Slot files are overwritten in place, so their pages stay allocated and a write
is a memory copy (a new file per shard would pay a page fault per 4 KiB). Workers visit a block's
shards in rotated orders (worker w starts w/W of the way through), so they decode different shards
at the same time.

Readers do not lock: they check the header before and after reading the payload, and a writer
changes the generation before and after writing (a sequence lock), so a torn read is detected and
treated as a miss. Everything here is a cache of pure functions of (size-checked) shards: a miss, a
slot taken over by another shard, or shared memory that is too small only means decoding again.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Callable

import pyarrow as pa

from fastmix_data.leftovers import sweep_run_dirs

_HEADER = struct.Struct("<QQQ")  # key hash (0: empty), generation (odd while written), payload bytes
_PAYLOAD_AT = 64
DEFAULT_BUDGET_BYTES = 256 << 20  # shared memory the slots may hold, in all


SHM_ENV = "FASTMIX_DATA_SHM"  # a directory to use instead of /dev/shm (e.g. one per simulated host in tests)


def _shared_root() -> str:
    shm = os.environ.get(SHM_ENV) or "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") | 1


class SharedShards:
    """Decoded shards shared by the DataLoader worker processes of one stream, on one machine.

    Args:
        slots: number of slot files (each holds one decoded shard at a time).
        enabled: False when shared memory is too small for ``slots`` times the largest shard.
    """

    def __init__(self, slots: int, enabled: bool = True):
        self.slots = int(slots)
        self.enabled = enabled
        # Made by the first worker that shares a shard (a stream that never has 2+ workers leaves no
        # trace); the name is unique to this stream object in this process.
        sweep_run_dirs(_shared_root())  # slots of killed processes (the pid in the name, see leftovers)
        self.dir = os.path.join(_shared_root(), f"fastmix-shards-{os.getpid()}-{id(self):x}-{os.urandom(4).hex()}")
        self.owner_pid = os.getpid()
        self._fds: dict[int, int] = {}
        self._fd_pid = -1
        atexit.register(self.close)

    @classmethod
    def for_shards(cls, max_shard_bytes: int, min_slots: int, budget: int = DEFAULT_BUDGET_BYTES) -> SharedShards:
        """As many slots as ``budget`` holds of the largest decoded shard (at least ``min_slots``;
        disabled when even those do not fit in half of the free shared memory)."""
        per_slot = max(1, int(max_shard_bytes)) + _PAYLOAD_AT
        slots = max(min_slots, min(1024, budget // per_slot))
        try:
            st = os.statvfs(_shared_root())
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        return cls(slots, enabled=slots * per_slot <= free // 2)

    def _fd(self, slot: int) -> int:
        if self._fd_pid != os.getpid():  # descriptors (and their flocks) are per process
            self._fds, self._fd_pid = {}, os.getpid()
        fd = self._fds.get(slot)
        if fd is None:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = self._fds[slot] = os.open(os.path.join(self.dir, f"slot-{slot}"), os.O_RDWR | os.O_CREAT, 0o600)
        return fd

    def get(self, key: str, decode: Callable[[], pa.Table]) -> pa.Table:
        """The decoded table of ``key``: read from the slot another worker filled, or ``decode()``d
        here and written to the slot."""
        if not self.enabled:
            return decode()
        kh = _key_hash(key)
        try:
            fd = self._fd(kh % self.slots)
        except OSError:  # shared memory unwritable
            self.enabled = False
            return decode()
        table = _read(fd, kh)
        if table is not None:
            return table
        fcntl.flock(fd, fcntl.LOCK_EX)  # another worker may be decoding this very shard: wait for it
        try:
            table = _read(fd, kh)
            if table is None:
                table = decode()
                try:
                    _write(fd, kh, table)
                except OSError:  # shared memory full: keep serving, stop sharing
                    self.enabled = False
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return table

    def close(self) -> None:
        if self._fd_pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}
        if os.getpid() == self.owner_pid and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"], state["_fd_pid"] = {}, -1
        return state


def _read(fd: int, kh: int) -> pa.Table | None:
    head = os.pread(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size:
        return None
    key, gen, size = _HEADER.unpack(head)
    if key != kh or gen % 2:
        return None
    payload = os.pread(fd, size, _PAYLOAD_AT)
    if os.pread(fd, _HEADER.size, 0) != head or len(payload) != size:
        return None  # a writer took the slot meanwhile
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()


def _write(fd: int, kh: int, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    payload = sink.getvalue()
    head = os.pread(fd, _HEADER.size, 0)
    gen = _HEADER.unpack(head)[1] if len(head) == _HEADER.size else 0
    gen += 1 + gen % 2  # odd: being written
    os.pwrite(fd, _HEADER.pack(0, gen, 0), 0)
    os.pwrite(fd, payload, _PAYLOAD_AT)
    os.pwrite(fd, _HEADER.pack(kh, gen + 1, len(payload)), 0)
