"""The output location of ``resample``: every read and write of ``out_dir`` goes through here.

``out_dir`` is a string: a local directory, or a URL prefix on any store :mod:`fastmix_data.storage`
reaches (``s3://bucket/mix``, ``gs://…``, ``file://…``). Writers (pyarrow, webdataset, MDSWriter)
always write a local temporary file (:func:`temp_dir`); :func:`publish` makes it visible under its
final name in one atomic step (:mod:`fastmix_data.io`: temp + fsync + rename locally, a single
upload that appears whole on object stores), and JSON records are written the same way, so a
reader, a retried task or a resumed run never sees half a file. Credentials come from the store's
usual chains (environment, profile, instance role), never from the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from fastmix_data import io
from fastmix_data.storage import (
    RemoteError,
    check_no_credentials,
    is_url,
    list_objects,
    read_bytes,
    stat,
    urls,
)

STATE_DIR = ".fastmix-resample"


def location(out_dir: str | os.PathLike) -> str:
    """The canonical form of an output location: an absolute local path, or the URL without a
    trailing slash."""
    out = os.fspath(out_dir)
    if is_url(out):
        check_no_credentials(out)
        return out.rstrip("/")
    return os.path.abspath(urls.local_path(out))


def join(out_dir: str, *parts: str) -> str:
    """``out_dir/part/...`` (``/``-separated under a URL)."""
    for part in parts:
        out_dir = urls.join(out_dir, part) if is_url(out_dir) else os.path.join(out_dir, part)
    return out_dir


def _missing(exc: RemoteError) -> bool:
    return isinstance(exc.__cause__, FileNotFoundError) or getattr(exc, "status", None) == 404


def read_json(path: str) -> Any:
    """A JSON file's value. Raises FileNotFoundError when it is missing, OSError / ValueError when
    it cannot be read or parsed."""
    if not is_url(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    try:
        return json.loads(read_bytes(path))
    except RemoteError as exc:
        if _missing(exc):
            raise FileNotFoundError(path) from None
        raise OSError(str(exc)) from exc


def write_json(path: str, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON atomically (key order kept)."""
    io.write_json_atomic(path, obj, indent=indent)


def size(path: str) -> int | None:
    """The file's (object's) size in bytes, or None when there is none."""
    if not is_url(path):
        try:
            return os.stat(path).st_size if os.path.isfile(path) else None
        except OSError:
            return None
    try:
        return stat(path).size
    except RemoteError as exc:
        if _missing(exc):
            return None
        raise


def sha256(path: str) -> str:
    """Hex sha256 of the file's bytes (an object is streamed)."""
    return io.sha256_file(path)


def names(out_dir: str) -> set[str]:
    """The names directly under ``out_dir`` (empty when it does not exist)."""
    if not is_url(out_dir):
        return set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    prefix = out_dir + "/"
    try:
        found = list_objects(prefix)
    except RemoteError as exc:
        if _missing(exc):
            return set()
        raise
    return {o.url[len(prefix) :].split("/", 1)[0] for o in found if o.url.startswith(prefix)}


def temp_dir(out_dir: str) -> str:
    """A local directory for the temporary files of shards being written (created): in the output
    directory itself, or for a URL in this node's temporary directory."""
    if is_url(out_dir):
        key = hashlib.sha256(out_dir.encode()).hexdigest()[:16]
        path = os.path.join(tempfile.gettempdir(), "fastmix-resample", key)
    else:
        path = join(out_dir, STATE_DIR, "tmp")
    os.makedirs(path, exist_ok=True)
    return path


def prepare(out_dir: str) -> None:
    """Create the output location and its state directory (nothing to create on an object store)."""
    if not is_url(out_dir):
        os.makedirs(join(out_dir, STATE_DIR, "done"), exist_ok=True)


def publish(tmp: str, path: str) -> None:
    """Make the finished local file ``tmp`` visible at ``path`` in one atomic step (``tmp`` is gone
    afterwards)."""
    if not is_url(path):
        io.publish_file(tmp, path)
        return
    with io.atomic_path(path) as upload:
        shutil.move(tmp, upload)


def finish(out_dir: str) -> None:
    """Remove what only a running resample needs (the empty temporary directory)."""
    with contextlib.suppress(OSError):
        os.rmdir(temp_dir(out_dir))
