"""Retries with exponential backoff and full jitter, and the error after the last try.

Transient failures are retried: connection resets and drops, timeouts, HTTP 408/429 and every 5xx
(an S3 ``SlowDown``/``503``, a proxy's ``502``). Everything else (404, 403, a bad request, a changed
object) fails at once. The client libraries' own retry loops are switched off where we can
(:mod:`fastmix_data.storage.fs`), so this module is the one owner of how often and how long we try.

Delay before try ``n + 1`` (``n`` >= 1): a uniform draw in ``[0, min(max_delay, base_delay * 2**(n-1))]``
("full jitter": many ranks that failed together do not retry together). The draws come from a
per-process ``random.Random`` seeded from the OS: retry timing is the one thing here that must *not*
be deterministic, and it never changes what is read.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from fastmix_data.errors import FastMixDataError, SourceError
from fastmix_data.storage.urls import redact

log = logging.getLogger(__name__)
T = TypeVar("T")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SHUTDOWN = "cannot schedule new futures after shutdown"
_TRANSIENT_NAMES = frozenset(
    {
        "ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError",
        "ResponseStreamingError", "IncompleteReadError", "ProtocolError", "IncompleteRead",
        "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
        "ServerTimeoutError", "FSTimeoutError", "HTTPClientError", "RemoteDisconnected",
        "ContentLengthError", "TransferEncodingError", "ConnectionResetError", "BrokenPipeError",
    }
)  # fmt: skip
_jitter = random.Random()


class RemoteError(SourceError):
    """A remote read or write failed after the last try (or at once, for a permanent failure).

    Attributes:
        url: the redacted URL.
        status: the HTTP status when there was one, else None.
        tries: how many attempts were made.
    """

    def __init__(self, message: str, url: str, status: int | None, tries: int):
        super().__init__(message)
        self.url, self.status, self.tries = url, status, tries


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to try a remote call.

    Attributes:
        tries: attempts in all, including the first (default 6).
        base_delay: seconds; the cap of the first backoff draw (default 0.2).
        max_delay: seconds; no single wait is longer (default 10).
    """

    tries: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based): full jitter."""
        return _jitter.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def status_of(exc: BaseException) -> int | None:
    """The HTTP status carried by ``exc`` or anything in its cause chain, if any."""
    for e in _chain(exc):
        for attr in ("status", "status_code", "code"):
            value = getattr(e, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            value = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(value, int):
                return value
    return None


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: connection drops, timeouts, 408/429/5xx."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if any(_SHUTDOWN in str(e) for e in _chain(exc)):
        return False  # the interpreter is exiting (asyncio can no longer resolve names): no retry helps
    status = status_of(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    for e in _chain(exc):
        if isinstance(e, ConnectionError | TimeoutError | socket.timeout | asyncio.TimeoutError):
            return True
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
        text = str(e)
        if any(s in text for s in ("SlowDown", "Service Unavailable", "Connection reset", "timed out")):
            return True
    return False


def _advice(status: int | None, exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) or status == 404:
        return "check the URL, or re-index the source if the object was deleted"
    if isinstance(exc, PermissionError) or status in (401, 403):
        return ("check the credentials (environment, profile or instance role; storage_options=) and "
                "that they may read this object")
    if status is not None and status in TRANSIENT_STATUS or is_transient(exc):
        return "the store is unavailable or overloaded; retry later or raise RetryPolicy.tries"
    return "check the URL and the store"


def call(fn: Callable[[], T], url: str, what: str, policy: RetryPolicy | None = None) -> T:
    """``fn()``, retried on transient failures per ``policy``.

    Args:
        fn: the remote call (no arguments).
        url: the object it concerns (redacted before it is logged or put in an error).
        what: a verb phrase for messages, e.g. ``"read"``, ``"list"``.
        policy: retry settings (default :class:`RetryPolicy()`).

    Raises:
        RemoteError: after the last try, or at once for a permanent failure; its message names the
            URL, the HTTP status (when any), the tries and what to do. The original exception is
            chained as ``__cause__``. The library's own errors raised by ``fn`` (e.g.
            ``ShardChangedError`` from a check of the answer) pass through unchanged, not retried.
    """
    policy = policy or RetryPolicy()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except FastMixDataError:  # RemoteError, or the library's own refusal (e.g. a changed shard)
            raise
        except Exception as exc:  # classified below; nothing is swallowed
            transient = is_transient(exc)
            if transient and attempt < policy.tries:
                wait = policy.delay(attempt)
                log.info("%s %s failed (%s); try %d of %d in %.2f s", what, redact(url), type(exc).__name__,
                         attempt + 1, policy.tries, wait)
                time.sleep(wait)
                continue
            status = status_of(exc)
            safe = redact(url)
            raise RemoteError(
                f"cannot {what} {safe}: {type(exc).__name__}"
                + (f" (HTTP {status})" if status is not None else "")
                + f" after {attempt} {'try' if attempt == 1 else 'tries'}; {_advice(status, exc)}",
                safe,
                status,
                attempt,
            ) from exc
