"""fsspec filesystems for URLs, object identity (size + ETag/version), listing, range reads, uploads.

One filesystem object per (protocol, options) and process: fsspec's instance cache keys on the
calling thread too, so each prefetch thread would start its own S3 client (0.1-0.5 s of CPU each:
botocore's service model, a new connection pool); an asynchronous filesystem (s3fs, gcsfs, adlfs,
HTTP), whose calls all run on fsspec's one event loop thread, is made once per process here and
shared by its threads, and an S3 client is started once (:func:`start_client`). A forked child
(a DataLoader worker) makes its own. Credentials come from the
store's usual chain, untouched by us: for S3 the AWS environment variables, ``~/.aws`` profiles
(``AWS_PROFILE``) and instance/container roles (botocore); for GCS ``GOOGLE_APPLICATION_CREDENTIALS``
or the metadata server (gcsfs); for Azure ``AZURE_STORAGE_*`` or ``DefaultAzureCredential``
(adlfs); for ``hf://`` ``HF_TOKEN`` or the cached login (huggingface_hub). ``storage_options``
passed by the caller go to fsspec as they are and are never logged, stored or put in a message.

The S3 endpoint may be set with ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or ``S3_ENDPOINT_URL``
(the variable MosaicML Streaming reads), for S3-compatible stores and the loopback test server.
The client libraries' own retries are switched off (botocore: one attempt; s3fs: one try) so that
:mod:`fastmix_data.storage.retry` alone decides, with backoff and jitter.

Packages per scheme (``pip install 'fastmix_data[remote]'`` brings s3fs and aiohttp):
``s3://`` s3fs (a DataLoader worker's GETs: obstore, see :mod:`fastmix_data.storage.s3_get`); ``gs://``/``gcs://`` gcsfs; ``az://``/``abfs://`` adlfs; ``hf://`` huggingface_hub;
``http(s)://`` aiohttp (fsspec's HTTP filesystem).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastmix_data.errors import SourceError
from fastmix_data.storage.retry import RetryPolicy, call
from fastmix_data.storage.urls import check_no_credentials, has_glob, redact, scheme_of

_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp"}
_VERSION_KEYS = ("VersionId", "version_id", "generation", "ETag", "etag", "md5Hash", "blob_id", "lfs_sha256",
                 "Last-Modified", "LastModified", "last_modified", "mtime", "created")
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


@dataclass(frozen=True)
class ObjectInfo:
    """What the store says about one object.

    Attributes:
        url: the object's URL (as the source names it).
        size: bytes.
        version: the store's version id when versioning is on, else its ETag (S3, GCS, Azure), else
            ``Last-Modified`` (plain HTTP servers); ``""`` when the store reports none.
    """

    url: str
    size: int
    version: str


def version_of(info: Mapping[str, Any]) -> str:
    """The identity string of an fsspec ``info()``/``ls()`` entry (see :class:`ObjectInfo`)."""
    for key in _VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return str(value).strip('"')
    return ""


def _defaults(scheme: str) -> dict[str, Any]:
    if scheme in ("s3", "s3a"):
        opts: dict[str, Any] = {
            "config_kwargs": {
                "retries": {"total_max_attempts": 1, "mode": "standard"},
                "connect_timeout": CONNECT_TIMEOUT_S,
                "read_timeout": READ_TIMEOUT_S,
            },
        }
        endpoint = next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    if scheme in ("http", "https"):
        return {"client_kwargs": {}}
    return {}


_SHARED: dict[tuple, Any] = {}  # (pid, scheme, options) -> an asynchronous filesystem shared by threads
_SHARED_LOCK = threading.Lock()
_START_LOCK = threading.Lock()
_BOTO_LOADER: list = []  # botocore's data loader, shared by this process's S3 sessions (and inherited at fork)


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None):
    """``(fs, path)`` for ``url``: the fsspec filesystem (one per process, protocol and options for
    asynchronous filesystems; see the module docstring) and the path in it.

    Raises:
        SourceError: the scheme's package is missing (names the package to install).
        UnsafeInputError: credentials in the URL.
    """
    check_no_credentials(url)
    scheme = scheme_of(url) or "file"
    options = _options(scheme, storage_options)
    key = (os.getpid(), scheme, repr(options))  # the options include the endpoint read from the environment
    fs = _SHARED.get(key)
    if fs is not None:
        return fs, fs._strip_protocol(url)
    fs, path = _new_filesystem(url, scheme, options)
    if getattr(fs, "async_impl", False):
        with _SHARED_LOCK:
            fs = _SHARED.setdefault(key, fs)
        if hasattr(fs, "set_session") and not hasattr(fs, "_fastmix_started"):
            if getattr(fs, "session", "") is None and not getattr(fs, "kwargs", None):
                fs.session = _s3_session()
            fs._fastmix_started = False  # started by RemoteFS.fs, with retries
    return fs, path


def start_client(fs) -> None:
    """Start ``fs``'s client once per process (S3: the aiobotocore client and its connection pool),
    so that concurrent first requests from several threads do not each make one. Other stores: no-op."""
    if getattr(fs, "_fastmix_started", False) or not hasattr(fs, "set_session"):
        return
    from fsspec.asyn import sync

    with _START_LOCK:
        if not getattr(fs, "_fastmix_started", False):
            sync(fs.loop, _start_s3, fs)
            fs._fastmix_started = True


async def _start_s3(fs) -> None:
    client = await fs.set_session()
    # s3fs makes a new client (and a new session) whenever all of the client's HTTP sessions are
    # closed, and it counts none as all closed: so each first request of a fresh client, and every
    # concurrent one, would make its own. Opening the (lazily made) HTTP session avoids that.
    http = getattr(getattr(client, "_endpoint", None), "http_session", None)
    with contextlib.suppress(Exception):
        await http._get_session(None)


def _s3_session():
    """An aiobotocore session on this process tree's one botocore data loader: the S3 service model
    (~1 MB of JSON, 0.1-0.3 s to parse) is parsed once, by the first client, and a forked DataLoader
    worker inherits it parsed instead of parsing it again for its own client."""
    import aiobotocore.session
    from botocore.loaders import create_loader

    if not _BOTO_LOADER:
        _BOTO_LOADER.append(create_loader(os.environ.get("AWS_DATA_PATH")))
    session = aiobotocore.session.AioSession()
    session.register_component("data_loader", _BOTO_LOADER[0])
    return session


def _options(scheme: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = _defaults(scheme)
    for key, value in (storage_options or {}).items():
        if isinstance(value, Mapping) and isinstance(options.get(key), Mapping):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return options


def _new_filesystem(url: str, scheme: str, options: dict[str, Any]):
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        if isinstance(exc, ValueError) and "protocol" not in str(exc).lower():
            raise
        package = _PACKAGES.get(scheme, f"an fsspec implementation of {scheme!r}")
        raise SourceError(f"reading {redact(url)} needs {package}: pip install {package}") from exc
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's own loop; retry.call owns retries
    return fs, path


class RemoteFS:
    """Remote calls on one store with retries: stat, list, read (whole or ranges), upload.

    Args:
        storage_options: passed to fsspec (credentials, endpoint...); never logged.
        retry: the retry policy (default :class:`RetryPolicy()`).
    """

    def __init__(self, storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None):
        self.storage_options = dict(storage_options or {})
        self.retry = retry or RetryPolicy()

    def __repr__(self) -> str:  # never show the options: they may hold credentials
        return f"RemoteFS(options={sorted(self.storage_options)}, retry={self.retry})"

    def fs(self, url: str):
        """``(fs, path)`` (see :func:`filesystem`), the store's client started (once per process)."""
        fs, path = filesystem(url, self.storage_options)
        if not getattr(fs, "_fastmix_started", True):
            call(lambda: start_client(fs), url, "connect to", self.retry)
        return fs, path

    def stat(self, url: str) -> ObjectInfo:
        """Size and version of one object (one HEAD request)."""
        fs, path = self.fs(url)

        def head():
            fs.invalidate_cache(path)
            return fs.info(path)

        info = call(head, url, "stat", self.retry)
        if info.get("type") == "directory":
            raise SourceError(f"{redact(url)} is a directory (prefix), not an object")
        return ObjectInfo(url, int(info["size"]), version_of(info))

    def list(self, url: str) -> list[ObjectInfo]:
        """Every object under the prefix ``url`` (recursively) or matching the glob ``url``, with
        sizes and versions from the listing itself (no HEAD per object); sorted by URL."""
        fs, path = self.fs(url)
        if has_glob(url):
            found = call(lambda: fs.glob(path, detail=True), url, "list", self.retry)
        else:
            found = call(lambda: fs.find(path, detail=True), url, "list", self.retry)
        out = []
        for name, info in found.items():
            if info.get("type") == "directory":
                continue
            full = name if "://" in name else fs.unstrip_protocol(name)
            out.append(ObjectInfo(full, int(info.get("size") or 0), version_of(info)))
        return sorted(out, key=lambda o: o.url)

    def read(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of an object (the whole object when both are None)."""
        fs, path = self.fs(url)
        if start is None and end is None:
            return call(lambda: fs.cat_file(path), url, "read", self.retry)
        return call(lambda: fs.cat_file(path, start=start, end=end), url, "read", self.retry)

    def read_ranges(self, url: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Byte ranges ``[(offset, length), ...]`` of one object, fetched concurrently by fsspec."""
        if not ranges:
            return []
        fs, path = self.fs(url)
        starts = [int(o) for o, _ in ranges]
        ends = [int(o) + int(n) for o, n in ranges]

        def fetch():
            parts = fs.cat_ranges([path] * len(ranges), starts, ends, on_error="raise")
            for p in parts:
                if isinstance(p, BaseException):
                    raise p
            return parts

        return call(fetch, url, "read ranges of", self.retry)

    def read_ranges_identified(self, url: str, ranges: Sequence[tuple[int, int]]) -> list[tuple[bytes, ObjectInfo]] | None:
        """Byte ranges of one object, fetched concurrently, each with the identity the store sent
        along with it: S3 answers every ranged GET with the object's size (``Content-Range``) and
        its ETag / version id, so the bytes are checked against the index without a HEAD. The GETs
        go through obstore where it can honour the store's configuration, else through s3fs
        (:mod:`fastmix_data.storage.s3_get`). None for other stores (the caller asks `stat`). An
        unknown size is reported as -1."""
        if scheme_of(url) not in ("s3", "s3a") or not ranges:
            return None
        from fastmix_data.storage import s3_get

        store, key = self._obstore(url)
        if store is not None:
            got = call(lambda: s3_get.get_ranges(store, key, ranges), url, "read ranges of", self.retry)
            return [(data, ObjectInfo(url, size, version)) for data, size, version in got]
        return self._read_ranges_s3fs(url, ranges)

    def _read_ranges_s3fs(self, url: str, ranges: Sequence[tuple[int, int]]) -> list[tuple[bytes, ObjectInfo]]:
        import asyncio

        from fsspec.asyn import sync

        fs, path = self.fs(url)
        bucket, key, _ = fs.split_path(path)

        async def one(offset: int, length: int) -> tuple[bytes, ObjectInfo]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
            try:
                data = await resp["Body"].read()
            finally:
                resp["Body"].close()
            total = str(resp.get("ContentRange") or "").rpartition("/")[2]
            return data, ObjectInfo(url, int(total) if total.isdigit() else -1, version_of(resp))

        async def every() -> list[tuple[bytes, ObjectInfo]]:
            return list(await asyncio.gather(*(one(int(o), int(n)) for o, n in ranges)))

        return call(lambda: sync(fs.loop, every), url, "read ranges of", self.retry)

    def download_identified(self, url: str, local: str, accept: Callable[[ObjectInfo], None]) -> bool:
        """Download an object to the local file ``local`` through obstore where
        :mod:`fastmix_data.storage.s3_get` may read it (an S3 object in a DataLoader worker), calling
        ``accept(identity)`` with the size and ETag / version id its GET answered with before any of
        the body is read (it raises to refuse a changed object: nothing is then downloaded, and no
        HEAD was needed). False, with nothing done, where obstore does not read (the caller uses
        `stat` and `download`)."""
        store, key = self._obstore(url)
        if store is None:
            return False
        from fastmix_data.storage import s3_get

        def check(size: int, version: str) -> None:
            accept(ObjectInfo(url, size, version))

        call(lambda: s3_get.get_to_file(store, key, local, check), url, "download", self.retry)
        return True

    def _obstore(self, url: str):
        """``(obstore store, key)`` for ``url`` when obstore does its GETs, else ``(None, key)``."""
        if scheme_of(url) not in ("s3", "s3a"):
            return None, ""
        from fastmix_data.storage import s3_get

        fs, path = filesystem(url, self.storage_options)  # not started: obstore may do the GETs
        bucket, key, _ = fs.split_path(path)
        if not s3_get.usable_key(key):  # e.g. "a//b": S3 allows it, object_store does not
            return None, key
        return s3_get.store_for(bucket, _options(scheme_of(url), self.storage_options)), key

    def download(self, url: str, local: str) -> None:
        """Copy an object to the local file ``local`` (streamed, not held in memory)."""
        fs, path = self.fs(url)
        call(lambda: fs.get_file(path, local), url, "download", self.retry)

    def upload(self, local: str, url: str, atomic_put: bool) -> None:
        """Publish the local file at ``url``: one upload when the store makes objects visible only
        when complete (``atomic_put``), else upload to a temporary key and move it into place."""
        fs, path = self.fs(url)
        if atomic_put:
            call(lambda: fs.put_file(local, path), url, "upload to", self.retry)
            return
        tmp = f"{path}.tmp-{os.urandom(6).hex()}"
        try:
            call(lambda: fs.put_file(local, tmp), url, "upload to", self.retry)
            call(lambda: fs.mv(tmp, path), url, "publish", self.retry)
        except BaseException:
            try:
                fs.rm(tmp)
            except Exception:  # the temporary key may not exist; the original error matters
                pass
            raise

    def open(self, url: str):
        """A read-only file object over the object (fsspec, read-ahead buffered)."""
        fs, path = self.fs(url)
        return call(lambda: fs.open(path, "rb"), url, "open", self.retry)
