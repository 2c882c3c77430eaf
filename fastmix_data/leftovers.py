"""Leftovers of dead processes, removed at the next start, by pid liveness.

A process killed with SIGKILL (or by the OOM killer, or a node failure) runs no ``atexit`` hook, so
what it was using stays behind: its weight-channel directory in the temp dir
(``fastmix-channel-<pid>-*``), its batch rings and decoded-shard slots in ``/dev/shm``
(``fastmix-rings-<pid>-*``, ``fastmix-shards-<pid>-*``), and the temporary file of an atomic write
it had begun in a state, cache or output directory (``.<name>.<pid>.<random>.tmp``, or the older
``.<name>.tmp<pid>`` / ``.<name>.tmp-<pid>``). Every such name carries the pid of the process that
made it. The next process that makes one of its kind removes those whose pid is no longer alive
(`os.kill(pid, 0)` fails with ``ProcessLookupError``) and that belong to the same user; a live
process's leftovers are never touched. Each directory is swept once per process.

Limits: a pid reused by a new process keeps a leftover until that process ends too; containers that
share ``/tmp`` or ``/dev/shm`` across pid namespaces would see each other's live processes as dead,
so do not share these directories across pid namespaces (or set ``FASTMIX_DATA_NO_SWEEP=1``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading

log = logging.getLogger(__name__)

RUN_DIR = re.compile(r"^fastmix-(?:channel|rings|shards)-(\d+)-")
TEMP_FILE = re.compile(r"^\..+?(?:\.(\d+)\.[a-z0-9_]{8}\.tmp|\.tmp-?(\d+))$")
_SWEPT: set[tuple[int, str, str]] = set()  # (pid, directory, kind) swept by this process
_LOCK = threading.Lock()


def pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists (a process we may not signal counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    return True


def temp_prefix(path: str | os.PathLike) -> str:
    """The ``mkstemp`` prefix of an atomic write to ``path``: ``.<name>.<pid>.`` (with suffix ``.tmp``,
    the names `sweep_temp_files` recognises)."""
    return f".{os.path.basename(os.fspath(path))}.{os.getpid()}."


def _first_time(directory: str, kind: str) -> bool:
    key = (os.getpid(), os.path.abspath(directory), kind)
    with _LOCK:
        if key in _SWEPT:
            return False
        _SWEPT.add(key)
    return not os.environ.get("FASTMIX_DATA_NO_SWEEP")


def _dead_and_ours(path: str, pid: int) -> bool:
    try:
        owner = os.lstat(path).st_uid
    except OSError:
        return False
    return owner == os.geteuid() and not pid_alive(pid)


def _sweep(directory: str, kind: str, pid_of, is_kind, remove) -> list[str]:
    """Remove the entries of ``directory`` whose name gives a pid (``pid_of``) that is dead and that
    are ``is_kind`` and ours; once per directory and kind per process."""
    if not _first_time(directory, kind):
        return []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        pid = pid_of(name)
        path = os.path.join(directory, name)
        if pid is not None and is_kind(path) and _dead_and_ours(path, pid):
            try:
                remove(path)
            except OSError:
                continue
            removed.append(path)
    if removed:
        log.info("removed %d %s leftover(s) of dead processes in %s", len(removed), kind, directory)
    return removed


def _temp_pid(name: str) -> int | None:
    match = TEMP_FILE.match(name)
    return None if match is None else int(match.group(1) or match.group(2))


def _run_dir_pid(name: str) -> int | None:
    match = RUN_DIR.match(name)
    return None if match is None else int(match.group(1))


def sweep_temp_files(directory: str | os.PathLike) -> list[str]:
    """Remove the temporary files that dead processes' atomic writes left in ``directory`` (once per
    directory per process). Returns the removed paths."""
    return _sweep(os.fspath(directory), "temp", _temp_pid, os.path.isfile, os.unlink)


def sweep_run_dirs(root: str | os.PathLike) -> list[str]:
    """Remove ``fastmix-{channel,rings,shards}-<pid>-*`` directories under ``root`` whose process is
    dead (once per root per process). Returns the removed paths."""
    is_dir = lambda path: os.path.isdir(path) and not os.path.islink(path)  # noqa: E731
    return _sweep(os.fspath(root), "run", _run_dir_pid, is_dir, shutil.rmtree)
