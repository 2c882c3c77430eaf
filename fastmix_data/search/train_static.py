"""Static-mixture proxy training and target evaluation: the "final run", and the parts every mixture
method shares.

Design problem: MixMin, Aioli, DoReMi, the baselines and FastMix must be compared on equal terms:
the same proxy model, tokenizer, optimiser, token budget and data order, the same definition of the
target loss, and the same compute accounting. Each method also has to write the same output files.

Solution: one small layer that every method builds on:

* :class:`TrainConfig` -- model preset, optimiser, batch shape, token budget, seeds;
* :class:`TargetSet` (from :mod:`~fastmix_data.search.targets`) -- a target as fixed-length
  packed token sequences (``[N, L+1]``, byte-level by default, packed within one *group* so each
  sequence has one group), with the rule that turns per-sequence losses into the target loss: the
  token mean (``average="tokens"``) or the mean of per-group token means (``average="groups"``,
  e.g. "the average loss over the training domains");
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

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmix_data.io import atomic_path

from .compute import ComputeMeter
from .hypergrad import token_losses
from .method_outputs import COMPUTE_FILE as COMPUTE_FILE
from .method_outputs import PLOT_FILE as PLOT_FILE
from .method_outputs import WEIGHTS_FILE as WEIGHTS_FILE
from .method_outputs import MethodResult, plot_weights, push_weights, write_outputs
from .method_outputs import _write_jsonl as _write_jsonl
from .model import build_proxy, count_params, proxy_config
from .static_config import MethodConfig, TrainConfig, config_from_dict
from .static_config import _train_problems as _train_problems
from .targets import TargetSet, as_target, pack_texts, target_from_texts
from .trainer import resolve_device, write_json

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
    "config_from_dict",
    "evaluate",
    "make_stream",
    "pack_texts",
    "plot_weights",
    "push_weights",
    "source_fingerprints",
    "target_from_texts",
    "train_static",
    "write_outputs",
]


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
            with atomic_path(d / "model.pt") as tmp:
                torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
            write_json(d / "meta.json", {"description": dict(description), "compute": compute})
        return model, compute, False


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
