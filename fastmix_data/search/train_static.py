"""Static-mixture proxy training and target evaluation: the "final run", and the parts every mixture
method shares.

Design problem: MixMin, Aioli, DoReMi, the baselines and FastMix must be compared on equal terms:
the same proxy model, tokenizer, optimiser, token budget and data order, the same definition of the
target loss, and the same compute accounting. Each method also has to write the same output files.

Solution: one small layer that every method builds on:

* :class:`TrainConfig` -- model preset, optimiser, batch shape, token budget, seeds;
* :class:`TargetSet` -- a target as fixed-length packed token sequences (``[N, L+1]``, byte-level
  by default, packed within one *group* so each sequence has one group), with the rule that turns
  per-sequence losses into the target loss: the token mean (``average="tokens"``) or the mean of
  per-group token means (``average="groups"``, e.g. "the average loss over the training domains");
* :class:`ProxyTrainer` -- AdamW training steps on packed batches (the loss reduction is pluggable,
  DoReMi and the weighted proxies use that), counting tokens and FLOPs;
* :func:`evaluate` -- per-sequence, per-group and target loss of a model on a :class:`TargetSet`;
* :class:`ComputeMeter` -- FLOPs ``6 N`` per trained token and ``2 N`` per evaluated token
  (validation passes included; N excludes the input embedding, as in :func:`count_params`), wall
  time;
* :class:`ProxyCache` -- proxies trained once and reused (MixMin's per-source proxies, DoReMi's
  reference), keyed by the *content* fingerprint of their data and by their config;
* :func:`write_outputs` -- ``weights.json``, ``trajectory.jsonl``, ``trajectory.png``,
  ``compute.json`` in the format of :func:`fastmix_data.search.trainer.run_search`;
* :func:`train_static` -- train a fresh proxy on a static mixture for the token budget and evaluate
  the target(s): the final run of the quality benchmark.

Units: weights are shares of *packed sequences* of ``seq_len + 1`` tokens, i.e. token shares.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .hypergrad import token_losses
from .model import PRESETS, build_proxy, count_params, proxy_config
from .trainer import DEFAULT_LR, TRAJECTORY_FILE, resolve_device, write_json

WEIGHTS_FILE = "weights.json"
COMPUTE_FILE = "compute.json"
PLOT_FILE = "trajectory.png"
BYTE_EOS = 256

__all__ = [
    "ComputeMeter",
    "EvalResult",
    "MethodConfig",
    "MethodResult",
    "ProxyCache",
    "ProxyTrainer",
    "StaticResult",
    "TargetSet",
    "TrainConfig",
    "as_target",
    "evaluate",
    "make_stream",
    "pack_texts",
    "push_weights",
    "source_fingerprints",
    "target_from_texts",
    "train_static",
    "write_outputs",
]


# ============================================================================ configuration


@dataclass
class TrainConfig:
    """Proxy training settings shared by every method and by the final run.

    Attributes:
        model: proxy preset ("cpu", "tiny", "gpu" + ``model_args["vocab_size"]``).
        model_args: overrides of :class:`~fastmix_data.search.model.ProxyConfig` fields.
        seed: model initialisation seed.
        data_seed: seed of the training stream's order (default: ``seed``). Paired comparisons
            use the same data seed for every method.
        batch_size: packed sequences per step.
        seq_len: L; sequences have ``L + 1`` tokens.
        max_tokens: training token budget (``batch_size * seq_len`` per step; rounded up to steps).
        lr: AdamW learning rate (None: the preset's default, :data:`trainer.DEFAULT_LR`).
        lr_schedule: "cosine" (to ``min_lr_ratio * lr`` at the budget) or "constant".
        warmup_steps: linear learning-rate warm-up, in optimiser steps.
        weight_decay, betas, grad_clip: AdamW and gradient clipping (as in ``SearchConfig``).
        eval_batch_size: sequences per evaluation forward.
        device: "cpu", "cuda", "auto".
    """

    model: str = "cpu"
    model_args: dict = field(default_factory=dict)
    seed: int = 0
    data_seed: int | None = None
    batch_size: int = 16
    seq_len: int = 128
    max_tokens: int = 200_000
    lr: float | None = None
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    eval_batch_size: int = 64
    device: str = "cpu"

    def validate(self) -> TrainConfig:
        """Check every field; raise ``ValueError`` listing every problem."""
        p = _train_problems(self)
        if p:
            raise ValueError("invalid training config:\n  - " + "\n  - ".join(p))
        return self

    @property
    def stream_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.max_tokens / self.tokens_per_step))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.model, 1e-3)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, **overrides) -> TrainConfig:
        """Build from a mapping (unknown keys are an error), then validate."""
        return config_from_dict(cls, d, **overrides)


def _train_problems(c: TrainConfig) -> list[str]:
    p: list[str] = []
    if c.model not in PRESETS:
        p.append(f"model must be one of {sorted(PRESETS)}, got {c.model!r}")
    else:
        try:
            proxy_config(c.model, **c.model_args)
        except (ValueError, TypeError) as e:
            p.append(str(e))
    for name in ("batch_size", "seq_len", "max_tokens", "eval_batch_size"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            p.append(f"{name} must be a positive integer, got {v!r}")
    for name in ("seed", "warmup_steps"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            p.append(f"{name} must be a non-negative integer, got {v!r}")
    if c.data_seed is not None and (not isinstance(c.data_seed, int) or c.data_seed < 0):
        p.append(f"data_seed must be None or a non-negative integer, got {c.data_seed!r}")
    if c.lr is not None and not (isinstance(c.lr, (int, float)) and math.isfinite(c.lr) and c.lr > 0):
        p.append(f"lr must be a positive number or None, got {c.lr!r}")
    if c.lr_schedule not in ("cosine", "constant"):
        p.append(f"lr_schedule must be 'cosine' or 'constant', got {c.lr_schedule!r}")
    if not 0 <= c.min_lr_ratio <= 1:
        p.append(f"min_lr_ratio must lie in [0, 1], got {c.min_lr_ratio}")
    if c.weight_decay < 0:
        p.append(f"weight_decay must be >= 0, got {c.weight_decay}")
    try:
        b1, b2 = c.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError
    except (TypeError, ValueError):
        p.append(f"betas must be two numbers in [0, 1), got {c.betas!r}")
    if c.grad_clip is not None and not c.grad_clip > 0:
        p.append(f"grad_clip must be > 0 or None, got {c.grad_clip}")
    return p


@dataclass
class MethodConfig:
    """Fields every method config has; each method's config subclasses it.

    Attributes:
        train: the proxy training settings (:class:`TrainConfig`); ``train.max_tokens`` is the
            method's training budget (see each method).
        cache_dir: where reusable proxies (MixMin's per-source proxies, DoReMi's reference, the
            grid oracle's runs) are cached; None: no cache.
        progress: tqdm progress bars.
        target_max_seqs: cap on the target sequences a method reads (cost of target passes).
        plot: write ``trajectory.png``.
    """

    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: str | None = None
    progress: bool = False
    target_max_seqs: int | None = 512
    plot: bool = True

    def problems(self) -> list[str]:
        """Method-specific problems (subclasses extend)."""
        return []

    def validate(self):
        p = _train_problems(self.train) if isinstance(self.train, TrainConfig) else [
            f"train must be a TrainConfig, got {type(self.train).__name__}"]
        if self.target_max_seqs is not None and (not isinstance(self.target_max_seqs, int) or self.target_max_seqs < 1):
            p.append(f"target_max_seqs must be a positive integer or None, got {self.target_max_seqs!r}")
        p += self.problems()
        if p:
            raise ValueError(f"invalid {type(self).__name__}:\n  - " + "\n  - ".join(p))
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, **overrides):
        """From a mapping whose ``train`` entry is a :class:`TrainConfig` or a mapping of its fields."""
        d = {**dict(d or {}), **overrides}
        train = d.get("train")
        if train is None or isinstance(train, Mapping):
            d["train"] = TrainConfig.from_dict(train or {})
        if "cache_dir" in d and d["cache_dir"] is not None:
            d["cache_dir"] = str(d["cache_dir"])
        return config_from_dict(cls, d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        return d


def config_from_dict(cls, d: Mapping[str, Any] | None, **overrides):
    """``cls(**d, **overrides).validate()`` with unknown keys reported (used by every method config)."""
    d = {**dict(d or {}), **overrides}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(names)}")
    if "betas" in d and isinstance(d["betas"], list):
        d["betas"] = tuple(d["betas"])
    return cls(**d).validate()


# ============================================================================ targets


def pack_texts(texts: Iterable[str], seq_len: int, tokenizer: Any = None) -> torch.Tensor:
    """Pack documents into ``[n, seq_len + 1]`` int64 sequences, as the stream's packing mode does.

    Each document is tokenized (UTF-8 bytes by default, ids 0-255) and followed by the
    end-of-document id (256), the documents are concatenated and cut into consecutive
    ``seq_len + 1``-token sequences; the tail shorter than that is dropped.
    """
    if tokenizer is None:
        ids = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
        eos = BYTE_EOS
    else:
        ids = [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]
        eos = getattr(tokenizer, "eos_id", None)
    parts: list[np.ndarray] = []
    for a in ids:
        parts.append(a)
        if eos is not None:
            parts.append(np.array([eos], dtype=np.int64))
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


# ============================================================================ compute accounting


class ComputeMeter:
    """Counts tokens, FLOPs and wall time of one method run.

    FLOPs: ``6 * N`` per trained token, ``2 * N`` per evaluated token (validation/target/scoring
    passes), N = parameters that take part in matmuls (all but the input embedding).
    """

    def __init__(self, n_params_flops: int = 0):
        self.N = int(n_params_flops)
        self.tokens = {"train": 0, "eval": 0}
        self.flops = {"train": 0.0, "eval": 0.0}
        self.t0 = time.perf_counter()
        self.parts: dict[str, dict] = {}

    def train(self, ntok: int, n_params: int | None = None) -> None:
        self.tokens["train"] += int(ntok)
        self.flops["train"] += 6.0 * (self.N if n_params is None else n_params) * ntok

    def eval(self, ntok: int, n_params: int | None = None) -> None:
        self.tokens["eval"] += int(ntok)
        self.flops["eval"] += 2.0 * (self.N if n_params is None else n_params) * ntok

    def add(self, name: str, compute: Mapping, *, cached: bool = False) -> None:
        """Fold in a sub-run's ``compute`` dict (e.g. a proxy). Cached sub-runs are recorded with
        their original cost but not added to this run's totals."""
        self.parts[name] = {**dict(compute), "cached": cached}
        if cached:
            return
        for k in ("train", "eval"):
            self.tokens[k] += int(compute.get("tokens", {}).get(k, 0))
            self.flops[k] += float(compute.get("flops", {}).get(k, 0.0))

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.t0

    def to_dict(self, method: str, **extra) -> dict:
        total = self.flops["train"] + self.flops["eval"]
        cached = sum(float(p.get("flops", {}).get("total", 0.0)) for p in self.parts.values() if p.get("cached"))
        return {
            "method": method,
            "n_params_flops": self.N,
            "tokens": dict(self.tokens),
            "flops": {**self.flops, "total": total, "cached": cached, "total_with_cached": total + cached},
            "flops_note": "6*N per trained token, 2*N per evaluated token (validation and scoring passes "
            "included); N excludes the input embedding; attention's L^2 term is not counted; 'cached' is "
            "the original cost of reused proxies, not spent by this run",
            "wall_s": self.wall_s,
            "parts": self.parts,
            "host": platform.node(),
            "torch": torch.__version__,
            **extra,
        }


# ============================================================================ training and evaluation


def make_stream(train_sources: Mapping[str, Any], weights: Mapping[str, float] | Sequence[float] | None,
                cfg: TrainConfig, *, seed: int | None = None, **kwargs):
    """A packing-mode :class:`~fastmix_data.stream.MixtureStream` over ``train_sources``
    (uniform when ``weights`` is None); weights in packed sequences = token shares."""
    from fastmix_data.stream import MixtureStream

    names = list(train_sources)
    if weights is None:
        weights = {n: 1.0 for n in names}
    return MixtureStream(dict(train_sources), weights, cfg.batch_size, cfg.stream_seed if seed is None else seed,
                         seq_len=cfg.seq_len, **kwargs)


#: ``reduce(token_losses [B, L], source [B]) -> scalar loss`` for :meth:`ProxyTrainer.step`.
LossReduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ProxyTrainer:
    """A proxy model and its AdamW optimiser, trained one packed batch at a time.

    Args:
        cfg: the training config (model, optimiser, schedule, budget for the cosine schedule).
        meter: where trained tokens and FLOPs are counted (a new meter when None).
        model: an existing model (default: a fresh ``build_proxy`` from ``cfg`` and ``cfg.seed``).
        total_steps: length of the lr schedule (default ``cfg.total_steps``).
    """

    def __init__(self, cfg: TrainConfig, meter: ComputeMeter | None = None, *, model: nn.Module | None = None,
                 total_steps: int | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.model = model if model is not None else build_proxy(proxy_config(cfg.model, **cfg.model_args), seed=cfg.seed)
        self.model.to(self.device).train()
        self.n_params = count_params(self.model)
        self.meter = meter if meter is not None else ComputeMeter(self.n_params["flops"])
        if self.meter.N == 0:
            self.meter.N = self.n_params["flops"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=cfg.learning_rate, betas=tuple(cfg.betas),
        )
        self.total_steps = total_steps or cfg.total_steps
        self.steps = 0
        self.tokens = 0

    def lr(self) -> float:
        base, s, c = self.cfg.learning_rate, self.steps, self.cfg
        if c.warmup_steps and s < c.warmup_steps:
            return base * (s + 1) / c.warmup_steps
        if c.lr_schedule == "cosine":
            T = max(1, self.total_steps - c.warmup_steps)
            prog = min(1.0, (s - c.warmup_steps) / T)
            lo = base * c.min_lr_ratio
            return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * prog))
        return base

    def step(self, tokens: torch.Tensor, source: torch.Tensor | None = None, reduce: LossReduce | None = None) -> torch.Tensor:
        """One optimiser step on ``tokens`` ``[B, L+1]``; returns the detached per-token losses ``[B, L]``.

        ``reduce(token_losses, source)`` gives the scalar loss (default: the token mean)."""
        tokens = tokens.to(self.device)
        B, L = tokens.shape[0], tokens.shape[1] - 1
        logits = self.model(tokens[:, :-1])
        tl = token_losses(logits.reshape(B * L, -1), tokens[:, 1:].reshape(-1)).view(B, L)
        src = source.to(self.device) if source is not None else None
        loss = tl.mean() if reduce is None else reduce(tl, src)
        for g in self.opt.param_groups:
            g["lr"] = self.lr()
        if torch.isfinite(loss):
            loss.backward()
            if self.cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        self.tokens += B * L
        self.meter.train(B * L)
        return tl.detach()


@dataclass
class EvalResult:
    """Loss of a model on a :class:`TargetSet`: ``loss`` (the target's averaging rule),
    ``group_losses`` (token mean per group), ``seq_losses`` (mean token loss per sequence, ``[N]``)
    and ``token_logprobs`` (``[N, L]``, only when asked for)."""

    loss: float
    group_losses: dict[str, float]
    seq_losses: torch.Tensor
    tokens: int
    token_logprobs: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return {"loss": self.loss, "group_losses": self.group_losses, "tokens": self.tokens}


@torch.no_grad()
def evaluate(model: nn.Module, target: TargetSet, *, batch_size: int = 64, meter: ComputeMeter | None = None,
             keep_token_logprobs: bool = False) -> EvalResult:
    """Per-sequence mean token losses of ``model`` on ``target`` and the target loss (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seq, toks = [], []
    try:
        for i in range(0, len(target), batch_size):
            t = target.tokens[i : i + batch_size].to(device)
            B, L = t.shape[0], t.shape[1] - 1
            tl = token_losses(model(t[:, :-1]).reshape(B * L, -1), t[:, 1:].reshape(-1)).view(B, L).double().cpu()
            seq.append(tl.mean(1))
            if keep_token_logprobs:
                toks.append(-tl)
            if meter is not None:
                meter.eval(B * L)
    finally:
        model.train(was_training)
    s = torch.cat(seq)
    groups = {}
    for k, n in enumerate(target.group_names):
        m = target.group == k
        if m.any():
            groups[n] = float(s[m].mean())
    return EvalResult(target.loss(s), groups, s, target.num_tokens, torch.cat(toks) if keep_token_logprobs else None)


# ============================================================================ proxy cache


def source_fingerprints(train_sources: Mapping[str, Any]) -> dict[str, str]:
    """Content fingerprint of each source: its format, columns and shard sha256s (not paths, not the
    name), so a copy of the same data elsewhere reuses cached proxies."""
    from fastmix_data.sources import open_source
    from fastmix_data.sources.base import Source

    out = {}
    for name, spec in train_sources.items():
        src = spec if isinstance(spec, Source) and not isinstance(spec, (str, list, dict)) else open_source(name, spec)
        cols = getattr(src, "columns", None)
        obj = {
            "format": src.format,
            "columns": [getattr(cols, "text", None), getattr(cols, "ids", None)],
            "shards": [s.sha256 for s in src.shards],
        }
        out[name] = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return out


class ProxyCache:
    """Trained proxies on disk, keyed by a JSON-able description (data fingerprint + config).

    Layout: ``DIR/<key>/model.pt`` (state dict) and ``DIR/<key>/meta.json`` (the description, the
    model config and the compute that training cost). Writes are atomic; a missing or unreadable
    entry is retrained. ``cache_dir=None`` disables caching.
    """

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.dir = Path(cache_dir) if cache_dir is not None else None

    @staticmethod
    def key(description: Mapping) -> str:
        return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get_or_train(self, description: Mapping, cfg: TrainConfig, train: Callable[[], tuple[nn.Module, dict]]):
        """``(model, compute, cached)``: the cached model for ``description`` or ``train()``'s result."""
        key = self.key(description)
        if self.dir is not None:
            d = self.dir / key
            try:
                meta = json.loads((d / "meta.json").read_text())
                model = build_proxy(proxy_config(cfg.model, **cfg.model_args))
                model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
                return model.to(resolve_device(cfg.device)), meta["compute"], True
            except (OSError, KeyError, ValueError, RuntimeError):
                pass
        model, compute = train()
        if self.dir is not None:
            d = self.dir / key
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".model.pt.tmp{os.getpid()}"
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
            os.replace(tmp, d / "model.pt")
            write_json(d / "meta.json", {"description": dict(description), "compute": compute})
        return model, compute, False


# ============================================================================ outputs


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from .trainer import _clean, _json_default

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(_clean(r), default=_json_default) + "\n")
    os.replace(tmp, path)


def plot_weights(records: list[dict], names: list[str], path: str | os.PathLike, *, title: str,
                 x: str = "tokens", xlabel: str = "proxy tokens") -> None:
    """Stacked weights against ``x`` (and the target loss when recorded), as
    :func:`trainer.plot_trajectory` draws them, with a method-specific title and x axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not records:
        return
    xs = [r.get(x, i) for i, r in enumerate(records)]
    W = [[r["weights"][n] for r in records] for n in names]
    tl = [r.get("target_loss") for r in records]
    has_target = any(v is not None for v in tl)
    fig, axes = plt.subplots(2 if has_target else 1, 1, figsize=(8, 6 if has_target else 3.5), sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    if len(xs) == 1:
        xs = [xs[0], xs[0] + 1]
        W = [w * 2 for w in W]
        tl = tl * 2
    ax.stackplot(xs, W, labels=names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixture weight")
    ax.set_title(title)
    if len(names) <= 16:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    if has_target:
        ax2 = axes[1][0]
        ax2.plot(xs, [math.nan if v is None else v for v in tl], color="k")
        ax2.set_ylabel("target loss")
    axes[-1][0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir: str | os.PathLike | None, method: str, names: list[str], weights: Mapping[str, float],
                  trajectory: list[dict], compute: Mapping, *, extra: Mapping | None = None, plot: bool = True,
                  x: str = "tokens", xlabel: str = "proxy tokens") -> None:
    """The common outputs of a method run, as :func:`run_search` writes them: ``weights.json``
    (``method``, ``final``, ``weights`` + method fields), ``trajectory.jsonl`` (one record per
    update: ``step``, ``tokens``, ``weights`` ...), ``trajectory.png`` and ``compute.json``."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / WEIGHTS_FILE, {"method": method, "final": True, "weights": dict(weights), **dict(extra or {})})
    _write_jsonl(out / TRAJECTORY_FILE, trajectory)
    write_json(out / COMPUTE_FILE, dict(compute))
    if plot:
        try:
            plot_weights(trajectory, names, out / PLOT_FILE, title=f"{method} weight trajectory", x=x, xlabel=xlabel)
        except Exception as e:  # a plot must never lose a finished run
            import warnings

            warnings.warn(f"could not write {PLOT_FILE}: {e}", stacklevel=2)


# ============================================================================ method results


@dataclass
class MethodResult:
    """What every mixture method returns (see :func:`fastmix_data.search.methods.run_method`).

    Attributes:
        method: registry name.
        weights: the exported static mixture ``{source: weight}`` (token shares, summing to 1).
        source_names: the sources, in order.
        trajectory: the records written to ``trajectory.jsonl``.
        compute: the dict written to ``compute.json`` (tokens, FLOPs, wall time).
        extra: method-specific results (also in ``weights.json``).
        out_dir: where the outputs were written (None: nothing written).
        model: the method's trained proxy when it has one worth keeping (online methods).
    """

    method: str
    weights: dict[str, float]
    source_names: list[str]
    trajectory: list[dict]
    compute: dict
    extra: dict = field(default_factory=dict)
    out_dir: Path | None = None
    model: nn.Module | None = None


def push_weights(sink, weights: Mapping[str, float]) -> int | None:
    """Send ``weights`` to a sink (``sink.set_weights(w)`` or a callable); returns the effective batch."""
    if sink is None:
        return None
    r = sink.set_weights(dict(weights)) if hasattr(sink, "set_weights") else sink(dict(weights))
    return None if r is None else int(r)


# ============================================================================ the final run


@dataclass
class StaticResult:
    """A proxy trained from scratch on a static mixture: target losses by target name, the
    training curve, the compute, and the model (None when the result came from the cache)."""

    weights: dict[str, float]
    losses: dict[str, dict]
    compute: dict
    curve: list[dict]
    model: nn.Module | None = None
    cached: bool = False

    def loss(self, target: str | None = None) -> float:
        if target is None:
            if len(self.losses) != 1:
                raise ValueError(f"several targets were evaluated ({list(self.losses)}); name one")
            target = next(iter(self.losses))
        return float(self.losses[target]["loss"])


def _targets_dict(targets, seq_len: int) -> dict[str, TargetSet]:
    if targets is None:
        return {}
    if isinstance(targets, TargetSet):
        return {targets.name: targets}
    if isinstance(targets, Mapping) and all(isinstance(v, TargetSet) for v in targets.values()):
        return dict(targets)
    t = as_target(targets, seq_len)
    return {t.name: t}


def train_static(
    train_sources: Mapping[str, Any],
    weights: Mapping[str, float] | Sequence[float],
    targets: TargetSet | Mapping[str, TargetSet] | Any,
    config: TrainConfig | Mapping[str, Any] | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    eval_every: int | None = None,
    progress: bool = False,
    keep_model: bool = True,
) -> StaticResult:
    """Train a fresh proxy on the static mixture ``weights`` for ``config.max_tokens`` and
    evaluate every target at the end (the "final run").

    Args:
        train_sources: ``{name: Parquet/WebDataset path or spec}`` as for ``MixtureStream``.
        weights: ``{name: weight}`` (token shares; 0 leaves a source out).
        targets: a :class:`TargetSet`, ``{name: TargetSet}``, or any spec of :func:`as_target`.
        config: :class:`TrainConfig` (model seed ``seed``, data order ``data_seed``).
        out_dir: writes ``result.json`` (losses, curve, compute) there when given.
        cache_dir: results are cached as JSON keyed by (source contents, weights, config, target
            fingerprints); a hit returns without training (``model=None``, ``cached=True``).
        eval_every: also evaluate every this many steps (the curve); None: only at the end.
        progress: a tqdm bar.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    cfg.validate()
    names = list(train_sources)
    w = _weight_dict(weights, names)
    tsets = _targets_dict(targets, cfg.seq_len)
    cache_file = None
    if cache_dir is not None:
        desc = {"kind": "static", "sources": source_fingerprints(train_sources), "weights": w,
                "config": cfg.to_dict(), "targets": {k: t.fingerprint() for k, t in tsets.items()},
                "eval_every": eval_every}
        cache_file = Path(cache_dir) / f"static-{ProxyCache.key(desc)}.json"
        if cache_file.exists():
            try:
                d = json.loads(cache_file.read_text())
                return StaticResult(d["weights"], d["losses"], d["compute"], d["curve"], None, True)
            except (OSError, ValueError, KeyError):
                pass
    trainer = ProxyTrainer(cfg)
    meter = trainer.meter
    stream = make_stream(train_sources, w, cfg)
    curve: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.total_steps, desc="static run", unit="step", leave=False)
    it = iter(stream)
    for _ in range(cfg.total_steps):
        b = next(it)
        tl = trainer.step(b["tokens"])
        if bar is not None:
            bar.update(1)
        if eval_every and trainer.steps % eval_every == 0 and trainer.steps < cfg.total_steps:
            curve.append({"step": trainer.steps, "tokens": trainer.tokens, "train_loss": float(tl.mean()),
                          **{k: evaluate(trainer.model, t, batch_size=cfg.eval_batch_size, meter=meter).loss
                             for k, t in tsets.items()}})
    if bar is not None:
        bar.close()
    losses = {k: evaluate(trainer.model, t, batch_size=cfg.eval_batch_size, meter=meter).to_dict()
              for k, t in tsets.items()}
    curve.append({"step": trainer.steps, "tokens": trainer.tokens, **{k: v["loss"] for k, v in losses.items()}})
    compute = meter.to_dict("static", steps=trainer.steps, weights=w, n_params=trainer.n_params["total"])
    res = StaticResult(w, losses, compute, curve, trainer.model if keep_model else None, False)
    payload = {"weights": w, "losses": losses, "compute": compute, "curve": curve, "config": cfg.to_dict()}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / "result.json", payload)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file, payload)
    return res


def _weight_dict(weights, names: list[str]) -> dict[str, float]:
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"weights name unknown sources {unknown}; sources are {names}")
        vals = [float(weights.get(n, 0.0)) for n in names]
    else:
        vals = [float(x) for x in weights]
        if len(vals) != len(names):
            raise ValueError(f"expected {len(names)} weights (sources {names}), got {len(vals)}")
    if any(not math.isfinite(v) or v < 0 for v in vals) or sum(vals) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {vals}")
    s = sum(vals)
    return {n: v / s for n, v in zip(names, vals)}
