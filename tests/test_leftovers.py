"""Leftovers of dead processes are removed at the next start, by pid liveness; a live process's never.

(The SIGKILL crash tests in tests/test_crash_*.py check the same on real leftovers.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
from shardgen import make_docs, write_parquet_source

from fastmix_data import leftovers
from fastmix_data.io import write_json_atomic


@pytest.fixture
def pids():
    """(a live pid, a dead pid), both ours."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    yield live.pid, dead.pid
    live.kill()
    live.wait()


def _mkdirs(root, names):
    for n in names:
        os.makedirs(os.path.join(root, n, "inner"))
        with open(os.path.join(root, n, "inner", "slot-0"), "wb") as f:
            f.write(b"x" * 10)


def test_run_dirs_of_dead_processes_go_live_ones_stay(tmp_path, pids):
    live, dead = pids
    keep = [f"fastmix-channel-{live}-a1", f"fastmix-rings-{live}-b2", "fastmix-channel-oldstyle", f"other-{dead}-x"]
    gone = [f"fastmix-channel-{dead}-c3", f"fastmix-rings-{dead}-d4", f"fastmix-shards-{dead}-7f-e5"]
    _mkdirs(tmp_path, keep + gone)
    removed = leftovers.sweep_run_dirs(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == sorted(gone)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    _mkdirs(tmp_path, [f"fastmix-rings-{dead}-again"])
    assert leftovers.sweep_run_dirs(tmp_path) == []  # once per directory per process


def test_temp_files_of_dead_writers_go_live_ones_and_user_files_stay(tmp_path, pids):
    live, dead = pids
    keep = [
        f".manifest.json.{live}.abcd_123.tmp",
        f".weights.json.tmp{live}",
        "report.2024.final.tmp",  # a user's file: not our pattern
        f"manifest.json.{dead}.abcdefgh.tmp",  # not hidden
        "manifest.json",
    ]
    gone = [f".manifest.json.{dead}.abcd_123.tmp", f".weights.json.tmp{dead}", f".corpus.json.tmp-{dead}"]
    for n in keep + gone:
        (tmp_path / n).write_text("partial")
    write_json_atomic(tmp_path / "index.json", {"a": 1})  # an atomic write sweeps its directory first
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "index.json"])
    assert json.loads((tmp_path / "index.json").read_text()) == {"a": 1}


def test_streams_sweep_the_temp_dir_and_shared_memory(tmp_path, pids, monkeypatch):
    live, dead = pids
    tmp_root, shm_root = tmp_path / "tmp", tmp_path / "shm"
    tmp_root.mkdir()
    shm_root.mkdir()
    _mkdirs(tmp_root, [f"fastmix-channel-{dead}-x", f"fastmix-channel-{live}-y"])
    _mkdirs(shm_root, [f"fastmix-rings-{dead}-x", f"fastmix-shards-{dead}-1-x", f"fastmix-shards-{live}-1-y"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    import fastmix_data.stream.batch_ring as batch_ring

    monkeypatch.setattr(batch_ring, "_shared_root", lambda: str(shm_root))
    from fastmix_data import MixtureStream

    write_parquet_source(tmp_path / "a", make_docs(20), shards=2)
    stream = MixtureStream({"a": str(tmp_path / "a")}, {"a": 1.0}, batch_size=2)
    loader = stream.loader(num_workers=1)  # makes a ring directory name: sweeps shared memory
    assert sorted(os.listdir(tmp_root)) == sorted([f"fastmix-channel-{live}-y", os.path.basename(stream.channel.dir)])
    assert os.path.basename(stream.channel.dir).startswith(f"fastmix-channel-{os.getpid()}-")
    assert os.listdir(shm_root) == [f"fastmix-shards-{live}-1-y"]
    assert loader is not None
    stream.close()
