"""The proxy's token space: ids and vocabulary size from the sources' tokenizer, not bytes.

A search at scale trains its proxy on the ids the final model will see. They come from one of:

* a `tokenizers <https://github.com/huggingface/tokenizers>`_ file (``tokenizer.json``, e.g. a BPE):
  :func:`load_tokenizer` reads it; the result's ``tokenizer`` goes to
  ``MixtureStream(tokenizer=...)`` for text columns, its ``size`` to the proxy's ``vocab_size``;
* a pre-tokenized ids column (``input_ids``, read by the stream as it is): :func:`ids_vocabulary`
  takes the size declared by the tokenizer that made them, or scans the columns for the largest id;
* neither: the byte-level default (257 ids: 256 bytes and an end-of-document id).

:func:`resolve_vocabulary` picks among them. :func:`check_ids` turns an out-of-range id in a batch
into a clear error instead of an embedding lookup that fails deep inside torch (or a CUDA device
assert). The search calls it on every training micro-batch before it leaves the CPU
(``ProxyTrainer.train_step``, DoReMi's reference pass, FastMix's batches; a caller's stream that
yields batches already on the device: FastMix checks its first batch there) and on every target
batch (FastMix's target pass, ``evaluate``), so a proxy declared smaller than the data's ids stops
at the first such batch, named.

Example (a 2,000-id BPE trained on local text with the ``tokenizers`` library)::

    voc = load_tokenizer("tok/tokenizer.json")          # Vocabulary(size=2000, eos_id=1, ...)
    stream = MixtureStream(sources, weights, batch_size=16, seq_len=1024, tokenizer=voc.tokenizer)
    cfg = proxy_config("p20m", vocab_size=voc.padded(128))   # 2048: GPU-friendly head width
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastmix_data.errors import TokenizerError
from fastmix_data.stream.tokenize import BYTE_EOS, BYTE_VOCAB_SIZE, CallableTokenizer

log = logging.getLogger(__name__)

#: end-of-document token names tried, in order, when a tokenizer file's is not given
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]", "<|eot_id|>")


@dataclass(frozen=True)
class Vocabulary:
    """Where the proxy's token ids come from and how many there are.

    Attributes:
        size: ids lie in ``[0, size)``; the proxy's ``vocab_size`` must be at least this.
        eos_id: the end-of-document id appended between packed documents (None: nothing appended).
        origin: a human-readable description (``"bytes"``, ``"tokenizer file tok.json"``, ...).
        tokenizer: what ``MixtureStream(tokenizer=...)`` takes for text columns; None for ids columns.
    """

    size: int
    eos_id: int | None
    origin: str
    tokenizer: Any = None

    def padded(self, multiple: int = 128) -> int:
        """``size`` rounded up to a multiple (GPU matmuls run fastest on widths that are multiples
        of 64-128; the extra ids are never targets, so their logits are trained towards zero mass)."""
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        return -(-self.size // multiple) * multiple

    def to_dict(self) -> dict:
        """The JSON-able facts (recorded in a search's config file)."""
        return {"size": self.size, "eos_id": self.eos_id, "origin": self.origin}


class TokenizerFile:
    """A picklable callable ``text -> ids`` over a ``tokenizers`` JSON file (for DataLoader workers).

    Encodes without the file's post-processor specials (no BOS/CLS): the stream appends ``eos_id``
    between documents itself.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.json = Path(path).read_text(encoding="utf-8")
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(self.json)
        return self._tok

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __getstate__(self) -> dict:
        return {"path": self.path, "json": self.json, "_tok": None}


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> Vocabulary:
    """The :class:`Vocabulary` of a ``tokenizers`` JSON file.

    Args:
        path: the file (``tokenizer.json``; the ``tokenizers`` library's format, any model: BPE,
            Unigram, WordPiece, WordLevel).
        eos_token: the end-of-document token; default the first of :data:`EOS_NAMES` in the
            vocabulary, else none (documents are then packed without a separator, with a warning).

    Raises:
        TokenizerError: the file is missing, is not a tokenizers file, or lacks ``eos_token``.
    """
    p = Path(path)
    if not p.is_file():
        raise TokenizerError(f"tokenizer file {p} does not exist; pass the path of a tokenizers JSON file (tokenizer.json)")
    try:
        enc = TokenizerFile(p)
        tok = enc.tokenizer
    except ImportError as e:
        raise TokenizerError(f"reading {p} needs the tokenizers library: pip install tokenizers ({e})") from e
    except Exception as e:  # the library raises plain Exceptions for bad JSON
        raise TokenizerError(f"{p} is not a tokenizers JSON file ({type(e).__name__}: {e}); save one with Tokenizer.save()") from e
    size = int(tok.get_vocab_size(with_added_tokens=True))
    eos_id = _eos_id(tok, eos_token, p)
    digest = hashlib.sha256(enc.json.encode("utf-8")).hexdigest()[:16]
    stream_tok = CallableTokenizer(enc, eos_id=eos_id, name=f"tokenizers-{digest}", vocab_size=size)
    log.info("tokenizer %s: %d ids, end-of-document id %s", p, size, eos_id)
    return Vocabulary(size=size, eos_id=eos_id, origin=f"tokenizer file {p}", tokenizer=stream_tok)


def _eos_id(tok, eos_token: str | None, path: Path) -> int | None:
    if eos_token is not None:
        i = tok.token_to_id(eos_token)
        if i is None:
            raise TokenizerError(f"tokenizer {path} has no token {eos_token!r}; pass one of its special tokens as eos_token")
        return int(i)
    for name in EOS_NAMES:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    log.warning("tokenizer %s has none of the end-of-document tokens %s: documents are packed without a separator", path, EOS_NAMES)
    return None


def _has_ids(src: Any) -> bool:
    """Whether an opened source has a pre-tokenized ids column."""
    return getattr(getattr(src, "columns", None), "ids", None) is not None


def ids_vocabulary(sources: Mapping[str, Any], vocab_size: int | None = None) -> Vocabulary:
    """The :class:`Vocabulary` of pre-tokenized ids columns.

    Args:
        sources: ``{name: opened source}`` (:func:`fastmix_data.sources.open_source` results, or a
            stream's ``.sources``); each must have an ids column.
        vocab_size: the size declared by the tokenizer that made the ids (recommended: a scan
            cannot see ids the data does not use). When None every shard is read once for its
            largest id (with a progress bar), and the size is that id + 1.

    Raises:
        TokenizerError: a source has no ids column, or holds a negative id.
    """
    for name, src in sources.items():
        if not _has_ids(src):
            raise TokenizerError(f"source {name!r} has no pre-tokenized ids column; give a tokenizer file for its text")
    if vocab_size is not None:
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise TokenizerError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        return Vocabulary(size=vocab_size, eos_id=None, origin=f"declared vocab_size={vocab_size} for ids columns")
    top = _scan_max_id(sources)
    return Vocabulary(size=top + 1, eos_id=None, origin=f"largest id {top} in the ids columns of {sorted(sources)}")


def _scan_max_id(sources: Mapping[str, Any]) -> int:
    from tqdm.auto import tqdm

    top = -1
    work = [(n, s, i) for n, s in sources.items() for i in range(len(s.shards))]
    for name, src, i in tqdm(work, desc="scanning ids for the vocabulary", unit="shard", disable=len(work) < 8):
        for row in src.read_shard(i).ids or ():
            if len(row):
                lo, hi = int(np.min(row)), int(np.max(row))
                if lo < 0:
                    raise TokenizerError(f"shard {src.shards[i].path} of source {name!r} holds a negative token id {lo}")
                top = max(top, hi)
    if top < 0:
        raise TokenizerError(f"the ids columns of {sorted(sources)} hold no token at all")
    return top


def byte_vocabulary() -> Vocabulary:
    """The byte-level default: 256 byte ids and the end-of-document id 256."""
    return Vocabulary(size=BYTE_VOCAB_SIZE, eos_id=BYTE_EOS, origin="bytes", tokenizer=None)


def resolve_vocabulary(
    tokenizer: str | Path | None = None,
    *,
    sources: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
    eos_token: str | None = None,
) -> Vocabulary:
    """The proxy's vocabulary: a tokenizer file when given; else the ids columns of ``sources`` when
    every one has them (``vocab_size`` declared or scanned); else bytes. A declared ``vocab_size``
    smaller than the tokenizer's is an error."""
    if tokenizer is not None:
        voc = load_tokenizer(tokenizer, eos_token)
        if vocab_size is not None and vocab_size < voc.size:
            raise TokenizerError(f"vocab_size={vocab_size} is smaller than tokenizer {tokenizer}'s {voc.size} ids")
        return voc
    if sources and all(_has_ids(s) for s in sources.values()):
        return ids_vocabulary(sources, vocab_size)
    if vocab_size is not None and vocab_size < BYTE_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size={vocab_size} is smaller than the byte tokenizer's {BYTE_VOCAB_SIZE} ids")
    return byte_vocabulary()


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(path: str, eos_token: str | None, mtime_ns: int) -> Vocabulary:
    return load_tokenizer(path, eos_token)


def search_vocabulary(train: Any, sources: Mapping[str, Any] | None = None) -> Vocabulary:
    """The vocabulary a search's proxy trains on, from its ``train`` config section
    (:class:`~fastmix_data.search.config.TrainConfig`): ``train.tokenizer`` when set; else the
    sources' pre-tokenized ids columns when every source has one (the size declared as the proxy's
    ``vocab_size`` override, else scanned); else bytes. ``sources`` are specs (paths, globs) or
    opened sources; None (a caller's own stream) means bytes unless a tokenizer is set. A tokenizer
    file is read once per process (cached by path and modification time)."""
    declared = train.proxy.overrides.get("vocab_size")
    if train.tokenizer is not None:
        p = Path(train.tokenizer)
        voc = _cached_tokenizer(str(p), train.eos_token, p.stat().st_mtime_ns if p.is_file() else 0)
        if declared is not None and declared < voc.size:
            raise TokenizerError(f"train.proxy vocab_size={declared} is smaller than tokenizer {p}'s {voc.size} ids")
        return voc
    if sources:
        opened = _open_specs(sources)
        if all(_has_ids(s) for s in opened.values()):
            return ids_vocabulary(opened, declared)
    return byte_vocabulary()


def _open_specs(sources: Mapping[str, Any]) -> dict[str, Any]:
    from fastmix_data.sources import open_source

    return {n: s if hasattr(s, "shards") else open_source(n, s) for n, s in sources.items()}


def check_ids(tokens, vocab_size: int, where: str) -> None:
    """Raise :class:`TokenizerError` naming ``where`` when ``tokens`` (a CPU tensor or array) holds an
    id outside ``[0, vocab_size)``. Cheap: one min/max over the batch, before it goes to a device."""
    if tokens.numel() if hasattr(tokens, "numel") else np.size(tokens):
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = hi if hi >= vocab_size else lo
            raise TokenizerError(
                f"{where} holds token id {bad}, outside the proxy's vocabulary [0, {vocab_size}): train the proxy "
                "with the tokenizer that made the data (its vocab_size), or re-tokenize the data"
            )


__all__ = [
    "EOS_NAMES",
    "TokenizerFile",
    "Vocabulary",
    "byte_vocabulary",
    "check_ids",
    "ids_vocabulary",
    "load_tokenizer",
    "resolve_vocabulary",
    "search_vocabulary",
]
