"""The final run: a fresh proxy trained on a static mixture, then scored on target(s).

It is what the grid oracle trains at every simplex point and what the quality benchmark trains on
every exported mixture: same model, optimiser, batch shape and data order for every mixture, so
that differences come from the mixture. Results can be cached as JSON keyed by the sources'
content, the weights, the config and the targets' fingerprints.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import TrainConfig
from ..outputs import write_json
from ..schedule import Budget
from ..targets import TargetSet
from .cache import cache_key, source_fingerprints
from .trainer import ProxyTrainer, evaluate, make_stream


@dataclass
class StaticResult:
    """A static-mixture run: target losses by target name, the training curve, its compute, and
    the model (None when the result came from the cache)."""

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


def train_static(
    sources: Mapping[str, Any],
    weights: Mapping[str, float] | Sequence[float],
    targets: TargetSet | Mapping[str, TargetSet],
    train: TrainConfig,
    max_tokens: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    eval_every: int | None = None,
    progress: bool = False,
    keep_model: bool = True,
) -> StaticResult:
    """Train a fresh proxy on the static mixture ``weights`` (token shares) for ``max_tokens`` and
    evaluate every target at the end.

    Args:
        sources: ``{name: path or spec}`` as for ``MixtureStream``.
        weights: ``{name: weight}`` or a sequence in source order (0 leaves a source out).
        targets: a :class:`TargetSet` or ``{name: TargetSet}``.
        train: model seed ``seed``, data order ``data_seed``, optimiser and batch shape.
        max_tokens: training tokens (rounded up to whole optimiser steps).
        cache_dir: results cached as JSON there; a hit returns without training (``model=None``).
        eval_every: also evaluate every this many optimiser steps (the curve).
        progress: a tqdm bar.
    """
    names = list(sources)
    w = _weight_dict(weights, names)
    tsets = {targets.name: targets} if isinstance(targets, TargetSet) else dict(targets)
    budget = Budget(int(max_tokens), train.tokens_per_step, train.grad_accum)
    cache_file = None
    if cache_dir is not None:
        desc = {"kind": "static", "sources": source_fingerprints(sources), "weights": w, "config": train.to_dict(),
                "max_tokens": int(max_tokens), "targets": {k: t.fingerprint() for k, t in tsets.items()},
                "eval_every": eval_every}
        cache_file = Path(cache_dir) / f"static-{cache_key(desc)}.json"
        if cache_file.exists():
            try:
                d = json.loads(cache_file.read_text())
                return StaticResult(d["weights"], d["losses"], d["compute"], d["curve"], None, True)
            except (OSError, ValueError, KeyError):
                pass
    trainer = ProxyTrainer(train, budget.optimizer_steps)
    it = iter(make_stream(sources, w, train))
    curve: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget.steps, desc="static run", unit="step", leave=False)
    ev = train.eval_batch_size
    for _ in range(budget.steps):
        tl = trainer.step(next(it)["tokens"])
        if bar is not None:
            bar.update(1)
        s = trainer.steps
        if eval_every and s % eval_every == 0 and s < budget.optimizer_steps and trainer.micro % train.grad_accum == 0:
            curve.append({"step": s, "tokens": trainer.tokens, "train_loss": float(tl.mean()),
                          **{k: evaluate(trainer.model, t, batch_size=ev, meter=trainer.meter).loss
                             for k, t in tsets.items()}})
    if bar is not None:
        bar.close()
    losses = {k: evaluate(trainer.model, t, batch_size=ev, meter=trainer.meter).to_dict() for k, t in tsets.items()}
    curve.append({"step": trainer.steps, "tokens": trainer.tokens, **{k: v["loss"] for k, v in losses.items()}})
    compute = trainer.meter.to_dict("static", optimizer_steps=trainer.steps, device=trainer.device_name,
                                    dtype=trainer.dtype_name, details={"weights": w})
    payload = {"weights": w, "losses": losses, "compute": compute, "curve": curve, "config": train.to_dict()}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache_file, payload)
    return StaticResult(w, losses, compute, curve, trainer.model if keep_model else None, False)


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


__all__ = ["StaticResult", "train_static"]
