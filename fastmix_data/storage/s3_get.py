"""S3 range GETs through obstore (Rust: object_store and reqwest on tokio), the cold read path.

A cold Parquet read is a few range GETs per shard, run on the prefetch threads of every DataLoader
worker. Through s3fs each GET is Python work on fsspec's event loop thread (aiobotocore, aiohttp)
that holds the GIL against the worker's decoding, and each worker starts its own aiobotocore client
on its first request (about 0.1 s of CPU in a forked worker). obstore does the request, signing and
body transfer in Rust with the GIL released, and its store object is made in microseconds.
benchmarks/results/remote.md measures both.

Ranged GETs (:meth:`fastmix_data.storage.fs.RemoteFS.read_ranges_identified`: Parquet) and
whole-object downloads (:meth:`~fastmix_data.storage.fs.RemoteFS.download_identified`: WebDataset,
MDS and other whole shards) go here, with the same contract as the s3fs path: each answer carries
the object's size (``Content-Range`` or ``Content-Length``) and its version id or ETag, which the
caller checks against the index (no HEAD); retries are
:mod:`fastmix_data.storage.retry`'s alone (obstore's own are switched off), and failures are
translated into exceptions it classifies (:func:`translate`). Listing, HEAD and uploads stay on
s3fs.

obstore is used when all of these hold, else s3fs does the GETs too (:func:`store_for` returns None):

* ``$FASTMIX_DATA_S3_CLIENT`` is unset or ``auto`` (``s3fs`` forces s3fs; ``obstore`` makes a
  worker that cannot use obstore, for one of the reasons below, an error instead of a fallback);
* the process is a DataLoader worker, where the stream's reads happen. obstore's tokio runtime does
  not survive ``fork()`` (a forked child's requests hang), and the main process may fork workers
  after any read (the stream reads the first shard's footer when it opens): so the main process
  reads through s3fs, and so does a worker in which obstore was loaded before this module loaded it
  (by a process it was forked from, this module or another library such as litdata: whether that
  process started obstore's runtime cannot be seen, so it is assumed);
* obstore is installed;
* the credentials are ones obstore reads the same way botocore does: ``key``/``secret``/``token``
  or ``anon`` in ``storage_options``, or ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (with
  ``AWS_SESSION_TOKEN``) in the environment. Profiles and the ``~/.aws`` files, SSO, and instance
  or container roles are botocore's chain, so s3fs;
* the region is known (``client_kwargs={"region_name": ...}``, ``AWS_REGION`` or
  ``AWS_DEFAULT_REGION``) or the endpoint is not AWS's (neither the default nor a
  ``*.amazonaws.com`` one; S3-compatible stores: ``us-east-1``, as botocore); s3fs otherwise finds
  a bucket's region itself;
* the object's key has no empty, ``.`` or ``..`` segment (:func:`usable_key`: object_store cannot
  name ``a//b``, which S3 allows);
* ``storage_options`` holds nothing but those, ``endpoint_url`` and the connect/read timeouts.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, NoReturn

from fastmix_data.errors import SourceError

CLIENT_ENV = "FASTMIX_DATA_S3_CLIENT"
_CREDENTIAL_KEYS = {"key", "secret", "token", "anon"}
_CONFIG_KWARGS = {"retries", "connect_timeout", "read_timeout"}  # fastmix's own s3fs defaults (fs._defaults)
_CLIENT_KWARGS = {"endpoint_url", "region_name"}
_ENV_READ = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")
_STATUS = re.compile(r"status code: (\d{3})")
#: obstore's overall limit per request (its default, 30 s, would cut off any large shard's download
#: and every retry of it); a stalled connection is ended by ``read_timeout`` instead
NO_OVERALL_LIMIT = timedelta(days=1)

_STORES: dict[tuple, Any] = {}  # (pid, choice, bucket, options, environment read) -> S3Store, or None: s3fs
_LOCK = threading.Lock()
_LOADED_BY: list[int] = []  # the process that loaded obstore through this module (a forked child inherits it)


class StoreStatusError(OSError):
    """An obstore request answered with an HTTP error status (``status``), for the retry policy."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def client_choice() -> str:
    """``$FASTMIX_DATA_S3_CLIENT``: ``auto`` (default), ``obstore`` or ``s3fs``.

    Raises:
        ValueError: another value (named).
    """
    choice = os.environ.get(CLIENT_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "obstore", "s3fs"):
        raise ValueError(f"${CLIENT_ENV}={choice!r}: expected 'auto', 'obstore' or 's3fs'")
    return choice


def s3_config(options: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[dict, dict] | str:
    """obstore's ``(config, client_options)`` for s3fs ``options`` (fastmix's defaults merged in,
    the endpoint from the environment among them: :func:`fastmix_data.storage.fs.filesystem`) and
    the environment's credentials and region, or the reason obstore cannot honour them (a sentence;
    s3fs then reads)."""
    unknown = [repr(k) for k in sorted(set(options) - _CREDENTIAL_KEYS - {"endpoint_url", "client_kwargs", "config_kwargs"})]
    unknown += sorted(f"client_kwargs[{k!r}]" for k in set(options.get("client_kwargs") or {}) - _CLIENT_KWARGS)
    unknown += sorted(f"config_kwargs[{k!r}]" for k in set(options.get("config_kwargs") or {}) - _CONFIG_KWARGS)
    if unknown:
        return f"storage_options {', '.join(unknown)} (s3fs/botocore settings)"
    config = _credentials(options, environ)
    if isinstance(config, str):
        return config
    client_kwargs = dict(options.get("client_kwargs") or {})
    endpoint = options.get("endpoint_url") or client_kwargs.get("endpoint_url")
    region = client_kwargs.get("region_name") or environ.get("AWS_DEFAULT_REGION") or environ.get("AWS_REGION")
    if not region and not endpoint:
        return "no region configured (s3fs finds the bucket's region)"
    if not region and _is_aws(str(endpoint)):
        return "an AWS endpoint without a configured region (s3fs finds the bucket's region)"
    config["region"] = region or "us-east-1"
    client: dict[str, Any] = {"timeout": NO_OVERALL_LIMIT}  # as s3fs: stalls end by read_timeout, not size
    if endpoint:
        config["endpoint"] = endpoint
        client["allow_http"] = str(endpoint).startswith("http://")
    else:
        config["virtual_hosted_style_request"] = True  # AWS's own addressing
    timeouts = options.get("config_kwargs") or {}
    for ours, theirs in (("connect_timeout", "connect_timeout"), ("read_timeout", "read_timeout")):
        if timeouts.get(ours) is not None:
            client[theirs] = timedelta(seconds=float(timeouts[ours]))
    return config, client


def _credentials(options: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any] | str:
    """obstore's credential settings, in botocore's order where obstore reads them the same way
    (the options', then the environment's keys), or why not."""
    if options.get("anon"):
        return {"skip_signature": True}
    if options.get("key") and options.get("secret"):
        found = {"access_key_id": options["key"], "secret_access_key": options["secret"]}
        return {**found, "session_token": options["token"]} if options.get("token") else found
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        found = {"access_key_id": environ["AWS_ACCESS_KEY_ID"], "secret_access_key": environ["AWS_SECRET_ACCESS_KEY"]}
        return {**found, "session_token": environ["AWS_SESSION_TOKEN"]} if environ.get("AWS_SESSION_TOKEN") else found
    return "credentials from a profile, the ~/.aws files, SSO or an instance/container role (botocore's chain)"


def _is_aws(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return host.endswith(".amazonaws.com") or host == "amazonaws.com"


def usable_key(key: str) -> bool:
    """Whether obstore can name object ``key``: object_store refuses keys with an empty, ``.`` or
    ``..`` segment (``a//b``, ``a/./b``) or a leading or trailing ``/``, which S3 allows; s3fs
    reads those."""
    return bool(key) and all(part not in ("", ".", "..") for part in key.split("/"))


def store_for(bucket: str, options: Mapping[str, Any]):
    """This process's obstore ``S3Store`` for ``bucket`` and ``options``, or None when s3fs should
    read (see the module docstring).

    Raises:
        SourceError: ``$FASTMIX_DATA_S3_CLIENT=obstore`` and obstore cannot be used (says why).
    """
    choice = client_choice()
    if choice == "s3fs" or not in_dataloader_worker():
        return None
    key = (os.getpid(), choice, bucket, repr(sorted(options.items(), key=lambda kv: kv[0])),
           tuple(os.environ.get(v) for v in _ENV_READ))  # fmt: skip
    if key in _STORES:
        return _STORES[key]
    with _LOCK:  # one thread decides (loads obstore, makes the store); the others then find it
        if key not in _STORES:
            why = _unusable(options)
            if isinstance(why, str) and choice == "obstore":
                raise SourceError(f"${CLIENT_ENV}=obstore, but obstore cannot read s3://{bucket}: {why}")
            _STORES[key] = None if isinstance(why, str) else _new_store(bucket, *why)
        return _STORES[key]


def _new_store(bucket: str, config: dict, client: dict):
    from obstore.store import S3Store

    return S3Store(bucket, config=config, client_options=client, retry_config={"max_retries": 0})


def in_dataloader_worker() -> bool:
    """Whether this process is a torch DataLoader worker (without importing torch)."""
    data = sys.modules.get("torch.utils.data")
    return data is not None and data.get_worker_info() is not None


def _unusable(options: Mapping[str, Any]) -> tuple[dict, dict] | str:
    """obstore's configuration, or why obstore cannot be used here."""
    if "obstore" in sys.modules and _LOADED_BY != [os.getpid()]:
        return ("obstore was loaded before this process used it, maybe by a process it was forked from, where "
                "obstore's runtime may have started (it does not survive fork)")
    try:
        import obstore  # noqa: F401
    except ImportError:
        return "obstore is not installed (pip install obstore)"
    _LOADED_BY[:] = [os.getpid()]
    return s3_config(options, os.environ)


def get_ranges(store, key: str, ranges: Sequence[tuple[int, int]]) -> list[tuple[bytes, int, str]]:
    """``(bytes, object size, version)`` per byte range ``(offset, length)`` of object ``key``,
    all requested at once; the version is the version id when the store reports one, else the ETag.

    Raises:
        what :func:`translate` makes of a failed request.
    """
    import obstore

    async def one(offset: int, length: int) -> tuple[bytes, int, str]:
        result = await obstore.get_async(store, key, options={"range": (offset, offset + length)})
        return bytes(await result.bytes_async()), *_identity(result.meta)

    async def every() -> list[tuple[bytes, int, str]]:
        return list(await asyncio.gather(*(one(int(o), int(n)) for o, n in ranges)))

    try:
        if len(ranges) == 1:  # the common case (a read's touching ranges are merged): no event loop
            offset, length = (int(x) for x in ranges[0])
            result = obstore.get(store, key, options={"range": (offset, offset + length)})
            return [(bytes(result.bytes()), *_identity(result.meta))]
        return asyncio.run(every())
    except obstore.exceptions.BaseError as exc:
        _raise_translated(exc)


def _raise_translated(exc: BaseException) -> NoReturn:
    new = translate(exc)
    if new is exc:
        raise exc
    raise new from exc


def get_to_file(store, key: str, local: str, accept: Callable[[int, str], None]) -> tuple[int, str]:
    """Download object ``key`` to the local file ``local`` (streamed in the chunks obstore
    receives, not held in memory); ``(object size, version)`` from the GET's own answer, as
    :func:`get_ranges`. ``accept(size, version)`` is called with the answer's headers, before any
    of the body is read: it raises to refuse the object (then nothing is downloaded).

    Raises:
        what :func:`translate` makes of a failed request; what ``accept`` raises.
    """
    import obstore

    try:
        result = obstore.get(store, key)
        size, version = _identity(result.meta)
        accept(size, version)
        with open(local, "wb") as f:
            for chunk in result:
                f.write(chunk)
        return size, version
    except obstore.exceptions.BaseError as exc:
        _raise_translated(exc)


def _identity(meta: Mapping[str, Any]) -> tuple[int, str]:
    """(object size, version id or else ETag) from a GET's answer."""
    return int(meta["size"]), str(meta.get("version") or meta.get("e_tag") or "").strip('"')


def translate(exc: BaseException) -> BaseException:
    """An exception :mod:`fastmix_data.storage.retry` classifies, for an obstore failure: its HTTP
    status as ``status`` (404 stays ``FileNotFoundError``, obstore's own), a failure to send or
    receive as ``ConnectionError`` (retried); other errors unchanged. The message keeps only the
    status or the kind of failure: obstore's text holds the request URL."""
    if isinstance(exc, FileNotFoundError | PermissionError):
        return exc
    text = str(exc)
    found = _STATUS.search(text)
    if found:
        return StoreStatusError(f"the store answered HTTP {found.group(1)}", int(found.group(1)))
    if any(s in text for s in ("error sending request", "connection", "Connection", "timed out", "body")):
        return ConnectionError("the connection failed or timed out")
    return exc
