"""Where export work runs: on this machine (``local``) or as Ray tasks on a cluster (``ray``).

Design problem: indexing a corpus and writing resampled shards are many independent pieces of work
(one per input shard, one per output shard). One machine's cores and disk must not be the limit,
a worker that dies must not lose the run, and the result must not depend on where it ran.

Solution: a *job* is three plain module-level functions' worth of work: ``setup(context)`` builds
per-process state once (a resample's plan and readers), ``task(state, key)`` does one idempotent
piece of work and returns a :class:`TaskOutcome`. An engine runs the same job either in this
process / a local pool (:class:`LocalEngine`) or as Ray tasks (:class:`RayEngine`), which Ray
retries when their worker or node dies. Tasks own their outputs (a task writes only its own
files, atomically), so a retry, a duplicate attempt or a rerun after a killed driver produces the
same bytes. Both engines draw one progress bar over all tasks and count retries, bytes read and
written; :class:`RunStats` is the summary. See docs/manifest.md ("Beyond one machine").
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from fastmix_data.errors import FastMixDataError

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
DEFAULT_RAY_RETRIES = 3


@dataclass
class TaskOutcome:
    """What one task returns: its value and what it cost.

    Attributes:
        value: the task's result (must pickle).
        bytes_read: input bytes the task read (0 when unknown).
        bytes_written: output bytes it published.
        skipped: the output already existed and was verified; nothing was written.
        seconds: wall time of the task function (set by the engine).
    """

    value: Any
    bytes_read: int = 0
    bytes_written: int = 0
    skipped: bool = False
    seconds: float = 0.0


def _timed(job: Job, state: Any, task: Any) -> TaskOutcome:
    t0 = time.perf_counter()
    outcome = job.task(state, task)
    outcome.seconds = time.perf_counter() - t0
    return outcome


@dataclass(frozen=True)
class Job:
    """A unit of distributed work: ``task(setup(context), key)`` for every key.

    ``setup`` and ``task`` must be module-level functions (they are pickled by reference);
    ``context`` must pickle. ``setup`` runs once per worker process (and per job).
    """

    setup: Callable[[Any], Any]
    task: Callable[[Any, Any], TaskOutcome]
    context: Any


@dataclass
class RunStats:
    """The summary of one engine run (seconds of wall time, bytes)."""

    engine: str
    workers: int
    tasks: int = 0
    skipped: int = 0
    retries: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    task_seconds: float = 0.0

    @property
    def total_retries(self) -> int:
        return sum(self.retries.values())

    def add(self, outcome: TaskOutcome) -> None:
        self.bytes_read += outcome.bytes_read
        self.bytes_written += outcome.bytes_written
        self.skipped += bool(outcome.skipped)
        self.task_seconds += outcome.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine, "workers": self.workers, "tasks": self.tasks, "skipped": self.skipped,
            "retries": self.total_retries, "retried_tasks": dict(self.retries), "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3),
            "task_seconds": round(self.task_seconds, 3),
            "read_mb_per_s": round(self.bytes_read / 1e6 / max(self.seconds, 1e-9), 2),
            "write_mb_per_s": round(self.bytes_written / 1e6 / max(self.seconds, 1e-9), 2),
        }  # fmt: skip

    def summary(self, what: str) -> str:
        s = max(self.seconds, 1e-9)
        retried = ", ".join(f"{k}: {v}" for k, v in sorted(self.retries.items())[:5])
        return (
            f"{what}: {self.tasks} tasks ({self.skipped} already done) on {self.engine} with "
            f"{self.workers} worker(s) in {self.seconds:.1f} s; {self.total_retries} retried attempt(s)"
            + (f" ({retried})" if retried else "")
            + f"; read {self.bytes_read / 1e6:,.1f} MB ({self.bytes_read / 1e6 / s:,.1f} MB/s), "
            f"wrote {self.bytes_written / 1e6:,.1f} MB ({self.bytes_written / 1e6 / s:,.1f} MB/s)"
        )


def _bar(total: int, desc: str, progress: bool | None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="task", disable=None if progress is None else not progress)


def _postfix(bar: tqdm, stats: RunStats, t0: float) -> None:
    s = max(time.perf_counter() - t0, 1e-9)
    parts = [f"retries {stats.total_retries}"]
    parts += [
        f"{what} {n / 1e6 / s:,.1f} MB/s"
        for what, n in (("read", stats.bytes_read), ("wrote", stats.bytes_written))
        if n
    ]
    bar.set_postfix_str(", ".join(parts), refresh=False)


# ------------------------------------------------------------------------------------------ local
_STATE: dict[str, Any] = {}  # per pool or Ray worker process: {"key": job key, "state": setup(context)}


def _state_for(key: str, job: Job, context: Any) -> Any:
    if _STATE.get("key") != key:
        _STATE.clear()
        _STATE.update(key=key, state=job.setup(context))
    return _STATE["state"]


def _pool_init(key: str, job: Job) -> None:
    _state_for(key, job, job.context)


def _pool_task(args: tuple[str, Job, int, Any]) -> tuple[int, TaskOutcome]:
    key, job, i, task = args
    return i, _timed(job, _state_for(key, job, None), task)


class LocalEngine:
    """Tasks on this machine: in this process (``workers=1``), in a process pool, or in threads.

    Args:
        workers: processes (or threads) running tasks at once (default 1).
        threads: use a thread pool (I/O-bound jobs such as hashing shards) instead of processes.

    The process pool hands each worker a contiguous block of tasks (neighbouring output shards read
    neighbouring input shards). A worker that dies fails the run (rerun to resume); only Ray
    retries tasks.
    """

    name = "local"

    def __init__(self, workers: int = 1, *, threads: bool = False):
        if workers < 1:
            raise FastMixDataError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.threads = threads

    def threads_per_task(self) -> int:
        """CPU threads a task may use (the cores shared by the concurrent tasks)."""
        return max(1, (os.cpu_count() or 1) // self.workers)

    def run(
        self, job: Job, tasks: Sequence[Hashable], *, desc: str = "tasks", progress: bool | None = None
    ) -> tuple[list[Any], RunStats]:
        """Run ``job`` over ``tasks``; return the values in task order and the run's stats."""
        stats = RunStats(self.name, self.workers, len(tasks))
        values: list[Any] = [None] * len(tasks)
        t0 = time.perf_counter()
        key = uuid.uuid4().hex
        with _bar(len(tasks), desc, progress) as bar:
            for i, outcome in self._outcomes(key, job, tasks):
                values[i] = outcome.value
                stats.add(outcome)
                _postfix(bar, stats, t0)
                bar.update(1)
        stats.seconds = time.perf_counter() - t0
        return values, stats

    def _outcomes(self, key: str, job: Job, tasks: Sequence[Hashable]):
        workers = min(self.workers, len(tasks))
        if workers <= 1:  # this process: a local state (another thread may run another job)
            state = job.setup(job.context)
            for i, task in enumerate(tasks):
                yield i, _timed(job, state, task)
        elif self.threads:
            state = job.setup(job.context)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                yield from enumerate(pool.map(lambda t: _timed(job, state, t), tasks))
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            chunk = -(-len(tasks) // workers)
            with multiprocessing.get_context(method).Pool(workers, _pool_init, (key, job)) as pool:
                light = Job(job.setup, job.task, None)  # the context went to the initializer once
                args = [(key, light, i, t) for i, t in enumerate(tasks)]
                yield from pool.imap_unordered(_pool_task, args, chunksize=chunk)


# ------------------------------------------------------------------------------------------ ray
def import_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise FastMixDataError(
            "engine='ray' needs Ray: pip install 'fastmix-data[ray]' (or pip install ray)"
        ) from None
    return ray


class _Attempts:
    """A Ray actor counting the attempts of each task (attempts - 1 = retries after a worker died)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def started(self, task: str) -> int:
        self.counts[task] = self.counts.get(task, 0) + 1
        return self.counts[task]

    def retries(self) -> dict[str, int]:
        return {k: v - 1 for k, v in self.counts.items() if v > 1}


def _ray_task(key: str, job: Job, boxed_context: list, task: Any, attempts: Any) -> TaskOutcome:
    ray = import_ray()
    ray.get(attempts.started.remote(str(task)))
    # the context travels boxed so that Ray does not fetch it for every task; fetched once per worker
    state = _STATE["state"] if _STATE.get("key") == key else _state_for(key, job, ray.get(boxed_context[0]))
    return _timed(job, state, task)


class RayEngine:
    """Tasks on a Ray cluster, each retried by Ray when its worker or node dies.

    Args:
        address: the cluster (``"127.0.0.1:6379"``, ``"auto"``, ``"local"`` for a new local
            cluster); default: an already initialised Ray, else ``RAY_ADDRESS``, else the cluster
            ``ray start`` started on this machine, else a new local one.
        workers: the most tasks running at once (default: the cluster's CPUs).
        max_retries: Ray retries of a task whose worker died (default 3). Errors raised by a task
            (bad input) are not retried: they end the run with the task's own exception.
        num_cpus: CPUs of a new local cluster (default: all).
        cpus_per_task: Ray CPUs each task reserves (default 1).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        *,
        max_retries: int = DEFAULT_RAY_RETRIES,
        num_cpus: int | None = None,
        cpus_per_task: float = 1,
    ):
        if workers is not None and workers < 1:
            raise FastMixDataError(f"workers must be >= 1, got {workers}")
        self.address = address
        self.workers = workers
        self.max_retries = int(max_retries)
        self.num_cpus = num_cpus
        self.cpus_per_task = cpus_per_task

    def threads_per_task(self) -> int:
        return max(1, int(self.cpus_per_task))

    def connect(self) -> Any:
        """Initialise Ray once per process (keeps a cluster the caller already connected to)."""
        ray = import_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": self.address}
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            if self.address in (None, "local"):
                kwargs["include_dashboard"] = False
            ray.init(**kwargs)
        return ray

    def run(
        self, job: Job, tasks: Sequence[Hashable], *, desc: str = "tasks", progress: bool | None = None
    ) -> tuple[list[Any], RunStats]:
        """Run ``job`` over ``tasks`` as Ray tasks; values in task order and the run's stats."""
        ray = self.connect()
        slots = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_task))
        window = self.workers or 2 * slots  # queued beyond the free CPUs: no idle gap between tasks
        stats = RunStats(self.name, slots, len(tasks))
        values: list[Any] = [None] * len(tasks)
        t0 = time.perf_counter()
        key = uuid.uuid4().hex
        boxed = [ray.put(job.context)]
        light = Job(job.setup, job.task, None)
        attempts = ray.remote(_Attempts).options(num_cpus=0).remote()
        remote = ray.remote(_ray_task).options(
            num_cpus=self.cpus_per_task, max_retries=self.max_retries, retry_exceptions=False
        )
        pending: dict[Any, int] = {}
        todo = iter(enumerate(tasks))
        try:
            with _bar(len(tasks), desc, progress) as bar:
                while True:
                    while len(pending) < window and (nxt := next(todo, None)) is not None:
                        pending[remote.remote(key, light, boxed, nxt[1], attempts)] = nxt[0]
                    if not pending:
                        break
                    for ref in _ready(ray, list(pending)):
                        i = pending.pop(ref)
                        outcome = _get(ray, ref)
                        values[i] = outcome.value
                        stats.add(outcome)
                        bar.update(1)
                    _postfix(bar, stats, t0)
                stats.retries = ray.get(attempts.retries.remote())
                _postfix(bar, stats, t0)
        finally:
            for ref in pending:  # a task failed: stop the rest (their outputs are atomic anyway)
                ray.cancel(ref, force=True)
            ray.kill(attempts)
        stats.seconds = time.perf_counter() - t0
        return values, stats


def _ready(ray: Any, refs: list) -> list:
    """The finished tasks among ``refs``: waits for one, then takes every other one already done."""
    ready, rest = ray.wait(refs, num_returns=1)
    if rest:
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
        ready += more
    return ready


def _get(ray: Any, ref: Any) -> TaskOutcome:
    """A task's outcome; a task's own exception is re-raised as itself (not wrapped by Ray)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else None
        if cause is not None:
            raise cause from None
        raise


def get_engine(
    engine: str | LocalEngine | RayEngine | None = "local",
    workers: int | None = None,
    *,
    ray_address: str | None = None,
    threads: bool = False,
) -> LocalEngine | RayEngine:
    """An engine from a name (``"local"``, ``"ray"``) or an engine object (returned as is).

    Args:
        workers: local processes/threads (default 1) or Ray tasks at once (default: cluster CPUs).
        ray_address: see :class:`RayEngine`.
        threads: local engine only: a thread pool instead of processes.
    """
    if engine is None:
        engine = "local"
    if not isinstance(engine, str):
        return engine
    if engine == "local":
        return LocalEngine(workers or 1, threads=threads)
    if engine == "ray":
        return RayEngine(ray_address, workers)
    raise FastMixDataError(f"unknown engine {engine!r}; use one of {ENGINES}")
