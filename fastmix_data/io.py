"""Atomic writes and hashing: the one place fastmix_data writes a file that others may read.

Every file the package writes (index caches, manifests, resampled shards and their markers, search
outputs, benchmark reports) goes through this module, so that a reader never sees half a file and a
crash never leaves one behind.

Local paths (and ``file://`` URLs)
    The bytes go to a temporary file in the destination's directory (``.<name>.<pid>.<random>.tmp``,
    so that :mod:`fastmix_data.leftovers` removes those of killed writers on the next write there), are
    flushed and ``fsync``-ed, then ``os.replace``-d onto the destination (atomic on POSIX), and the
    directory is ``fsync``-ed so the rename itself survives a power cut. On any error the
    temporary file is removed and the destination is untouched.

URLs (``s3://``, ``gs://``, ``az://``/``abfs://``, ``memory://``, any fsspec protocol)
    The bytes are written to a local temporary file first, then uploaded through
    :mod:`fastmix_data.storage` (retries, credentials from the usual chains, never logged):

    ========================  =====================================================================
    store                     how the object is published
    ========================  =====================================================================
    s3, gs/gcs, az/abfs       one upload to the final key. These stores make an object visible only
                              when its upload completes (a single PUT, or the *complete* call of a
                              multipart upload), so readers see the old object or the whole new one.
    file, local               temporary file + fsync + rename, as above.
    anything else (memory,    upload to a temporary key ``<key>.tmp-<random>`` beside the final
    hf, ...)                  one, then ``fs.mv`` onto it: atomic where the store renames
                              atomically, a copy-then-delete otherwise (the temporary key is
                              removed on failure).
    ========================  =====================================================================

API (all take ``str | os.PathLike`` paths or URL strings)::

    from fastmix_data.io import write_bytes_atomic, write_json_atomic, atomic_path, sha256_file

    write_json_atomic("s3://bucket/run/weights.json", {"code": 0.3})    # or a local path
    with atomic_path("out/shard-00000.parquet") as tmp:                # a library writes to tmp
        pq.write_table(table, tmp)                                     # published on exit
    sha256_file("gs://bucket/data/part-0.parquet")                     # hex digest, streamed

Issue 18 (resampled shards and manifests at URLs) and issue 15 (weight updates at URLs) build on
these four calls; nothing else in the package should call ``os.replace`` or ``tempfile`` to publish
a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from fastmix_data.leftovers import sweep_temp_files, temp_prefix

CHUNK_BYTES = 1 << 22  # hashing and streaming read size (4 MiB)
ATOMIC_PUT_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})

__all__ = [
    "ATOMIC_PUT_SCHEMES",
    "atomic_path",
    "publish_file",
    "sha256_bytes",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def _url_scheme(path: str) -> str | None:
    from fastmix_data.storage.urls import scheme_of

    return scheme_of(path)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _local_atomic(path: str, fsync: bool) -> Iterator[str]:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    sweep_temp_files(directory)  # what killed writers left here (fastmix_data.leftovers)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        publish_file(tmp, path, fsync=fsync)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[str]:
    """A temporary local file name to write to; on a clean exit it is published at ``path``.

    Args:
        path: destination: a local path, a ``file://`` URL or any fsspec URL (see the module
            docstring for how each store publishes).
        fsync: flush the file (and, locally, its directory) to stable storage before publishing
            (default True; pass False only for caches that may be lost).

    Yields:
        A local path in the destination's directory (locally) or in the temp directory (URLs).
        Nothing is published if the block raises; the temporary file is removed either way.
    """
    path = os.fspath(path)
    scheme = _url_scheme(path)
    if scheme in (None, "file", "local"):
        from fastmix_data.storage.urls import local_path

        with _local_atomic(local_path(path) if scheme else path, fsync) as tmp:
            yield tmp
        return
    fd, tmp = tempfile.mkstemp(prefix=".fastmix-upload-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        from fastmix_data.storage import upload_file

        upload_file(tmp, path, atomic_put=scheme in ATOMIC_PUT_SCHEMES)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def publish_file(tmp: str | os.PathLike, path: str | os.PathLike, *, fsync: bool = True) -> None:
    """Publish a finished local file ``tmp`` (written beside ``path`` by a library that needs its own
    temporary name) at the local ``path``: fsync it, rename it over ``path``, fsync the directory."""
    if fsync:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` (local path or URL) atomically; see :func:`atomic_path`."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 1,
    sort_keys: bool = False,
    allow_nan: bool = False,
    fsync: bool = True,
    default: Any = None,
) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically.

    Key order is kept unless ``sort_keys``; NaN/inf are refused unless ``allow_nan``.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, ensure_ascii=False, default=default)
    write_text_atomic(path, text + "\n", fsync=fsync)


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (a local path, or any fsspec URL, streamed in 4 MiB chunks)."""
    path = os.fspath(path)
    scheme = _url_scheme(path)
    digest = hashlib.sha256()
    if scheme in (None, "file", "local"):
        from fastmix_data.storage.urls import local_path

        with open(local_path(path) if scheme else path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()
    from fastmix_data.storage import open_input

    with open_input(path) as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
