"""An optional dependency that is installed but broken degrades to the documented fallback, with the
reason logged once (docs/dependencies.md).

Each case runs in a fresh interpreter with a broken package first on ``PYTHONPATH``: a
``torchvision`` whose import raises ``RuntimeError`` (what a torchvision built for another torch
does), and a ``transformers`` whose import raises ``OSError`` (which breaks streaming itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from shardgen import make_docs, write_mds_source, write_parquet_source

CHECK = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, format="LOG %(name)s %(message)s")
    from fastmix_data.errors import SourceError
    from fastmix_data.sources import open_source
    from fastmix_data.sources.mds_compat import import_streaming
    try:
        mds = open_source("m", sys.argv[1])
        print("MDS", [mds.read_shard(i).rows for i in range(len(mds.shards))])
    except SourceError as exc:
        print("MDS-REFUSED", exc)
    try:
        import_streaming()
    except ImportError as exc:
        print("IMPORT-ERROR", type(exc).__name__)
    pq = open_source("p", sys.argv[2])
    print("PARQUET", [pq.read_shard(i).rows for i in range(len(pq.shards))])
    import importlib
    try:
        importlib.import_module("torchvision")
    except Exception as exc:
        print("TORCHVISION-STILL", type(exc).__name__)
    """
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, streaming_module):
    root = tmp_path_factory.mktemp("optional")
    write_mds_source(root / "mds", make_docs(12, seed=1), shards=2)
    write_parquet_source(root / "pq", make_docs(10, seed=2), shards=2)
    return root


def _run(tmp_path, data, package: str, body: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "site"
    (fake / package).mkdir(parents=True)
    (fake / package / "__init__.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), *sys.path]), FASTMIX_DATA_CACHE=str(tmp_path / "c"))
    return subprocess.run(
        [sys.executable, "-c", CHECK, str(data / "mds"), str(data / "pq")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_torchvision_raising_runtime_error_falls_back_to_the_stand_ins(tmp_path, data):
    done = _run(tmp_path, data, "torchvision", 'raise RuntimeError("operator torchvision::nms does not exist")\n')
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "MDS [6, 6]" in out and "PARQUET [5, 5]" in out
    logged = [line for line in out.splitlines() if line.startswith("LOG") and "torchvision" in line]
    assert len(logged) == 1, out  # the reason, once
    assert "RuntimeError: operator torchvision::nms does not exist" in logged[0] and "stand-ins" in logged[0]
    assert "TORCHVISION-STILL RuntimeError" in out  # the stand-ins are gone again


def test_broken_transformers_refuses_mds_sources_and_keeps_the_rest_working(tmp_path, data):
    done = _run(tmp_path, data, "transformers", 'raise OSError("libsomething.so: cannot open shared object file")\n')
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    refused = next(line for line in out.splitlines() if line.startswith("MDS-REFUSED"))
    assert "source 'm' (mds) cannot be read" in refused and "OSError" in refused and "libsomething" in refused
    assert "IMPORT-ERROR ImportError" in out
    assert "PARQUET [5, 5]" in out
    logged = [line for line in out.splitlines() if line.startswith("LOG") and "transformers" in line]
    assert len(logged) == 1, out
