"""The target of a search: what the found mixture should do well on. One type, used by every method.

Design problem: a target is usually stored as many files -- one per domain, or shards in
whatever order they were written. A reader that keeps "the first n sequences" sees the first
file(s) only (a target stored as one file per domain came out 99.6 % one domain), and two methods
that subsample differently optimise two different targets under one ``--target``.

Solution: :func:`load_target` opens the target with the sources layer (any supported format),
lists every document of every file from the shard index, draws a seeded uniform sample of
documents across all of them (enough for ``max_seqs`` packed sequences, and at least
:data:`MIN_DOCS` of them), reads only the shards
that hold them, packs them like the stream's packing mode, and keeps a seeded uniform sample of
``max_seqs`` sequences. Every document is equally likely to be used, so every file and every
domain gets its token share in expectation. The result is a :class:`TargetSet`: packed sequences,
the group of each, the rule that turns per-sequence losses into the target loss (token mean, or
mean of per-group means), and for Q/A targets a loss mask over the answer tokens. FastMix reads it
as rotating batches (:class:`TargetBatches`), MixMin scores it, Aioli evaluates its groups.

Accepted specs: a path/glob/folder (token-averaged; grouped by a ``domain`` column when the shards
have one), ``{group: path}`` (group-averaged), a list of texts, or a :class:`TargetSet`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastmix_data.errors import SourceError
from fastmix_data.stream.tokenize import as_tokenizer

log = logging.getLogger(__name__)

#: column that groups the documents of a single-path target (e.g. a planted target's domains)
GROUP_COLUMN = "domain"
#: documents are sampled for this many times the tokens ``max_seqs`` sequences need (packing and
#: the tail of each group lose a little)
OVERSAMPLE = 1.3
#: but at least this many documents (or all of them) ...
MIN_DOCS = 2048
#: ... unless that is more than this many times the documents the tokens need. A uniform sample of
#: n documents estimates each file's / domain's token share with a relative error of about
#: cv / sqrt(n) (cv: the spread of the document lengths, often 1-3): the ~30 documents that 1,024
#: sequences of a 100-document planted target need gave its domains 0.16 / 0.23 instead of their
#: token shares 0.28 / 0.13, while 2,048 documents keep the error to a few percent.
MIN_DOCS_MAX_FACTOR = 16


# ============================================================================ the target set


@dataclass
class TargetSet:
    """A target: packed token sequences, the group of each, and how the target loss averages them.

    Attributes:
        tokens: int64 ``[N, L+1]``; inputs ``[:, :-1]``, predictions of ``[:, 1:]``.
        group: int64 ``[N]``, index into ``group_names`` (each sequence is packed within one group).
        group_names: e.g. the domains of the target.
        average: ``"tokens"`` (target loss = token mean over all sequences) or ``"groups"``
            (mean over groups of each group's token mean).
        name: a label for logs and result files.
        full_shares: token share of each group in the documents read (before ``max_seqs``).
        loss_mask: bool ``[N, L]`` or None; ``loss_mask[n, t]`` says whether the prediction of
            ``tokens[n, t+1]`` counts (Q/A targets: the answer tokens).
        doc: int64 ``[N]`` or None: the document each sequence starts in (ids unique across groups;
            MixMin scores a document's sequences as one example).
    """

    tokens: torch.Tensor
    group: torch.Tensor
    group_names: list[str]
    average: str = "tokens"
    name: str = "target"
    full_shares: dict[str, float] | None = None
    loss_mask: torch.Tensor | None = None
    doc: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.average not in ("tokens", "groups"):
            raise ValueError(f"target average must be 'tokens' or 'groups', got {self.average!r}")
        if self.tokens.dim() != 2 or self.tokens.shape[1] < 2:
            raise ValueError(f"target tokens must be [N, L+1] with L >= 1, got {tuple(self.tokens.shape)}")
        if self.group.shape != (self.tokens.shape[0],):
            raise ValueError(f"target group must be [N] = [{self.tokens.shape[0]}], got {tuple(self.group.shape)}")
        if len(self.tokens) == 0:
            raise ValueError(f"target {self.name!r} has no sequence (are its texts shorter than seq_len + 1 tokens?)")
        if self.loss_mask is not None and self.loss_mask.shape != (len(self.tokens), self.seq_len):
            raise ValueError(f"target loss_mask must be [N, L] = [{len(self.tokens)}, {self.seq_len}], "
                             f"got {tuple(self.loss_mask.shape)}")
        if self.doc is not None and self.doc.shape != (len(self.tokens),):
            raise ValueError(f"target doc must be [N] = [{len(self.tokens)}], got {tuple(self.doc.shape)}")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1] - 1)

    def scored(self) -> torch.Tensor:
        """float64 ``[N]``: predicted tokens that count in each sequence (L without a mask)."""
        if self.loss_mask is None:
            return torch.full((len(self),), float(self.seq_len), dtype=torch.float64)
        return self.loss_mask.sum(1).to(torch.float64)

    @property
    def num_tokens(self) -> int:
        """Predicted tokens forwarded by one pass over the set (N * L)."""
        return len(self) * self.seq_len

    def seq_losses(self, token_losses: torch.Tensor, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Per-sequence mean of ``token_losses`` ``[n, L]`` (the sequences ``rows`` of the set, all
        by default) over the tokens that count."""
        tl = token_losses.to(torch.float64)
        if self.loss_mask is None:
            return tl.mean(1)
        m = self.loss_mask[rows if rows is not None else slice(None)].to(tl.device, torch.float64)
        return (tl * m).sum(1) / m.sum(1).clamp_min(1.0)

    def counts(self) -> np.ndarray:
        return np.bincount(self.group.numpy(), minlength=len(self.group_names))

    def shares(self) -> dict[str, float]:
        """Share of each group's sequences in this set."""
        c = self.counts()
        return {n: float(x / c.sum()) for n, x in zip(self.group_names, c)}

    def example_weights(self) -> torch.Tensor:
        """float64 ``[N]`` summing to 1: the weight of each sequence's mean token loss in the target loss."""
        sc = self.scored()
        if self.average == "tokens":
            return sc / sc.sum()
        w = torch.zeros(len(self), dtype=torch.float64)
        present = [k for k in range(len(self.group_names)) if bool((self.group == k).any())]
        for k in present:
            m = self.group == k
            w[m] = sc[m] / sc[m].sum() / len(present)
        return w

    def group_weights(self) -> torch.Tensor:
        """float64 ``[G]``: each group's total weight in the target loss."""
        w = torch.zeros(len(self.group_names), dtype=torch.float64)
        return w.index_add_(0, self.group, self.example_weights())

    def loss(self, seq_losses: torch.Tensor) -> float:
        """Target loss from per-sequence mean token losses ``[N]``."""
        return float((self.example_weights() * seq_losses.to(torch.float64)).sum())

    def subset(self, idx: torch.Tensor | Sequence[int], name: str | None = None) -> TargetSet:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        mask = None if self.loss_mask is None else self.loss_mask[idx]
        doc = None if self.doc is None else self.doc[idx]
        return TargetSet(self.tokens[idx], self.group[idx], list(self.group_names), self.average,
                         name or self.name, self.full_shares, mask, doc)

    def split_indices(self, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted indices of a seeded split into (``fraction``, rest), stratified by group (each
        group with >= 2 sequences puts at least one on each side)."""
        ia, ib = stratified_split(self.group, len(self.group_names), fraction, seed)
        if len(ia) == 0 or len(ib) == 0:
            raise ValueError(f"target {self.name!r} has too few sequences ({len(self)}) to split")
        return ia, ib

    def split(self, fraction: float, seed: int = 0) -> tuple[TargetSet, TargetSet]:
        """``(fit, report)`` subsets from :meth:`split_indices`."""
        ia, ib = self.split_indices(fraction, seed)
        return self.subset(ia, f"{self.name}[fit]"), self.subset(ib, f"{self.name}[report]")

    def order(self, seed: int) -> torch.Tensor:
        """A seeded order of the sequences. With ``average="groups"`` it interleaves the groups
        round-robin (smaller groups cycled), so every batch holds them in (nearly) equal numbers."""
        g = torch.Generator().manual_seed(int(seed))
        if self.average == "groups":
            per = [torch.nonzero(self.group == k).flatten() for k in range(len(self.group_names))]
            per = [p[torch.randperm(len(p), generator=g)] for p in per if len(p)]
            n = max(len(p) for p in per)
            per = [p.repeat(math.ceil(n / len(p)))[:n] for p in per]
            return torch.stack(per, 1).flatten()
        return torch.randperm(len(self), generator=g)

    def batch(self, idx: torch.Tensor) -> dict:
        """``{"tokens": [b, L+1], "group": [b]}`` (and ``"loss_mask"`` for Q/A targets) of the sequences ``idx``."""
        out = {"tokens": self.tokens[idx], "group": self.group[idx]}
        if self.loss_mask is not None:
            out["loss_mask"] = self.loss_mask[idx]
        return out

    def batches(self, batch_size: int, seed: int = 0) -> list[dict]:
        """The set as batches covering every sequence once, in the order :meth:`order` gives."""
        o = self.order(seed)
        return [self.batch(o[i : i + batch_size]) for i in range(0, len(o), batch_size)]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.tokens.numpy().tobytes())
        h.update(self.group.numpy().tobytes())
        if self.loss_mask is not None:
            h.update(self.loss_mask.numpy().tobytes())
        h.update(json.dumps([self.group_names, self.average]).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "sequences": len(self), "seq_len": self.seq_len, "average": self.average,
                "groups": self.group_names, "shares": self.shares(), "full_shares": self.full_shares,
                "qa": self.loss_mask is not None, "fingerprint": self.fingerprint()}


def stratified_split(group: torch.Tensor, groups: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of a seeded split of items (of ``group`` ``[N]`` in ``range(groups)``) into
    (``fraction``, rest), per group; a group of >= 2 items puts at least one on each side."""
    g = torch.Generator().manual_seed(int(seed))
    a, b = [], []
    for k in range(groups):
        idx = torch.nonzero(group == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            cut = min(max(cut, 1), len(idx) - 1)
        a.append(idx[:cut])
        b.append(idx[cut:])
    return torch.cat(a).sort().values, torch.cat(b).sort().values


class TargetBatches:
    """An endless, resumable rotation through a :class:`TargetSet` in batches: each pass (epoch)
    uses a fresh seeded order (:meth:`TargetSet.order` with seed ``[seed, epoch]``), so the target
    gradient never comes from the same few sequences twice in a row."""

    def __init__(self, target: TargetSet, batch_size: int, seed: int = 0):
        self.target, self.batch_size, self.seed = target, int(batch_size), int(seed)
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> torch.Tensor:
        return self.target.order(int(np.random.default_rng([self.seed, self.epoch]).integers(2**31)))

    def next(self) -> dict:
        """The next batch (the last batch of a pass may be smaller)."""
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._make_order()
        idx = self._order[self.pos : self.pos + self.batch_size]
        self.pos += len(idx)
        return self.target.batch(idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: Mapping) -> None:
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])
        self._order = self._make_order()


# ============================================================================ packing


def pack_texts(texts: Iterable[Any], seq_len: int, tokenizer: Any = None) -> torch.Tensor:
    """Pack documents into ``[n, seq_len + 1]`` int64 sequences, as the stream's packing mode does.

    Each document (a string, tokenized by ``tokenizer`` -- UTF-8 bytes by default -- or an array
    of token ids) is followed by the tokenizer's end-of-document id (256 for bytes; none if it has
    none); the documents are concatenated and cut into consecutive ``seq_len + 1``-token
    sequences; the tail shorter than that is dropped.
    """
    return pack_documents(texts, seq_len, tokenizer)[0]


def pack_documents(texts: Iterable[Any], seq_len: int, tokenizer: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pack_texts` and, for each sequence, the index of the document its first token belongs to."""
    tok = as_tokenizer(tokenizer, getattr(tokenizer, "eos_id", None))
    eos = [] if tok.eos_id is None else [np.array([tok.eos_id], dtype=np.int64)]
    parts, lens = [], []
    for t in texts:
        ids = _ids(tok, t)
        parts += [ids, *eos]
        lens.append(len(ids) + len(eos))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(flat) // (seq_len + 1)
    ends = np.cumsum(np.asarray(lens, dtype=np.int64))
    doc = np.searchsorted(ends, np.arange(n, dtype=np.int64) * (seq_len + 1), side="right")
    return (torch.from_numpy(flat[: n * (seq_len + 1)].reshape(n, seq_len + 1).copy()),
            torch.from_numpy(doc.astype(np.int64)))


def _ids(tok, doc) -> np.ndarray:
    if isinstance(doc, str):
        return tok.encode(doc)
    if isinstance(doc, memoryview):
        return tok.encode(bytes(doc).decode("utf-8"))
    return np.asarray(doc, dtype=np.int64)


def target_from_texts(
    texts_by_group: Mapping[str, Sequence[Any]],
    seq_len: int,
    *,
    average: str = "tokens",
    max_seqs: int | None = None,
    seed: int = 0,
    name: str = "target",
    tokenizer: Any = None,
) -> TargetSet:
    """Pack each group's documents separately into a :class:`TargetSet`.

    ``max_seqs`` caps the number of sequences (evaluation cost): with ``average="tokens"`` a seeded
    uniform sample of all sequences (token shares kept in expectation), with ``"groups"`` at most
    ``max_seqs // G`` per group. ``full_shares`` records the token shares before the cap.
    """
    names = list(texts_by_group)
    toks, grp, docs, offset = [], [], [], 0
    for k, n in enumerate(names):
        t, d = pack_documents(texts_by_group[n], seq_len, tokenizer)
        toks.append(t)
        grp.append(torch.full((len(t),), k, dtype=torch.int64))
        docs.append(d + offset)
        offset += len(texts_by_group[n])
    tokens, group, doc = torch.cat(toks), torch.cat(grp), torch.cat(docs)
    counts = np.bincount(group.numpy(), minlength=len(names))
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty and (average == "groups" or len(empty) == len(names)):
        raise ValueError(f"target {name!r}: group(s) {empty} have no complete sequence of {seq_len + 1} tokens")
    if empty:  # token-averaged: a group too small for one sequence has (nearly) no weight anyway
        log.warning("target %r: group(s) %s hold less than one sequence of %d tokens and are left out",
                    name, empty, seq_len + 1)
        keep_groups = [k for k, c in enumerate(counts) if c > 0]
        remap = torch.full((len(names),), -1, dtype=torch.int64)
        remap[keep_groups] = torch.arange(len(keep_groups))
        names, group, counts = [names[k] for k in keep_groups], remap[group], counts[keep_groups]
    full = {n: float(c / counts.sum()) for n, c in zip(names, counts)}
    if max_seqs is not None and len(tokens) > max_seqs:
        keep = _cap(group, len(names), max_seqs, average, seed)
        tokens, group, doc = tokens[keep], group[keep], doc[keep]
    return TargetSet(tokens, group, names, average, name, full, doc=doc)


def _cap(group: torch.Tensor, G: int, max_seqs: int, average: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    if average == "tokens":
        return torch.randperm(len(group), generator=g)[:max_seqs].sort().values
    cap = max(1, max_seqs // G)
    keep = []
    for k in range(G):
        idx = torch.nonzero(group == k).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:cap]])
    return torch.cat(keep).sort().values


# ============================================================================ reading from shards


@dataclass
class _Docs:
    docs: list[Any]  # texts (str) or token-id arrays, in the sampled order
    groups: list[str] | None  # GROUP_COLUMN value per doc, when the shards have that column
    extra: dict[str, list]  # further columns (Q/A fields)
    total_docs: int


def _open(name: str, spec: Any, text_field: str, extra: Sequence[str]):
    from fastmix_data.sources import open_source

    try:
        return open_source(name, spec, text_field=text_field, extra_fields=(*extra, GROUP_COLUMN)), True
    except SourceError as e:
        if f"no column {GROUP_COLUMN!r}" not in str(e):
            raise
    return open_source(name, spec, text_field=text_field, extra_fields=tuple(extra)), False


def documents_to_read(total_docs: int, total_tokens: int | None, need_tokens: int | None) -> int:
    """How many of ``total_docs`` documents (``total_tokens`` tokens) a sample needing ``need_tokens``
    tokens reads: enough for ``OVERSAMPLE * need_tokens`` tokens, raised to :data:`MIN_DOCS` (at
    most :data:`MIN_DOCS_MAX_FACTOR` times the documents the tokens need) so that the token shares
    of its files and domains are kept; all of them when ``need_tokens`` is None."""
    if need_tokens is None or not total_tokens or total_tokens <= OVERSAMPLE * need_tokens:
        return total_docs
    n = max(1, math.ceil(total_docs * OVERSAMPLE * need_tokens / total_tokens))
    return min(total_docs, max(n, min(MIN_DOCS, MIN_DOCS_MAX_FACTOR * n)))


def sample_documents(name: str, spec: Any, *, need_tokens: int | None, seed: int, text_field: str = "text",
                     extra: Sequence[str] = ()) -> _Docs:
    """A seeded uniform sample of the documents of every shard of ``spec``, in random order:
    all of them when ``need_tokens`` is None or the source holds fewer than ``OVERSAMPLE *
    need_tokens`` tokens, else each document with the same probability, as many as
    :func:`documents_to_read` says. Only the shards holding sampled documents are read."""
    src, grouped = _open(name, spec, text_field, extra)
    rows = np.array([s.rows for s in src.shards], dtype=np.int64)
    total = int(rows.sum())
    order = np.random.default_rng([int(seed), 0x7A6]).permutation(total)
    order = order[: documents_to_read(total, src.tokens, need_tokens)]
    starts = np.concatenate([[0], np.cumsum(rows)])
    shard_of = np.searchsorted(starts, order, side="right") - 1
    picked: dict[int, tuple[Any, list, dict]] = {}
    for i in np.unique(shard_of):
        data = src.read_shard(int(i))
        body = data.ids if data.texts is None else data.texts
        picked[int(i)] = (body, data.extra.get(GROUP_COLUMN), data.extra)
    docs, groups, ext = [], [] if grouped else None, {c: [] for c in extra}
    for g, i in zip(order.tolist(), shard_of.tolist()):
        body, gcol, extra_cols = picked[i]
        r = g - int(starts[i])
        docs.append(body[r])
        if groups is not None:
            groups.append(str(gcol[r]))
        for c in extra:
            ext[c].append(extra_cols[c][r])
    return _Docs(docs, groups, ext, total)


def load_target(
    spec: Any,
    seq_len: int,
    *,
    max_seqs: int | None = 1024,
    seed: int = 0,
    average: str = "auto",
    name: str | None = None,
    tokenizer: Any = None,
    text_field: str = "text",
    answer_field: str | None = None,
    question_field: str = "question",
) -> TargetSet:
    """Turn a target spec into a :class:`TargetSet` (see the module docstring).

    Args:
        spec: a path/glob/folder or list of them (any supported format; token-averaged, grouped
            by a ``domain`` column when present), ``{group: spec}`` (group-averaged), a list of
            texts (one group), or a :class:`TargetSet` (returned as is).
        seq_len: L; sequences hold ``L + 1`` tokens.
        max_seqs: sequences kept (None: every document, packed).
        seed: the sample's seed.
        average: ``"tokens"``, ``"groups"`` or ``"auto"`` (groups for ``{group: spec}``).
        answer_field / question_field: a Q/A target: one sequence per row, question then answer
            then end-of-document, scored on the answer (and the final end-of-document) only.
    """
    if isinstance(spec, TargetSet):
        return spec
    need = None if max_seqs is None else max_seqs * (seq_len + 1)
    if answer_field is not None:
        return _qa_target(spec, seq_len, max_seqs, seed, name, tokenizer, answer_field, question_field)
    if isinstance(spec, Mapping):
        avg = "groups" if average == "auto" else average
        per_need = None if need is None else math.ceil(need / max(1, len(spec)))
        texts = {str(g): sample_documents(str(g), p, need_tokens=per_need if avg == "groups" else need, seed=seed,
                                          text_field=text_field).docs for g, p in spec.items()}
        return target_from_texts(texts, seq_len, average=avg, max_seqs=max_seqs, seed=seed,
                                 name=name or "+".join(texts), tokenizer=tokenizer)
    avg = "tokens" if average == "auto" else average
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(x, str) for x in spec) and not _looks_like_paths(spec):
        return target_from_texts({name or "target": list(spec)}, seq_len, average=avg, max_seqs=max_seqs, seed=seed,
                                 name=name or "target", tokenizer=tokenizer)
    label = name or _label(spec)
    d = sample_documents(label, spec, need_tokens=need, seed=seed, text_field=text_field)
    by_group: dict[str, list] = {}
    for i, doc in enumerate(d.docs):
        by_group.setdefault(d.groups[i] if d.groups is not None else label, []).append(doc)
    by_group = dict(sorted(by_group.items()))
    return target_from_texts(by_group, seq_len, average=avg, max_seqs=max_seqs, seed=seed, name=label,
                             tokenizer=tokenizer)


def _looks_like_paths(items: Sequence[str]) -> bool:
    from pathlib import Path

    return all("\n" not in s and len(s) < 4096 and ("*" in s or Path(s).exists()) for s in items)


def _label(spec: Any) -> str:
    from pathlib import Path

    first = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    p = Path(str(first).split("*")[0].rstrip("/"))
    return p.name or str(first)


def _qa_target(spec, seq_len, max_seqs, seed, name, tokenizer, answer_field, question_field) -> TargetSet:
    tok = as_tokenizer(tokenizer, getattr(tokenizer, "eos_id", None))
    label = name or _label(spec)
    d = sample_documents(label, spec, need_tokens=None, seed=seed, text_field=question_field, extra=(answer_field,))
    width = seq_len + 1
    eos = tok.eos_id if tok.eos_id is not None else 0
    rows_t, rows_m = [], []
    for q, a in zip(d.docs, d.extra[answer_field]):
        qi, ai = tok.encode(str(q)), tok.encode(str(a))
        ids = np.concatenate([qi, ai, [eos]])[:width]
        mask = np.zeros(width, dtype=bool)
        mask[len(qi) : len(qi) + len(ai) + 1] = True  # predicting the answer tokens and the final eos
        if not mask[1 : len(ids)].any():
            continue  # the question fills the whole sequence: nothing to score
        rows_t.append(np.pad(ids, (0, width - len(ids)), constant_values=eos))
        rows_m.append(mask[1:])  # aligned with the predictions of tokens[1:]
        if max_seqs is not None and len(rows_t) >= max_seqs:
            break
    if not rows_t:
        raise SourceError(f"Q/A target {label!r} has no row with an answer inside {seq_len} tokens")
    tokens = torch.from_numpy(np.stack(rows_t).astype(np.int64))
    return TargetSet(tokens, torch.zeros(len(tokens), dtype=torch.int64), [label], "tokens", label, {label: 1.0},
                     torch.from_numpy(np.stack(rows_m)), torch.arange(len(tokens)))


def iter_batches(target: TargetSet, batch_size: int) -> Iterator[dict]:
    """The set in its stored order, in batches (evaluation)."""
    for i in range(0, len(target), batch_size):
        yield target.batch(torch.arange(i, min(len(target), i + batch_size)))


__all__ = [
    "GROUP_COLUMN",
    "TargetBatches",
    "TargetSet",
    "iter_batches",
    "load_target",
    "pack_documents",
    "pack_texts",
    "documents_to_read",
    "sample_documents",
    "stratified_split",
    "target_from_texts",
]
