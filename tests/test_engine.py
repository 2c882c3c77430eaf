"""The local engine: same values in task order whether tasks run in-process, in threads or processes."""

from __future__ import annotations

import os

import pytest

from fastmix_data.engine import Job, LocalEngine, RayEngine, TaskOutcome, get_engine
from fastmix_data.errors import FastMixDataError


def _setup(context: dict) -> dict:
    return {"scale": context["scale"], "pid": os.getpid()}


def _task(state: dict, key: int) -> TaskOutcome:
    if key < 0:
        raise FastMixDataError(f"bad key {key}")
    return TaskOutcome(
        (key * state["scale"], state["pid"]), bytes_read=key, bytes_written=2 * key, skipped=key == 0
    )


JOB = Job(_setup, _task, {"scale": 3})


@pytest.mark.parametrize("workers,threads", [(1, False), (2, True), (2, False)])
def test_values_in_task_order_and_stats(workers, threads):
    values, stats = LocalEngine(workers, threads=threads).run(JOB, list(range(7)), progress=False)
    assert [v[0] for v in values] == [3 * k for k in range(7)]
    pids = {v[1] for v in values}
    in_process = workers == 1 or threads
    assert (pids == {os.getpid()}) if in_process else (os.getpid() not in pids)
    assert (stats.tasks, stats.skipped, stats.bytes_read, stats.bytes_written) == (7, 1, 21, 42)
    assert stats.total_retries == 0 and stats.engine == "local" and stats.workers == workers
    summary = stats.summary("test")
    assert "7 tasks (1 already done)" in summary and "0 retried" in summary


def test_a_task_error_ends_the_run_with_its_own_exception():
    with pytest.raises(FastMixDataError, match="bad key -1"):
        LocalEngine(2).run(JOB, [1, -1, 2], progress=False)


def test_get_engine():
    assert isinstance(get_engine("local", 3), LocalEngine) and get_engine("local", 3).workers == 3
    ray_engine = get_engine("ray", None, ray_address="127.0.0.1:1")
    assert isinstance(ray_engine, RayEngine) and ray_engine.address == "127.0.0.1:1"
    assert get_engine(ray_engine) is ray_engine
    with pytest.raises(FastMixDataError, match="unknown engine 'spark'"):
        get_engine("spark")
    with pytest.raises(FastMixDataError, match="workers must be >= 1"):
        LocalEngine(0)
