"""Shared pytest fixtures. Shard writers live in ``tests/shardgen.py`` (importable as ``shardgen``)."""

from __future__ import annotations

import pytest


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
