"""DataLoader workers of a MixtureStream run without transparent huge pages (fastmix_data.stream.worker_memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from shardgen import make_docs, write_parquet_source

from fastmix_data import MixtureStream
from fastmix_data.stream import worker_memory

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/status") or "THP_enabled" not in open("/proc/self/status").read(),
    reason="needs Linux's THP_enabled in /proc/self/status",
)

PROBE = (
    "import sys\n"
    "from fastmix_data.stream.worker_memory import disable_huge_pages\n"
    "done = disable_huge_pages()\n"
    "status = open('/proc/self/status').read().split('THP_enabled:')[1].split()[0]\n"
    "print(done, status)\n"
)


def _thp_enabled() -> str:
    return open("/proc/self/status").read().split("THP_enabled:")[1].split()[0]


def _probe(**env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    return out.stdout.split()


def test_disable_huge_pages_turns_them_off_for_the_calling_process_only():
    before = _thp_enabled()
    assert _probe(FASTMIX_DATA_WORKER_THP="") == ["True", "0"]
    assert _thp_enabled() == before  # this process (the "training process") is untouched


def test_keep_leaves_huge_pages_on():
    assert _probe(FASTMIX_DATA_WORKER_THP="keep") == ["False", _thp_enabled()]


def test_loader_workers_run_without_huge_pages(tmp_path, monkeypatch):
    src = write_parquet_source(tmp_path / "a", make_docs(200), shards=2)
    seen = tmp_path / "seen"
    seen.mkdir()
    real = worker_memory.disable_huge_pages

    def spy() -> bool:  # inherited by the forked workers: records what each worker ends up with
        done = real()
        (seen / str(os.getpid())).write_text(f"{done} {_thp_enabled()}")
        return done

    monkeypatch.setattr(worker_memory, "disable_huge_pages", spy)
    monkeypatch.delenv(worker_memory.THP_ENV, raising=False)
    before = _thp_enabled()
    stream = MixtureStream({"a": src}, {"a": 1.0}, batch_size=8, seed=0)
    try:
        loader = stream.loader(num_workers=2, multiprocessing_context="fork")
        for k, _ in enumerate(loader):
            if k == 5:
                break
        del loader
    finally:
        stream.close()
    records = sorted(p.read_text() for p in seen.iterdir())
    assert records == ["True 0", "True 0"]
    assert _thp_enabled() == before
