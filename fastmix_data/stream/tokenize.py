"""Tokenizers for packing mode: the byte-level default and a wrapper for any callable."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from fastmix_data.sources.base import IdRows

BYTE_VOCAB_SIZE = 257
"""Ids 0..255 are UTF-8 bytes; 256 is the end-of-document token."""
BYTE_EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids, with 256 as end-of-document. Needs no files, no network."""

    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_EOS

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of ``text``, without the end-of-document token."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_rows(self, texts) -> IdRows:
        """Every row's UTF-8 bytes as ids (uint8 values), without end-of-document tokens; for texts
        read as Arrow UTF-8 (`sources.arrow.Utf8Rows`) a zero-copy view of the column's buffer."""
        offsets = getattr(texts, "offsets", None)
        if offsets is not None:
            values = np.frombuffer(texts.values, dtype=np.uint8)
            first = int(offsets[0]) if len(offsets) else 0
            return IdRows(values[first : int(offsets[-1]) if len(offsets) else 0], offsets.astype(np.int64) - first)
        return IdRows.of([np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts])

    def decode(self, ids) -> str:
        """Text of ``ids``; end-of-document tokens become newlines."""
        ids = np.asarray(ids)
        return bytes(int(i) if i < 256 else 10 for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes-v1"


class CallableTokenizer:
    """Adapts a user tokenizer: a callable ``str -> list[int]``, or a `tokenizers.Tokenizer`.

    Args:
        fn: the callable, or an object with ``encode(text)`` returning ids or an object with ``.ids``.
        eos_id: the end-of-document id appended to every document (None: append nothing).
        name: a stable name for fingerprints and caches (defaults to the object's class name).
        vocab_size: the vocabulary size if known (the proxy trainer needs it).
    """

    def __init__(self, fn: Any, eos_id: int | None, name: str | None = None, vocab_size: int | None = None):
        self.fn = fn
        self.eos_id = eos_id
        self.name = name or type(fn).__name__
        self.vocab_size = vocab_size if vocab_size is not None else _vocab_size(fn)

    def encode(self, text: str) -> np.ndarray:
        out = self.fn.encode(text) if hasattr(self.fn, "encode") and not callable_plain(self.fn) else self.fn(text)
        ids = getattr(out, "ids", out)
        return np.asarray(ids, dtype=np.int64)

    def encode_rows(self, texts) -> IdRows:
        """Every row's ids (one call of the tokenizer per row), without end-of-document tokens."""
        return IdRows.of([self.encode(t if type(t) is str else str(t, "utf-8")) for t in texts])

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}|{self.eos_id}|{self.vocab_size}".encode())
        for probe in ("The quick brown fox.", "def f(x):\n    return x", "ünïcødé ✓"):
            h.update(self.encode(probe).tobytes())
        return "callable-" + h.hexdigest()[:16]


def callable_plain(fn: Any) -> bool:
    """True for plain functions/lambdas (call them), False for tokenizer objects (use encode)."""
    return callable(fn) and not hasattr(fn, "get_vocab_size") and not hasattr(fn, "encode")


def _vocab_size(fn: Any) -> int | None:
    for attr in ("get_vocab_size", "vocab_size"):
        v = getattr(fn, attr, None)
        if callable(v):
            try:
                return int(v())
            except TypeError:
                continue
        if isinstance(v, int):
            return v
    return None


def token_dtype(max_id: int | None) -> np.dtype:
    """The narrowest unsigned dtype for ids up to ``max_id`` (uint16, else uint32; None: uint32).

    Raises:
        ValueError: ``max_id`` does not fit 32 bits."""
    if max_id is None:
        return np.dtype(np.uint32)
    if max_id < 1 << 16:
        return np.dtype(np.uint16)
    if max_id < 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"token id {max_id} does not fit 32 bits")


def as_tokenizer(tok: Any, eos_id: int | None = None) -> ByteTokenizer | CallableTokenizer:
    """None or "bytes" -> ByteTokenizer; a tokenizer object or callable -> CallableTokenizer."""
    if tok is None or tok == "bytes":
        return ByteTokenizer()
    if isinstance(tok, (ByteTokenizer, CallableTokenizer)):
        return tok
    if isinstance(tok, Callable) or hasattr(tok, "encode"):
        return CallableTokenizer(tok, eos_id=eos_id)
    raise TypeError(f"tokenizer must be None, 'bytes' or a callable/tokenizer object, got {tok!r}")
