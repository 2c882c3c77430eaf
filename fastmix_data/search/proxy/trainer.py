"""The proxy trainer every method uses: one model, one AdamW, one learning-rate schedule, one step.

:class:`ProxyTrainer` owns a proxy (:mod:`fastmix_data.search.model`, or any model implementing
:class:`~fastmix_data.search.model.HeadedLM`), its AdamW (decay on matrices only; fused on CUDA),
the learning-rate schedule (linear warm-up, then cosine or constant), gradient accumulation and
clipping, bf16 autocast on CUDA, an optional ``torch.compile`` of the trunk, and the count of what
it trained (:class:`~fastmix_data.search.proxy.compute.ComputeMeter`). FastMix drives it micro-batch
by micro-batch (:meth:`ProxyTrainer.train_step`, which scores the micro-batch in the pass it trains
on when given a target gradient); the static methods call :meth:`ProxyTrainer.step`.

:func:`evaluate` gives the per-sequence and target losses of a model on a
:class:`~fastmix_data.search.targets.TargetSet`; :func:`make_stream` the packing-mode
``MixtureStream`` every method trains on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..ddp import Ranks
from ..hypergrad import TokenLossFn, token_losses
from ..model import ProxyConfig, build_proxy, count_params
from ..proxy_step import MicroStep, ProxyStep
from ..schedule import lr_warmup_steps
from ..targets import TargetSet, iter_batches
from ..vocab import check_ids, search_vocabulary
from .compute import ComputeMeter

#: ``reduce(token_losses [B, L], source [B]) -> scalar loss`` for :meth:`ProxyTrainer.step`
LossReduce = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def resolve_device(device: str, ranks: Ranks | None = None) -> torch.device:
    """``"auto"`` -> CUDA when available (under ``torchrun``: GPU ``LOCAL_RANK``), else CPU; refuses
    CUDA when there is none."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if ranks is not None and ranks.world > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", ranks.rank % torch.cuda.device_count())))
        return torch.device("cuda")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def make_stream(sources: Mapping[str, Any], weights: Mapping[str, float] | Sequence[float] | None,
                train: TrainConfig, *, seed: int | None = None, **kwargs):
    """A packing-mode :class:`~fastmix_data.stream.MixtureStream` over ``sources`` (uniform when
    ``weights`` is None) with the batch shape of ``train`` and its tokenizer (``train.tokenizer``;
    else ids columns as they are, or bytes); weights are shares of packed sequences, i.e. token
    shares. With ``train.ddp`` each rank gets its rows of every global batch."""
    from fastmix_data.stream import MixtureStream

    if weights is None:
        weights = {n: 1.0 for n in sources}
    if train.tokenizer is not None and "tokenizer" not in kwargs:
        kwargs["tokenizer"] = search_vocabulary(train).tokenizer
    if not train.ddp:  # one process: all of every batch, whatever RANK/WORLD_SIZE the environment holds
        kwargs.setdefault("rank", 0)
        kwargs.setdefault("world_size", 1)
    return MixtureStream(dict(sources), weights, train.batch_size, train.stream_seed if seed is None else seed,
                         seq_len=train.seq_len, **kwargs)


def proxy_shape(train: TrainConfig, vocab_size: int | None = None) -> ProxyConfig:
    """The proxy's shape from ``train.proxy``: its ``vocab_size`` override, else ``vocab_size``,
    else ``train.tokenizer``'s size, else the preset's own."""
    if vocab_size is None and train.tokenizer is not None:
        vocab_size = search_vocabulary(train).size
    return train.proxy.shape(vocab_size)


class ProxyTrainer:
    """A proxy model and its optimiser, trained one micro-batch at a time.

    The work of a micro-batch -- device, DistributedDataParallel under ``torchrun``, the compiled
    trunk, bf16 autocast, fused AdamW on CUDA, the fused head loss with FastMix's scores folded in
    -- is :class:`~fastmix_data.search.proxy_step.ProxyStep`'s; this class adds what every method
    shares around it: the model built from ``train.proxy``, the learning-rate schedule, when an
    optimiser step is taken (every ``grad_accum`` micro-batches), and the count of what was trained.

    Args:
        train: model, optimiser, schedule and batch settings.
        optimizer_steps: length of the run in optimiser steps (the cosine schedule ends there; the
            default warm-up is derived from it).
        meter: where trained tokens and FLOPs are counted (a new one when None).
        model: an existing model (default: ``train.proxy`` built with ``train.seed``).
        loss_fn: ``loss_fn(logits [N, V], targets [N]) -> [N]`` (default cross-entropy).
        vocab_size: the vocabulary of a proxy without a ``vocab_size`` in ``train.proxy`` (None:
            ``train.tokenizer``'s, else the preset's; ``run_method`` writes the run's vocabulary
            into ``train.proxy``, see :func:`~fastmix_data.search.methods.with_vocabulary`).
        num_sources: K, for the per-source sums of :meth:`train_step`.
        chunk_tokens: token chunk of the fused head and the score products (None: by vocabulary).
        ranks: data-parallel ranks (default: with ``train.ddp`` the initialised process group's, else
            one process, even inside someone else's process group).
    """

    def __init__(self, train: TrainConfig, optimizer_steps: int, meter: ComputeMeter | None = None, *,
                 model: nn.Module | None = None, loss_fn: TokenLossFn | None = None, vocab_size: int | None = None,
                 num_sources: int = 1, chunk_tokens: int | None = None, ranks: Ranks | None = None):
        self.cfg = train
        self.ranks = ranks or (Ranks.current() if train.ddp else Ranks())
        self.device = resolve_device(train.device, self.ranks)
        self.bf16 = train.dtype == "bfloat16" or (train.dtype == "auto" and self.device.type == "cuda")
        if model is None:
            model = build_proxy(proxy_shape(train, vocab_size), seed=train.seed)
        self.loss_fn = loss_fn
        self.proxy = ProxyStep(model, num_sources, device=self.device, bf16=self.bf16, compile=train.compile,
                               lr=train.learning_rate, betas=tuple(train.betas), weight_decay=train.weight_decay,
                               grad_clip=train.grad_clip, grad_accum=train.grad_accum, chunk_tokens=chunk_tokens,
                               loss_fn=loss_fn, ranks=self.ranks, fused=train.fused_head)
        self.model = self.proxy.model
        self.n_params = count_params(self.model)
        self.meter = meter if meter is not None else ComputeMeter(self.n_params["flops"])
        if self.meter.N == 0:
            self.meter.N = self.n_params["flops"]
        self.params = self.proxy.params
        self.opt = self.proxy.opt
        self.total_steps = max(1, int(optimizer_steps))
        self.warmup = lr_warmup_steps(self.total_steps, train.lr_warmup_steps)
        self.steps = 0  # optimiser steps taken
        self.tokens = 0  # trained tokens, all ranks together
        self.skipped_nonfinite = 0

    # ------------------------------------------------------------------ pieces
    @property
    def micro(self) -> int:
        """Micro-batches trained: the count the proxy step keeps (it also decides gradient sync)."""
        return self.proxy.micro

    @property
    def vocab_size(self) -> int:
        return self.model.head.out_features

    @property
    def dtype_name(self) -> str:
        return "bfloat16" if self.bf16 else "float32"

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)

    def autocast(self):
        """bf16 autocast on CUDA (or when asked), a no-op otherwise."""
        return self.proxy.autocast()

    def lr(self) -> float:
        """Learning rate at the current optimiser step: linear warm-up, then cosine or constant."""
        base, s, c = self.cfg.learning_rate, self.steps, self.cfg
        if self.warmup and s < self.warmup:
            return base * (s + 1) / self.warmup
        if c.lr_schedule == "cosine":
            prog = min(1.0, (s - self.warmup) / max(1, self.total_steps - self.warmup))
            lo = base * c.min_lr_ratio
            return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * prog))
        return base

    def train_step(self, tokens: torch.Tensor, source: torch.Tensor | None = None, *,
                   loss_w: torch.Tensor | None = None, G: torch.Tensor | None = None,
                   reduce: LossReduce | None = None) -> MicroStep:
        """Train on one micro-batch ``tokens`` ``[B, L+1]`` (this rank's rows) through
        :meth:`ProxyStep.micro_step <fastmix_data.search.proxy_step.ProxyStep.micro_step>`: the loss
        ``mean_b loss_w[source_b] * mean_t l_bt`` (``loss_w`` None: the token mean) or
        ``reduce(token_losses, source)``, and with a head gradient ``G`` FastMix's per-source scores
        from the same pass; an optimiser step every ``grad_accum`` micro-batches. A non-finite loss
        is skipped (no gradient) and counted."""
        if tokens.device.type == "cpu":  # (a batch already on the device was checked by whoever moved it)
            check_ids(tokens, self.vocab_size, f"training micro-batch {self.micro + 1}")
        tokens = tokens.to(self.device)
        src = source.to(self.device) if source is not None else None
        m = self.proxy.micro_step(tokens, src, loss_w, G, reduce=reduce)
        if not m.finite:
            self.skipped_nonfinite += 1
        ntok = m.token_losses.numel() * self.ranks.world
        self.tokens += ntok
        self.meter.train(ntok)
        if self.micro % self.cfg.grad_accum == 0:
            self.proxy.optimizer_step(self.lr())
            self.steps += 1
        return m

    def step(self, tokens: torch.Tensor, source: torch.Tensor | None = None,
             reduce: LossReduce | None = None) -> torch.Tensor:
        """Train on one micro-batch ``tokens`` ``[B, L+1]``; returns the detached token losses ``[B, L]``.

        ``reduce(token_losses, source)`` gives the scalar loss (default: the token mean)."""
        return self.train_step(tokens, source, reduce=reduce).token_losses

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {**self.proxy.state_dict(), "steps": self.steps, "tokens": self.tokens,
                "skipped_nonfinite": self.skipped_nonfinite}

    def load_state_dict(self, d: Mapping) -> None:
        self.proxy.load_state_dict(d)
        self.steps, self.tokens = int(d["steps"]), int(d["tokens"])
        self.skipped_nonfinite = int(d["skipped_nonfinite"])


@dataclass
class EvalResult:
    """Loss of a model on a :class:`TargetSet`: ``loss`` (the target's averaging rule),
    ``group_losses`` (token mean per group), ``seq_losses`` (``[N]``), ``tokens`` forwarded, and
    ``token_logprobs`` (``[N, L]``, only when asked for)."""

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
    """Per-sequence mean token losses of ``model`` on ``target`` (its loss mask applied) and the
    target loss; eval mode, no gradients; ``meter`` counts the forwarded tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "head", None), "out_features", None)
    seq, toks = [], []
    try:
        for i, b in enumerate(iter_batches(target, batch_size)):
            if vocab:
                check_ids(b["tokens"], vocab, f"target {target.name!r}")
            t = b["tokens"].to(device)
            B, L = t.shape[0], t.shape[1] - 1
            tl = token_losses(model(t[:, :-1]).reshape(B * L, -1), t[:, 1:].reshape(-1)).view(B, L).double().cpu()
            seq.append(target.seq_losses(tl, slice(i * batch_size, i * batch_size + B)))
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


__all__ = ["EvalResult", "LossReduce", "ProxyTrainer", "evaluate", "make_stream", "proxy_shape", "resolve_device"]
