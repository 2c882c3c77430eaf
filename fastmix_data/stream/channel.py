"""The weight channel: how weight changes in the training process reach every DataLoader worker.

A small directory holds ``history.json`` (the weight history, replaced atomically) and ``claims``
(a 40-byte header: history version, highest batch a claiming worker has started, pending flag,
grant, wanted). The training process writes the header under an exclusive ``fcntl.flock`` on
``lock``; so do claiming workers (below). Every process reads it through a shared read-only mapping.

Two kinds of reader (docs/stream.md, Live weights):

* *Optimistic* (`version`): the training process (``num_workers=0``) and `MixtureStream.loader`'s
  workers, whose batches the training process checks before serving them. Per batch they read the
  version from the mapping (no lock, no system call) and re-read the history when it changed; they
  build ahead under the history they know, and a batch found stale when served is rebuilt. A change
  applies at E = the first batch the training loop has not received.
* *Claiming* (`claim`): workers of a plain ``DataLoader(stream)``, whose batches reach the training
  loop unchecked. Before producing global batch g a worker claims it: under the lock it waits while a
  change is pending or while g is at or past the *grant*, raises the claimed high-water mark to g,
  and reads the history if its version changed. `set_weights` first marks a change pending and reads
  the high-water mark H, then (across ranks) agrees on E >= H + 1, appends the change at E and clears
  the flag, so every claimed batch is either before E or sees the new history.

The grant serves a stream that follows a publisher (:mod:`fastmix_data.live`): no batch at or past
the grant may be claimed (claiming workers) or served (`gate`, in the training process) until the
training process has asked the job-wide ledger for more (`install`), and the ledger places every
change at or past every grant it has given. A claimer blocked by the grant records the batch in
``wanted`` so that the training process knows to ask. Without following the grant is unlimited.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from fastmix_data.errors import CoordinationError
from fastmix_data.leftovers import sweep_run_dirs

_HEADER = struct.Struct("<qqqqq")  # history version, max claimed batch, pending flag, grant, wanted
UNLIMITED = 1 << 62  # the grant of a channel that does not follow a publisher
FAILED = 2  # pending flag: the job cannot go on; every claim raises the reason kept in ``error.txt``

_pid = [os.getpid()]  # this process's id, kept current across fork (read once per batch)
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


class WeightChannel:
    """File-based broadcast of the weight history to worker processes on one machine.

    Args:
        history: the initial history (JSON-serialisable list).
        first_batch: the first batch that will be served (claims start below it).
        gated: claims and `gate` need a grant (`install`); the grant starts at ``first_batch``.
    """

    def __init__(self, history: list, first_batch: int = 0, gated: bool = False):
        sweep_run_dirs(tempfile.gettempdir())  # channels of killed processes
        self.dir = tempfile.mkdtemp(prefix=f"fastmix-channel-{os.getpid()}-")  # the pid: see leftovers
        self.owner_pid = os.getpid()
        self.gated = gated
        #: called in the owner process with the batch a claim waits for, when it is past the grant
        self.refill: Callable[[int], None] | None = None
        self._local_version = -1
        self._fds: tuple[int, int] | None = None  # (lock, claims) opened by this process
        self._header: mmap.mmap | None = None  # ``claims`` mapped read-only by this process
        self._fd_pid = -1
        self._thread_lock = threading.Lock()
        self._lock_pid = _pid[0]
        self._write_history(history, version=0)
        with open(self._path("claims"), "wb") as f:
            f.write(_HEADER.pack(0, first_batch - 1, 0, self._initial_grant(first_batch), -1))
        open(self._path("lock"), "wb").close()
        atexit.register(self.close)

    def _initial_grant(self, first_batch: int) -> int:
        return first_batch if self.gated else UNLIMITED

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _open_fds(self) -> tuple[int, int]:
        """This process's descriptors of ``lock`` and ``claims``, opened once per process (a forked
        worker must not share the parent's open file description, or flock would not exclude it)."""
        if self._fds is None or self._fd_pid != _pid[0]:
            self._fds = (os.open(self._path("lock"), os.O_RDWR), os.open(self._path("claims"), os.O_RDWR))
            self._header = mmap.mmap(self._fds[1], _HEADER.size, access=mmap.ACCESS_READ)
            self._fd_pid = _pid[0]
        return self._fds

    @contextmanager
    def _locked(self):
        if self._lock_pid != _pid[0]:  # forked while another thread held it: a fresh lock
            self._thread_lock, self._lock_pid = threading.Lock(), _pid[0]
        with self._thread_lock:
            lock_fd, _ = self._open_fds()
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def _read_header(self) -> tuple[int, int, int, int, int]:
        """The header as last written by any process: read through a shared mapping of ``claims``
        (no system call; `claim` reads it once per batch)."""
        if self._fd_pid != _pid[0] or self._fds is None:
            self._open_fds()
        return _HEADER.unpack_from(self._header, 0)

    def _write_header(self, version: int, claimed: int, pending: int, grant: int, wanted: int) -> None:
        os.pwrite(self._open_fds()[1], _HEADER.pack(version, claimed, pending, grant, wanted), 0)

    def _write_history(self, history: list, version: int) -> None:
        tmp = self._path(f"history.json.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump({"version": version, "history": history}, f)
        os.replace(tmp, self._path("history.json"))

    def _read_history(self) -> tuple[int, list]:
        with open(self._path("history.json")) as f:
            doc = json.load(f)
        return doc["version"], doc["history"]

    # ------------------------------------------------------------------------------- workers
    def version(self, raise_failure: bool = True) -> int:
        """The history's version, read from the shared mapping (no lock, no system call): an
        optimistic reader calls it per batch and re-reads the history (`_read_history`) when it
        changed. Raises the reason of a `fail`ed channel unless not ``raise_failure``."""
        version, _, pending, _, _ = self._read_header()
        if pending == FAILED and raise_failure:
            self._raise_failure()
        return version

    def _raise_failure(self) -> None:
        with open(self._path("error.txt")) as f:
            raise CoordinationError(f.read())

    def gate(self, batch: int) -> None:
        """In the training process, before serving ``batch``: wait until it is below the grant
        (asking for more through ``refill``)."""
        delay = 0.0005
        while True:
            _, _, pending, grant, _ = self._read_header()
            if pending == FAILED:
                self._raise_failure()
            if batch < grant:
                return
            if self.refill is not None:
                self.refill(batch)  # may return before the job is ready: then wait and ask again
            time.sleep(delay)
            delay = min(2 * delay, 0.005)

    def claim(self, batch: int) -> list | None:
        """A claiming worker (see the module docstring): claim ``batch`` before producing it; return
        the history if it changed since the last call."""
        delay = 0.0005
        while True:
            with self._locked():
                version, claimed, pending, grant, wanted = self._read_header()
                if pending == FAILED:
                    self._raise_failure()
                if not pending and batch < grant:
                    if batch > claimed:
                        self._write_header(version, batch, 0, grant, wanted)
                    if version != self._local_version:
                        v, history = self._read_history()
                        self._local_version = v
                        return history
                    return None
                if batch >= grant and batch > wanted:
                    self._write_header(version, claimed, pending, grant, batch)
            time.sleep(delay)
            delay = min(2 * delay, 0.005)

    # ------------------------------------------------------------------------------- trainer
    def begin_change(self) -> int:
        """Mark a change pending (claiming workers pause before their next claim); return the highest
        batch a claiming worker has started (``first_batch - 1`` when none has)."""
        with self._locked():
            version, claimed, _, grant, wanted = self._read_header()
            self._write_header(version, claimed, 1, grant, wanted)
            return claimed

    def finish_change(self, history: list) -> int:
        """Publish ``history`` and clear the pending flag; return the new version."""
        with self._locked():
            version, claimed, _, grant, wanted = self._read_header()
            self._write_history(history, version + 1)
            self._write_header(version + 1, claimed, 0, grant, wanted)
            return version + 1

    def install(self, history: list | None, grant: int) -> None:
        """Raise the grant to ``grant`` and, when ``history`` is given, publish it first (a gated
        channel: the ledger's history and grant, read together)."""
        with self._locked():
            version, claimed, pending, old_grant, wanted = self._read_header()
            if history is not None:
                version += 1
                self._write_history(history, version)
            self._write_header(version, claimed, pending, max(old_grant, grant), wanted)

    def fail(self, reason: str) -> None:
        """Make every claim, gate and version read, in every process, raise `CoordinationError` with ``reason``."""
        with open(self._path("error.txt"), "w") as f:
            f.write(reason)
        with self._locked():
            version, claimed, _, grant, wanted = self._read_header()
            self._write_header(version, claimed, FAILED, grant, wanted)

    def progress(self) -> tuple[int, int, int]:
        """(max batch claimed by a worker; max batch a claim waits for (-1: none); grant). No lock."""
        _, claimed, _, grant, wanted = self._read_header()
        return claimed, wanted, grant

    def reset(self, history: list, first_batch: int) -> int:
        """Replace history and claims (after load_state_dict, before iterating); a gated channel's
        grant goes back to ``first_batch``. Returns the new version."""
        with self._locked():
            version = self._read_header()[0]
            self._write_history(history, version + 1)
            self._write_header(version + 1, first_batch - 1, 0, self._initial_grant(first_batch), -1)
            return version + 1

    def adopt(self, history: list) -> None:
        """Install a restored history if the channel's is older (a worker restoring its state)."""
        with self._locked():
            version, claimed, pending, grant, wanted = self._read_header()
            _, current = self._read_history()
            if current != history and (len(current) < len(history) or current == history[: len(current)]):
                self._write_history(history, version + 1)
                self._write_header(version + 1, claimed, pending, grant, wanted)

    def close(self) -> None:
        if self._fds is not None and self._fd_pid == os.getpid():
            if self._header is not None:
                self._header.close()
                self._header = None
            for fd in self._fds:
                os.close(fd)
            self._fds = None
        if os.getpid() == self.owner_pid and os.path.isdir(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_local_version"] = -1
        state["_fds"] = None
        state["_header"] = None
        state["_fd_pid"] = -1
        state["refill"] = None  # the training process's hook (a thread, store connections)
        del state["_thread_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()
        self._lock_pid = _pid[0]
