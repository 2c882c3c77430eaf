"""Proxy training and method configuration shared by every mixture method.

:class:`TrainConfig` holds the proxy settings every method and the final run use (model preset,
optimiser, batch shape, token budget, seeds) and :class:`MethodConfig` the fields common to every
method config; :func:`config_from_dict` builds and validates any of these dataclasses from a mapping
(unknown keys are an error), and :func:`_train_problems` lists what is wrong with a
:class:`TrainConfig`. Moved out of :mod:`fastmix_data.search.train_static`, which re-exports them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .config_types import type_problems
from .model import PRESETS, proxy_config
from .trainer import DEFAULT_LR

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
        """Check every field; raise `ConfigError` (a ``ValueError``) listing every problem."""
        p = type_problems(self) or _train_problems(self)  # (ranges assume the right types)
        if p:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(p))
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
        p = (type_problems(self.train) or _train_problems(self.train)) if isinstance(self.train, TrainConfig) else [
            f"train must be a TrainConfig, got {type(self.train).__name__}"]
        p += type_problems(self)
        if not p:  # (the ranges below assume the right types)
            if self.target_max_seqs is not None and self.target_max_seqs < 1:
                p.append(f"target_max_seqs must be a positive integer or None, got {self.target_max_seqs!r}")
            p += self.problems()
        if p:
            raise ConfigError(f"invalid {type(self).__name__}:\n  - " + "\n  - ".join(p))
        return self

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, **overrides):
        """From a mapping whose ``train`` entry is a :class:`TrainConfig` or a mapping of its fields."""
        if d is not None and not isinstance(d, Mapping):
            raise ConfigError(f"a {cls.__name__} must be a mapping of its fields, got {d!r}"[:200])
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
    if d is not None and not isinstance(d, Mapping):
        raise ConfigError(f"a {cls.__name__} must be a mapping of its fields, got {d!r}"[:200])
    d = {**dict(d or {}), **overrides}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in d if k not in names), key=repr)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(names)}")
    if "betas" in d and isinstance(d["betas"], list):
        d["betas"] = tuple(d["betas"])
    return cls(**d).validate()
