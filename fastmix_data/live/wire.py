"""The wire format of published weights: two small JSON documents, never pickle.

``latest`` holds the newest update (see docs/live.md for a worked example)::

    {"format": "fastmix_data/weights-update", "version": 1, "run_id": "9b1f0c2e", "seq": 7,
     "time": 1764160000.25, "weights": {"code": 0.31, "web": 0.69}, "units": "tokens",
     "step": 140, "sig": null}

``alive`` is the publisher's heartbeat, rewritten every ``heartbeat_s``::

    {"format": "fastmix_data/weights-alive", "version": 1, "run_id": "9b1f0c2e", "seq": 7,
     "digest": "5d41…", "beat": 52, "time": 1764160003.0, "closed": false, "sig": null}

``seq`` numbers a run's updates 1, 2, ... (a restarted publisher continues it); ``digest`` is the
SHA-256 of the bytes of ``latest`` (a follower reads ``latest`` only when ``seq`` or ``digest``
changed); ``beat`` counts heartbeats; ``closed`` says the publisher finished on purpose. With a shared token, ``sig`` is the
hex HMAC-SHA256 of the document's canonical JSON (sorted keys, no spaces) without ``sig``; a
follower with a token rejects a document whose ``sig`` does not match.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from typing import Any

UPDATE_FORMAT = "fastmix_data/weights-update"
ALIVE_FORMAT = "fastmix_data/weights-alive"
WIRE_VERSION = 1
MAX_DOCUMENT_BYTES = 1 << 20  # a document larger than this is rejected unread


class WireError(ValueError):
    """A document that is not a valid update or heartbeat; the message says why."""


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "sig"}, sort_keys=True, separators=(",", ":")).encode()


def sign(doc: dict[str, Any], token: str | None) -> bytes:
    """``doc`` as UTF-8 JSON, with ``sig`` set from ``token`` (None: unsigned)."""
    doc = dict(doc)
    doc["sig"] = None if not token else hmac.new(token.encode(), _canonical(doc), hashlib.sha256).hexdigest()
    return json.dumps(doc, allow_nan=False).encode()


def update_document(run_id: str, seq: int, weights: Mapping[str, float], *, time: float, units: str | None,
                    step: int | None = None) -> dict[str, Any]:
    """An update document (unsigned; see `sign`). ``step``: the search's step, for the record."""
    return {"format": UPDATE_FORMAT, "version": WIRE_VERSION, "run_id": run_id, "seq": int(seq), "time": float(time),
            "weights": {str(k): float(v) for k, v in weights.items()}, "units": units, "step": step}


def alive_document(run_id: str, seq: int, digest: str | None, beat: int, *, time: float,
                   closed: bool = False) -> dict[str, Any]:
    """A heartbeat document (unsigned; see `sign`)."""
    return {"format": ALIVE_FORMAT, "version": WIRE_VERSION, "run_id": run_id, "seq": int(seq), "digest": digest,
            "beat": int(beat), "time": float(time), "closed": bool(closed)}


def parse(raw: bytes, expected_format: str, token: str | None) -> dict[str, Any]:
    """Decode and check one document's envelope: size, JSON object, format, version, signature,
    run id and seq types.

    Raises:
        WireError: with the reason.
    """
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise WireError(f"document of {len(raw)} bytes exceeds the limit of {MAX_DOCUMENT_BYTES}")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"not UTF-8 JSON ({e}); publishers write JSON documents, never pickle") from None
    if not isinstance(doc, dict):
        raise WireError(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != expected_format:
        raise WireError(f"format is {doc.get('format')!r}, expected {expected_format!r}")
    if doc.get("version") != WIRE_VERSION:
        raise WireError(f"wire version {doc.get('version')!r} is not supported (this build reads {WIRE_VERSION})")
    if token:
        want = hmac.new(token.encode(), _canonical(doc), hashlib.sha256).hexdigest()
        if not isinstance(doc.get("sig"), str) or not hmac.compare_digest(doc["sig"], want):
            raise WireError("signature does not match the shared token (unsigned, or signed with another token)")
    if not isinstance(doc.get("run_id"), str) or not doc["run_id"]:
        raise WireError(f"run_id must be a non-empty string, got {doc.get('run_id')!r}")
    if not isinstance(doc.get("seq"), int) or isinstance(doc["seq"], bool) or doc["seq"] < 0:
        raise WireError(f"seq must be a non-negative integer, got {doc.get('seq')!r}")
    return doc


def weights_of(doc: Mapping[str, Any]) -> dict[str, float]:
    """The update's ``weights`` as {source: float}; per-source checks are the stream's (names, sum).

    Raises:
        WireError: not a mapping of source names to finite numbers.
    """
    w = doc.get("weights")
    if not isinstance(w, dict) or not w:
        raise WireError(f"weights must be a non-empty object {{source: weight}}, got {w!r}")
    out = {}
    for name, v in w.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise WireError(f"weight of source {name!r} is {v!r}; weights must be finite numbers")
        out[name] = float(v)
    return out


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")
