"""Where published weights travel: a c10d TCP store, or a file / object-store URL (fsspec).

Both hold two keys, ``latest`` and ``alive`` (documents of :mod:`fastmix_data.live.wire`), written
whole by the publisher and read whole by the job. A publisher writes, a follower reads.

* ``tcp://HOST:PORT``: the publisher hosts a ``torch.distributed.TCPStore`` listening on HOST:PORT
  (port 0: any free port; the publisher's ``uri`` says which). c10d's own listener binds every
  interface whatever HOST says, so the publisher binds the socket itself and hands it over
  (``master_listen_fd``): it listens on HOST only. HOST must be a loopback address unless the
  publisher is given ``allow_remote=True`` and a shared token; a follower connecting to a
  non-loopback HOST needs the token too (documents are then signed and checked). The store does not
  authenticate connections: on a network, the token is what makes a forged update fail.
* anything else (``/shared/run/weights``, ``file:///…``, ``s3://bucket/run/weights``, …): a
  directory holding ``latest.json`` and ``alive.json``, replaced atomically (temp file + rename on
  a local or shared disk, one PUT on an object store).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import threading
import urllib.parse

import torch

from fastmix_data.errors import PublishError

TOKEN_ENV = "FASTMIX_DATA_TOKEN"  # the shared token, when not passed explicitly
KEYS = ("latest", "alive")
CONNECT_TIMEOUT_S = 2.0


class TransportUnavailable(OSError):
    """The transport cannot be reached now (publisher down, network, storage error)."""


def token_from_env(token: str | None) -> str | None:
    """``token``, else the ``FASTMIX_DATA_TOKEN`` environment variable, else None."""
    return token if token else (os.environ.get(TOKEN_ENV) or None)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_tcp(uri: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://HOST:PORT`` URI, None for any other URI.

    Raises:
        PublishError: a tcp URI without a port, or with a path.
    """
    if not uri.startswith("tcp://"):
        return None
    parts = urllib.parse.urlsplit(uri)
    if parts.port is None or not parts.hostname or parts.path not in ("", "/"):
        raise PublishError(f"weights URI {uri!r}: use tcp://HOST:PORT (port 0 picks a free port for a publisher)")
    return parts.hostname, parts.port


def open_transport(uri: str, *, serve: bool, token: str | None = None, allow_remote: bool = False):
    """The transport for ``uri``: hosted here when ``serve`` (the publisher), else read (a follower).

    Raises:
        PublishError: a non-loopback TCP address without ``allow_remote`` (publisher) or a token.
    """
    tcp = split_tcp(uri)
    if tcp is None:
        return FileTransport(uri)
    host, port = tcp
    if not is_loopback(host):
        if serve and not allow_remote:
            raise PublishError(
                f"publishing on {host}:{port} would accept connections from the network; the default is a loopback "
                "address (tcp://127.0.0.1:PORT). Pass allow_remote=True (CLI: --publish-allow-remote) and a shared "
                f"token (${TOKEN_ENV}) to listen on another address."
            )
        if not token:
            raise PublishError(
                f"{'publishing on' if serve else 'following'} {uri} (not a loopback address) needs a shared token: "
                f"set ${TOKEN_ENV} (or pass token=) on the publisher and on every rank of the job."
            )
    return StoreTransport.serve(host, port) if serve else StoreTransport(host, port)


class StoreTransport:
    """The two keys in a ``TCPStore``: hosted by the publisher (`serve`), or read by a follower."""

    def __init__(self, host: str, port: int, store: torch.distributed.Store | None = None):
        self.host, self.port = host, port
        self._store = store
        self._hosting = store is not None
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @classmethod
    def serve(cls, host: str, port: int) -> StoreTransport:
        """Listen on exactly ``host``:``port`` (0: a free port) and host the store there."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise PublishError(f"cannot listen on {host}:{port} for weight updates: {e}") from e
        port = sock.getsockname()[1]
        store = torch.distributed.TCPStore(
            host, port, is_master=True, wait_for_workers=False, master_listen_fd=sock.detach(),
            timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S),
        )  # the store owns the listening socket from here on
        return cls(host, port, store)

    def _client(self) -> torch.distributed.Store:
        if self._store is None:
            try:  # a silent probe first: c10d logs a stack trace for every failed connection attempt
                socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S).close()
                self._store = torch.distributed.TCPStore(
                    self.host, self.port, is_master=False, timeout=datetime.timedelta(seconds=CONNECT_TIMEOUT_S)
                )
            except (OSError, RuntimeError) as e:
                raise TransportUnavailable(f"no publisher at {self.uri}: {e}") from e
        return self._store

    def read(self, key: str) -> bytes | None:
        """The key's bytes, or None when it was never written."""
        with self._lock:
            try:
                store = self._client()
                return store.get(key) if store.check([key]) else None
            except RuntimeError as e:  # DistNetworkError and friends: reconnect at the next read
                self._store = None
                raise TransportUnavailable(f"lost the publisher at {self.uri}: {e}") from e

    def write(self, key: str, data: bytes) -> None:
        with self._lock:
            self._client().set(key, data)

    def close(self) -> None:
        with self._lock:
            self._store = None  # a hosting store stops listening when released


class FileTransport:
    """The two keys as ``<url>/latest.json`` and ``<url>/alive.json`` through fsspec."""

    def __init__(self, url: str):
        import fsspec

        self.uri = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as e:
            raise PublishError(f"weights URI {url!r}: {e}") from e
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}.json"

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise TransportUnavailable(f"cannot read {self._path(key)}: {e}") from e

    def write(self, key: str, data: bytes) -> None:
        write_atomic(self.fs, self._path(key), data, local=self.local)

    def close(self) -> None:
        pass


def write_atomic(fs, path: str, data: bytes, *, local: bool) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new bytes, never a mix:
    temp file + fsync + rename on a local or shared disk, a single PUT on an object store."""
    if not local:
        fs.pipe_file(path, data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
