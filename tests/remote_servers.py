"""Real servers on loopback for remote-source tests and benchmarks: an S3 server (moto's server mode),
an HTTP file server (Python's http.server, with the Range and ETag support every object store has),
and a fault-injecting HTTP proxy (latency per request, dropped connections, 5xx answers).

Every server binds 127.0.0.1 port 0 (a free port) and runs in threads of this process, or, for the
benchmark, in a child process (`start_moto_process`) so that the server's work does not share the
client's GIL. Nothing here mocks a client library: s3fs/botocore, aiohttp, MosaicML Streaming and
litdata talk HTTP to these servers.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

FAKE_KEY_ID = "AKIAFASTMIXTESTKEY01"
FAKE_SECRET = "fastmixTestSecretValue0123456789abcdefXYZ"  # must never appear in states, logs or errors


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An S3 server (moto) on 127.0.0.1, a free port, in a thread; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


_MOTO_CHILD = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


_PIDS: dict[str, int] = {}  # URL of a server started by `_child` -> its process id


def server_pid(url: str) -> int:
    """The process id of the child process serving ``url`` (`moto_process`, `proxy_process`,
    `http_process`), e.g. to read its CPU time."""
    return _PIDS[url]


@contextlib.contextmanager
def _child(code: str, *args: str, url: str = "{}") -> Iterator[str]:
    """Run ``code`` in a child Python; yield ``url`` formatted with the first line it prints; stop it
    (close its stdin) when the block ends."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    served = url.format(proc.stdout.readline().strip())
    _PIDS[served] = proc.pid
    try:
        yield served
    finally:
        _PIDS.pop(served, None)
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    """An S3 server (moto) in a child process (its own GIL); yields its endpoint URL."""
    with _child(_MOTO_CHILD, url="http://127.0.0.1:{}") as url:
        yield url


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for clients of the loopback S3 server (fake credentials, the endpoint)."""
    return {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "S3_ENDPOINT_URL": endpoint,
    }


def upload_dir(endpoint: str, local: str | os.PathLike, bucket: str, prefix: str) -> list[str]:
    """Create ``bucket`` (if needed) and upload every file under ``local`` to ``prefix/``; return the
    keys. Uses boto3 against the server, as any S3 client would."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=FAKE_KEY_ID,
                          aws_secret_access_key=FAKE_SECRET, region_name="us-east-1")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    keys = []
    for dirpath, _, names in os.walk(local):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            key = f"{prefix}/{os.path.relpath(path, local)}".replace(os.sep, "/").lstrip("/")
            client.upload_file(path, bucket, key)
            keys.append(key)
    return keys


class _Server(http.server.ThreadingHTTPServer):
    """A threading HTTP server with a listen backlog of 128 (the default 5 drops the SYNs of many
    concurrent clients, which then stall for a second or more before retrying)."""

    request_queue_size = 128
    daemon_threads = True


class RangeFileHandler(http.server.SimpleHTTPRequestHandler):
    """``http.server``'s file handler plus single byte ``Range`` requests (206) and an ``ETag``."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        if os.path.isdir(path) or not os.path.isfile(path):
            return super().send_head()
        st = os.stat(path)
        f = open(path, "rb")  # noqa: SIM115 (closed by the base class's copyfile caller)
        start, end = 0, st.st_size - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else max(0, st.st_size - int(b))
            end = min(int(b), st.st_size - 1) if a and b else end
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{st.st_size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        self.end_headers()
        f.seek(start)
        return _Limited(f, end - start + 1)


class _Limited:
    def __init__(self, f, n: int):
        self.f, self.n = f, n

    def read(self, size: int = -1) -> bytes:
        size = self.n if size < 0 else min(size, self.n)
        data = self.f.read(size)
        self.n -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


@contextlib.contextmanager
def http_server(directory: str | os.PathLike) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1, a free port; yields the base URL (ending in ``/``)."""
    handler = lambda *a, **kw: RangeFileHandler(*a, directory=str(directory), **kw)  # noqa: E731
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Faults:
    """What the proxy does to requests. Counters apply to the next requests, in order: first
    ``fail_status`` answers (``status``), then ``drop`` dropped connections, then normal service.
    ``latency`` seconds are added before every request is forwarded.

    Attributes (read back after a run): ``requests`` (all), ``failed`` and ``dropped`` counts,
    ``bytes`` of response bodies passed through.
    """

    latency: float = 0.0
    fail_status: int = 0
    status: int = 503
    drop: int = 0
    requests: int = 0
    failed: int = 0
    dropped: int = 0
    bytes: int = 0
    log: list = field(default_factory=list)  # "METHOD path" of every request
    bytes_by_path: dict = field(default_factory=dict)  # response body bytes per request path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_action(self, line: str = "") -> str:
        with self.lock:
            self.requests += 1
            self.log.append(line)
            if self.fail_status > 0:
                self.fail_status -= 1
                self.failed += 1
                return "fail"
            if self.drop > 0:
                self.drop -= 1
                self.dropped += 1
                return "drop"
            return "pass"


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


def _proxy_handler(upstream: tuple[str, int], faults: Faults):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/__faults__"):  # counters for a benchmark in another process
                self._report()
                return
            if faults.latency:
                time.sleep(faults.latency)
            action = faults.next_action(f"{self.command} {self.path}")
            if action == "drop":
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if action == "fail":
                payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                self.send_response(faults.status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            conn = http.client.HTTPConnection(*upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            with faults.lock:
                n = len(data) if self.command != "HEAD" else 0
                faults.bytes += n
                key = self.path.split("?", 1)[0]
                faults.bytes_by_path[key] = faults.bytes_by_path.get(key, 0) + n
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else resp.getheader("Content-Length", "0"))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _report(self) -> None:
            with faults.lock:
                calls: dict[str, int] = {}  # "METHOD path" (no query) -> requests
                for line in faults.log:
                    calls[line.split("?", 1)[0]] = calls.get(line.split("?", 1)[0], 0) + 1
                payload = json.dumps({"requests": faults.requests, "bytes": faults.bytes, "calls": calls,
                                      "bytes_by_path": faults.bytes_by_path}).encode()
                if self.path.endswith("/reset"):
                    faults.requests, faults.bytes, faults.bytes_by_path, faults.log = 0, 0, {}, []
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


@contextlib.contextmanager
def fault_proxy(upstream_url: str, faults: Faults) -> Iterator[str]:
    """An HTTP proxy on 127.0.0.1 (free port) in front of ``upstream_url`` that applies ``faults``;
    yields its base URL (same path layout as the upstream)."""
    rest = upstream_url.split("://", 1)[1].rstrip("/")
    host, _, port = rest.partition("/")[0].partition(":")
    server = _Server(("127.0.0.1", 0), _proxy_handler((host, int(port or 80)), faults))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        suffix = upstream_url.split("://", 1)[1][len(rest.partition("/")[0]):]
        yield f"http://127.0.0.1:{server.server_address[1]}{suffix}"
    finally:
        server.shutdown()
        server.server_close()


_PROXY_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from remote_servers import Faults, fault_proxy
with fault_proxy(sys.argv[2], Faults(latency=float(sys.argv[3]))) as url:
    print(url, flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def proxy_process(upstream_url: str, latency: float) -> Iterator[str]:
    """A latency-injecting proxy in a child process (its own GIL); yields its URL. Its counters are
    at ``GET <url>/__faults__`` (JSON: requests, bytes, requests per "METHOD path", bytes per path;
    ``/__faults__/reset`` returns them and starts over)."""
    with _child(_PROXY_CHILD, os.path.dirname(os.path.abspath(__file__)), upstream_url, str(latency)) as url:
        yield url


def proxy_counters(proxy_url: str, reset: bool = False) -> dict:
    """The counters of a `proxy_process` proxy."""
    import urllib.request

    with urllib.request.urlopen(proxy_url.rstrip("/") + "/__faults__" + ("/reset" if reset else "")) as r:
        return json.loads(r.read())


_HTTP_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from remote_servers import http_server
with http_server(sys.argv[2]) as url:
    print(url, flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def http_process(directory: str | os.PathLike) -> Iterator[str]:
    """`http_server` in a child process (its own GIL); yields the base URL."""
    with _child(_HTTP_CHILD, os.path.dirname(os.path.abspath(__file__)), str(directory)) as url:
        yield url
