"""The one owner of remote I/O: URLs, fsspec filesystems, retries, the node-local cache, prefetch.

Everything in fastmix_data that touches a URL goes through this package; readers see bytes by path
(:class:`ShardFiles`) and never call fsspec themselves. Modules:

- :mod:`~fastmix_data.storage.urls`: is it a URL, which scheme, redaction, refusing credentials in
  URLs, joining names under a root without escaping it.
- :mod:`~fastmix_data.storage.fs`: fsspec filesystems per URL (credentials from the usual chains),
  object identity (size + ETag/version), listing, whole and range reads, uploads.
- :mod:`~fastmix_data.storage.retry`: exponential backoff with full jitter; `RemoteError` names the
  URL, the status and what to do.
- :mod:`~fastmix_data.storage.cache`: the node-local shard cache (byte budget, one download per
  node, pins that eviction respects).
- :mod:`~fastmix_data.storage.store`: `Storage` (a source's picklable remote settings) and
  `ShardFiles` (what a format reader reads from).
- :mod:`~fastmix_data.storage.prefetch`: plan-driven prefetch and the stream's one hook.

For writers (issue 18: shards and manifests at URLs; issue 15: weight updates at URLs), use
:mod:`fastmix_data.io` (``write_bytes_atomic``, ``write_json_atomic``, ``atomic_path``), which
publishes through :func:`upload_file`; read with :func:`read_bytes` / :func:`open_input`::

    from fastmix_data.io import write_json_atomic
    from fastmix_data.storage import read_bytes, stat
    write_json_atomic("s3://bucket/run/weights-000003.json", {"version": 3, "weights": {...}})
    stat("s3://bucket/run/weights-000003.json").version      # ETag / version id
    json.loads(read_bytes("s3://bucket/run/weights-000003.json"))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastmix_data.storage.cache import CacheBudgetError, ShardCache, default_shard_cache_dir, parse_size
from fastmix_data.storage.fs import ObjectInfo, RemoteFS
from fastmix_data.storage.retry import RemoteError, RetryPolicy
from fastmix_data.storage.store import Expected, RangeFile, ShardChangedError, ShardFiles, Storage
from fastmix_data.storage.urls import check_no_credentials, is_url, redact, scheme_of

__all__ = [
    "CacheBudgetError",
    "Expected",
    "ObjectInfo",
    "RangeFile",
    "RemoteError",
    "RemoteFS",
    "RetryPolicy",
    "ShardCache",
    "ShardChangedError",
    "ShardFiles",
    "Storage",
    "check_no_credentials",
    "default_shard_cache_dir",
    "is_url",
    "list_objects",
    "open_input",
    "parse_size",
    "read_bytes",
    "redact",
    "scheme_of",
    "stat",
    "upload_file",
]


def stat(url: str, storage_options: Mapping[str, Any] | None = None) -> ObjectInfo:
    """Size and version (ETag / version id) of one object, with retries."""
    return RemoteFS(storage_options).stat(url)


def list_objects(url: str, storage_options: Mapping[str, Any] | None = None) -> list[ObjectInfo]:
    """Objects under a prefix or matching a glob, sorted by URL, with retries."""
    return RemoteFS(storage_options).list(url)


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """A whole object's bytes (no cache), with retries. Local paths are read directly."""
    if not is_url(url):
        from fastmix_data.storage.urls import local_path

        with open(local_path(url), "rb") as f:
            return f.read()
    return RemoteFS(storage_options).read(url)


def open_input(url: str, storage_options: Mapping[str, Any] | None = None):
    """A read-only, buffered file object over an object (opening is retried; reads are not)."""
    return RemoteFS(storage_options).open(url)


def upload_file(
    local: str, url: str, *, atomic_put: bool = True, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Publish the local file at ``url`` (see :mod:`fastmix_data.io` for each store's atomicity)."""
    RemoteFS(storage_options).upload(local, url, atomic_put)
