"""Shared pytest fixtures. Shard writers live in ``tests/shardgen.py`` (importable as ``shardgen``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = str(Path(__file__).resolve().parent.parent / "benchmarks")


@pytest.fixture(autouse=True)
def _isolated_index_cache(tmp_path_factory, monkeypatch):
    """Point the shard index cache at a fresh temporary directory, never at ~/.cache."""
    cache = tmp_path_factory.mktemp("index-cache")
    monkeypatch.setenv("FASTMIX_DATA_CACHE", str(cache))
    return cache


@pytest.fixture
def index_cache(_isolated_index_cache):
    """The index cache directory used by the current test."""
    return _isolated_index_cache


@pytest.fixture(scope="module")
def bench_import():
    """``importlib.import_module`` with ``benchmarks/`` on ``sys.path`` (its scripts import each other
    by name) until the test module's last test."""
    sys.path.insert(0, BENCHMARKS)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(BENCHMARKS)


@pytest.fixture(scope="session")
def streaming_module():
    """mosaicml-streaming, imported without torchvision (slow the first time: ~4 s)."""
    from fastmix_data.sources.mds_compat import import_streaming

    return import_streaming()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: on a 2-core CI box, tests with DataLoader workers and small models run
    several times faster than with torch's default (and results do not depend on it)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 server (moto's server mode) on 127.0.0.1 and a free port, for the whole session."""
    from remote_servers import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(moto_endpoint, monkeypatch, request):
    """The loopback S3 server with fake credentials in the environment (as the AWS chain reads
    them) and a bucket of this test's own; ``s3.put(local_dir, prefix)`` uploads a directory and
    returns its ``s3://`` URL."""
    import hashlib

    from remote_servers import s3_env, upload_dir

    for key, value in s3_env(moto_endpoint).items():
        monkeypatch.setenv(key, value)

    class S3:
        endpoint = moto_endpoint
        bucket = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]

        def put(self, local, prefix: str = "data") -> str:
            upload_dir(self.endpoint, local, self.bucket, prefix)
            return f"s3://{self.bucket}/{prefix}"

    return S3()


@pytest.fixture
def crash_third_parquet_write(monkeypatch):
    """A function that makes resample's Parquet writer crash on its next third shard (half a file
    written, then KeyboardInterrupt, as a killed process leaves it) and returns the function that
    restores the writer."""
    import importlib

    module = importlib.import_module("fastmix_data.export.resample")  # the module, not the function
    real = module._write_parquet
    calls = {"n": 0}

    def crashing(path, chunks, names, columns):
        calls["n"] += 1
        if calls["n"] == 3:
            next(iter(chunks))
            with open(path, "wb") as f:
                f.write(b"PAR1 half a shard")
            raise KeyboardInterrupt("simulated crash")
        return real(path, chunks, names, columns)

    def arm():
        monkeypatch.setattr(module, "_write_parquet", crashing)
        return lambda: monkeypatch.setattr(module, "_write_parquet", real)

    return arm
