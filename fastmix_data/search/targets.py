"""Targets of a search: what the found mixture should do well on.

Two forms, one per kind of method:

* **target batches** (:func:`target_batches`) for FastMix (`run_search`): a list of
  ``{"tokens": [B, L+1], "loss_mask": [B, L]}`` batches from held-out shards packed exactly as the
  training stream packs them, or from Q/A pairs where only the answer tokens count. A spec is a
  path / glob / list of shards (any supported format), or ``{"path": ..., "question_field": ...,
  "answer_field": ...}``.
* **target sets** (:class:`TargetSet`, :func:`as_target`) for the methods that train proxies on
  static mixtures (MixMin, Aioli, DoReMi, the baselines): packed sequences with a group each and the
  rule that reduces per-sequence losses to the target loss (token mean, or mean of group means).
  :func:`pack_texts` packs documents as the stream's packing mode does; :func:`target_from_texts`
  and :func:`as_target` build a set from texts, Parquet files or ``{group: Parquet}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmix_data.errors import SourceError
from fastmix_data.sources import open_source
from fastmix_data.stream.mixture import MixtureStream
from fastmix_data.stream.tokenize import as_tokenizer

# ============================================================================ target batches (FastMix)


def target_batches(
    spec: Any, seq_len: int, batch_size: int, *, seed: int = 0, max_batches: int = 64, tokenizer: Any = None
) -> list[dict]:
    """Up to ``max_batches`` target batches ``{"tokens": [B, L+1], "loss_mask": [B, L]}``.

    Plain shards are packed exactly as the training stream packs them (one pass, seeded order);
    Q/A specs give one sequence per pair (question then answer, padded at the end with the
    end-of-document id), the mask covering the answer tokens only.
    """
    if isinstance(spec, Mapping) and "answer_field" in spec:
        return _qa_batches(spec, seq_len, batch_size, max_batches, tokenizer)
    stream = MixtureStream({"target": spec}, {"target": 1.0}, batch_size=batch_size, seed=seed, seq_len=seq_len,
                           tokenizer=tokenizer, exhaustion={"target": "stop"}, world_size=1, rank=0)
    out = []
    for batch in stream:
        out.append({"tokens": batch["tokens"], "loss_mask": torch.ones(batch["tokens"].shape[0], seq_len, dtype=torch.bool)})
        if len(out) >= max_batches:
            break
    if not out:  # fewer tokens than one batch: take what there is, unbatched
        raise SourceError(
            f"target {spec!r} holds fewer than {batch_size} sequences of {seq_len + 1} tokens; "
            "give more target text or a smaller batch_size/seq_len"
        )
    return out


def _qa_batches(spec: Mapping, seq_len: int, batch_size: int, max_batches: int, tokenizer: Any) -> list[dict]:
    tok = as_tokenizer(tokenizer)
    qf, af = spec.get("question_field", "question"), spec["answer_field"]
    src = open_source("target", spec["path"], text_field=None, ids_field=None, extra_fields=[qf, af])
    width = seq_len + 1
    rows_t, rows_m = [], []
    for i in range(len(src.shards)):
        data = src.read_shard(i)
        for q, a in zip(data.extra[qf], data.extra[af]):
            qi, ai = tok.encode(str(q)), tok.encode(str(a))
            ids = np.concatenate([qi, ai, [tok.eos_id if tok.eos_id is not None else 0]])[:width]
            mask = np.zeros(width, dtype=bool)
            mask[len(qi) : len(qi) + len(ai) + 1] = True  # predicting answer tokens and the final eos
            pad = width - len(ids)
            rows_t.append(np.pad(ids, (0, pad), constant_values=tok.eos_id or 0))
            rows_m.append(np.pad(mask, (0, pad))[1:])  # mask aligned with targets tokens[1:]
    if not rows_t:
        raise SourceError(f"Q/A target {spec['path']!r} has no rows")
    out = []
    for s in range(0, len(rows_t), batch_size):
        out.append({"tokens": torch.from_numpy(np.stack(rows_t[s : s + batch_size]).astype(np.int64)),
                    "loss_mask": torch.from_numpy(np.stack(rows_m[s : s + batch_size]))})
        if len(out) >= max_batches:
            break
    return out


# ============================================================================ packed target sets (static methods)


def pack_texts(texts: Iterable[str], seq_len: int, tokenizer: Any = None) -> torch.Tensor:
    """Pack documents into ``[n, seq_len + 1]`` int64 sequences, as the stream's packing mode does.

    Each document is tokenized (``tokenizer`` as in `MixtureStream`: UTF-8 bytes by default) and
    followed by the tokenizer's end-of-document id (256 for bytes; none if it has none), the
    documents are concatenated and cut into consecutive ``seq_len + 1``-token sequences; the tail
    shorter than that is dropped.
    """
    tok = as_tokenizer(tokenizer, getattr(tokenizer, "eos_id", None))
    eos = [] if tok.eos_id is None else [np.array([tok.eos_id], dtype=np.int64)]
    parts = [p for t in texts for p in (tok.encode(t), *eos)]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = len(flat) // (seq_len + 1)
    return torch.from_numpy(flat[: n * (seq_len + 1)].reshape(n, seq_len + 1).copy())


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
        full_shares: token share of each group before any subsampling (``max_seqs``).
    """

    tokens: torch.Tensor
    group: torch.Tensor
    group_names: list[str]
    average: str = "tokens"
    name: str = "target"
    full_shares: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.average not in ("tokens", "groups"):
            raise ValueError(f"target average must be 'tokens' or 'groups', got {self.average!r}")
        if self.tokens.dim() != 2 or self.tokens.shape[1] < 2:
            raise ValueError(f"target tokens must be [N, L+1] with L >= 1, got {tuple(self.tokens.shape)}")
        if self.group.shape != (self.tokens.shape[0],):
            raise ValueError(f"target group must be [N] = [{self.tokens.shape[0]}], got {tuple(self.group.shape)}")
        if len(self.tokens) == 0:
            raise ValueError(f"target {self.name!r} has no sequence (are its texts shorter than seq_len + 1 tokens?)")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1] - 1)

    @property
    def num_tokens(self) -> int:
        """Predicted tokens (N * L)."""
        return len(self) * self.seq_len

    def counts(self) -> np.ndarray:
        return np.bincount(self.group.numpy(), minlength=len(self.group_names))

    def shares(self) -> dict[str, float]:
        """Token share of each group in this set."""
        c = self.counts()
        return {n: float(x / c.sum()) for n, x in zip(self.group_names, c)}

    def example_weights(self) -> torch.Tensor:
        """float64 ``[N]`` summing to 1: the weight of each sequence's mean token loss in the target loss."""
        n = len(self)
        if self.average == "tokens":
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        c = torch.as_tensor(self.counts(), dtype=torch.float64)
        present = int((c > 0).sum())
        return 1.0 / (present * c[self.group])

    def group_weights(self) -> torch.Tensor:
        """float64 ``[G]``: each group's total weight in the target loss."""
        w = torch.zeros(len(self.group_names), dtype=torch.float64)
        return w.index_add_(0, self.group, self.example_weights())

    def loss(self, seq_losses: torch.Tensor) -> float:
        """Target loss from per-sequence mean token losses ``[N]``."""
        return float((self.example_weights() * seq_losses.to(torch.float64)).sum())

    def subset(self, idx: torch.Tensor | Sequence[int], name: str | None = None) -> TargetSet:
        idx = torch.as_tensor(idx, dtype=torch.int64)
        return TargetSet(self.tokens[idx], self.group[idx], list(self.group_names), self.average,
                         name or self.name, self.full_shares)

    def split_indices(self, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted indices of a seeded split into (``fraction``, rest), stratified by group (each
        group with >= 2 sequences puts at least one on each side)."""
        g = torch.Generator().manual_seed(int(seed))
        a, b = [], []
        for k in range(len(self.group_names)):
            idx = torch.nonzero(self.group == k).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            cut = int(round(fraction * len(idx)))
            if len(idx) >= 2:
                cut = min(max(cut, 1), len(idx) - 1)
            a.append(idx[:cut])
            b.append(idx[cut:])
        ia, ib = torch.cat(a).sort().values, torch.cat(b).sort().values
        if len(ia) == 0 or len(ib) == 0:
            raise ValueError(f"target {self.name!r} has too few sequences ({len(self)}) to split")
        return ia, ib

    def split(self, fraction: float, seed: int = 0) -> tuple[TargetSet, TargetSet]:
        """``(fit, report)`` subsets from :meth:`split_indices`."""
        ia, ib = self.split_indices(fraction, seed)
        return self.subset(ia, f"{self.name}[fit]"), self.subset(ib, f"{self.name}[report]")

    def batches(self, batch_size: int, seed: int = 0) -> list[dict]:
        """The set as a list of ``{"tokens"}`` batches covering every sequence once, in a seeded
        order. With ``average="groups"`` the order interleaves groups round-robin, so that every
        batch holds the groups in (nearly) equal numbers and its token mean estimates the group
        average."""
        g = torch.Generator().manual_seed(int(seed))
        if self.average == "groups":
            per = [torch.nonzero(self.group == k).flatten() for k in range(len(self.group_names))]
            per = [p[torch.randperm(len(p), generator=g)] for p in per if len(p)]
            n = max(len(p) for p in per)
            # cycle the smaller groups so each batch stays balanced
            per = [p.repeat(math.ceil(n / len(p)))[:n] for p in per]
            order = torch.stack(per, 1).flatten()
        else:
            order = torch.randperm(len(self), generator=g)
        return [{"tokens": self.tokens[order[i : i + batch_size]]} for i in range(0, len(order), batch_size)]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.tokens.numpy().tobytes())
        h.update(self.group.numpy().tobytes())
        h.update(json.dumps([self.group_names, self.average]).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "sequences": len(self), "seq_len": self.seq_len, "average": self.average,
                "groups": self.group_names, "shares": self.shares(), "full_shares": self.full_shares,
                "fingerprint": self.fingerprint()}


def target_from_texts(
    texts_by_group: Mapping[str, Sequence[str]],
    seq_len: int,
    *,
    average: str = "tokens",
    max_seqs: int | None = None,
    seed: int = 0,
    name: str = "target",
    tokenizer: Any = None,
) -> TargetSet:
    """Pack each group's texts separately into a :class:`TargetSet`.

    ``max_seqs`` caps the number of sequences (evaluation cost): with ``average="tokens"`` a seeded
    uniform subsample of all sequences (token shares kept in expectation), with ``"groups"`` at most
    ``max_seqs // G`` per group. ``full_shares`` records the shares before the cap.
    """
    names = [n for n in texts_by_group]
    toks, grp = [], []
    for k, n in enumerate(names):
        t = pack_texts(texts_by_group[n], seq_len, tokenizer)
        toks.append(t)
        grp.append(torch.full((len(t),), k, dtype=torch.int64))
    tokens, group = torch.cat(toks), torch.cat(grp)
    counts = np.bincount(group.numpy(), minlength=len(names))
    empty = [n for n, c in zip(names, counts) if c == 0]
    if empty:
        raise ValueError(f"target {name!r}: group(s) {empty} have no complete sequence of {seq_len + 1} tokens")
    full = {n: float(c / counts.sum()) for n, c in zip(names, counts)}
    if max_seqs is not None and len(tokens) > max_seqs:
        g = torch.Generator().manual_seed(int(seed))
        if average == "tokens":
            keep = torch.randperm(len(tokens), generator=g)[:max_seqs].sort().values
        else:
            cap = max(1, max_seqs // len(names))
            keep = []
            for k in range(len(names)):
                idx = torch.nonzero(group == k).flatten()
                keep.append(idx[torch.randperm(len(idx), generator=g)[:cap]])
            keep = torch.cat(keep).sort().values
        tokens, group = tokens[keep], group[keep]
    return TargetSet(tokens, group, names, average, name, full)


def _read_parquet_texts(path: str | os.PathLike, column: str = "text", group_column: str | None = "domain"):
    import pyarrow.parquet as pq

    p = Path(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .parquet file in {p}")
    out: dict[str, list[str]] = {}
    for f in files:
        schema = pq.read_schema(f)
        if column not in schema.names:
            raise ValueError(f"{f} has no column {column!r} (columns: {schema.names})")
        cols = [column] + ([group_column] if group_column and group_column in schema.names else [])
        t = pq.read_table(f, columns=cols).to_pydict()
        groups = t.get(group_column) if group_column in t else [p.name] * len(t[column])
        for text, g in zip(t[column], groups):
            out.setdefault(str(g), []).append(text)
    return out


def as_target(
    spec: Any,
    seq_len: int,
    *,
    max_seqs: int | None = None,
    seed: int = 0,
    name: str | None = None,
    tokenizer: Any = None,
) -> TargetSet:
    """Turn a target spec into a :class:`TargetSet`.

    Accepted specs:
        * a :class:`TargetSet` (returned as is);
        * a Parquet file or folder (column ``text``): one held-out set, token-averaged; rows are
          packed per value of their ``domain`` column when there is one (e.g. a planted target);
        * ``{group: Parquet file or folder}``: one group each, group-averaged (e.g. "the average
          loss over the training domains" = their validation splits);
        * a list of strings: one group, token-averaged.
    """
    if isinstance(spec, TargetSet):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        texts = _read_parquet_texts(spec)
        return target_from_texts(texts, seq_len, average="tokens", max_seqs=max_seqs, seed=seed,
                                 name=name or Path(spec).name, tokenizer=tokenizer)
    if isinstance(spec, Mapping):
        texts = {}
        for g, path in spec.items():
            t = _read_parquet_texts(path, group_column=None)
            texts[str(g)] = [x for v in t.values() for x in v]
        return target_from_texts(texts, seq_len, average="groups", max_seqs=max_seqs, seed=seed,
                                 name=name or "+".join(texts), tokenizer=tokenizer)
    if isinstance(spec, (list, tuple)) and all(isinstance(x, str) for x in spec):
        return target_from_texts({name or "target": list(spec)}, seq_len, max_seqs=max_seqs, seed=seed,
                                 name=name or "target", tokenizer=tokenizer)
    raise TypeError(
        "target must be a TargetSet, a Parquet path, {group: Parquet path} or a list of texts; "
        f"got {type(spec).__name__}"
    )
