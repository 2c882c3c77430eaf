"""DoReMi (Xie et al., NeurIPS 2023): domain weights from group DRO on excess loss.

1. A **reference model** is trained on the reference weights (uniform by default) -- cached on disk
   like MixMin's proxies, since it does not depend on any target.
2. A **proxy** is trained on a stratified stream with group DRO. At every step, per token, the
   excess loss ``l_theta - l_ref`` is clipped at 0 and averaged per source (token mean over the
   source's sequences in the batch) into ``lambda``; then

       alpha' = alpha * exp(eta * lambda)  (in log space: log alpha + eta * lambda), normalised,
       alpha  = (1 - c) alpha' + c / K     (eta = 1, c = 1e-3),

   and the proxy takes a step on ``sum_k alpha_k * lambda_k`` (the clipped excess, so tokens the
   proxy already predicts better than the reference give no gradient). A source absent from the
   batch gets ``lambda = 0``.
3. The output is the average of alpha over all steps.

DoReMi does not use a target: it minimises the worst-case excess loss over the training sources.
A target, when given, is only evaluated (reported in the trajectory).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .train_static import (
    ComputeMeter,
    MethodConfig,
    MethodResult,
    ProxyCache,
    ProxyTrainer,
    as_target,
    evaluate,
    make_stream,
    push_weights,
    source_fingerprints,
    write_outputs,
)

__all__ = ["DoReMiConfig", "doremi_update", "excess_by_source", "run_doremi", "train_reference"]


@dataclass
class DoReMiConfig(MethodConfig):
    """DoReMi settings (plus the common :class:`MethodConfig` fields; ``train.max_tokens`` is the
    proxy's budget).

    Attributes:
        reference_tokens: the reference model's budget (default ``train.max_tokens``).
        reference_weights: the reference mixture (default uniform).
        eta: step size of the domain-weight update (1).
        smoothing: c, mixing toward uniform after each update (1e-3).
        log_every: steps between trajectory records (and pushes to the sink).
        evaluate_target: evaluate the target at every record (costs eval passes, counted).
    """

    reference_tokens: int | None = None
    reference_weights: dict | None = None
    eta: float = 1.0
    smoothing: float = 1e-3
    log_every: int = 10
    evaluate_target: bool = False

    def problems(self) -> list[str]:
        p = []
        if self.reference_tokens is not None and (not isinstance(self.reference_tokens, int) or self.reference_tokens < 1):
            p.append(f"reference_tokens must be a positive integer or None, got {self.reference_tokens!r}")
        if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0):
            p.append(f"eta must be a finite number >= 0, got {self.eta!r}")
        if not 0 <= self.smoothing <= 1:
            p.append(f"smoothing must lie in [0, 1], got {self.smoothing}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            p.append(f"log_every must be a positive integer, got {self.log_every!r}")
        return p


# ============================================================================ pure pieces


def excess_by_source(token_loss: torch.Tensor, ref_loss: torch.Tensor, source: torch.Tensor, K: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-source mean of the clipped per-token excess ``max(l_theta - l_ref, 0)``.

    Returns ``(lambda [K], present [K] bool)``; keeps the autograd graph of ``token_loss`` (the
    proxy's loss is ``alpha . lambda``). Absent sources get 0."""
    ex = (token_loss - ref_loss).clamp_min(0.0)  # [B, L]
    per_seq_sum = ex.sum(1)
    ntok = torch.full_like(per_seq_sum, float(ex.shape[1]))
    sums = torch.zeros(K, dtype=ex.dtype, device=ex.device).index_add(0, source, per_seq_sum)
    counts = torch.zeros(K, dtype=ex.dtype, device=ex.device).index_add(0, source, ntok)
    present = counts > 0
    return sums / counts.clamp_min(1.0), present


def doremi_update(alpha: torch.Tensor, lam: torch.Tensor, eta: float = 1.0, smoothing: float = 1e-3) -> torch.Tensor:
    """``alpha' ∝ alpha * exp(eta * lambda)`` (log space), then ``(1 - c) alpha' + c / K``."""
    K = alpha.numel()
    a = torch.softmax(torch.log(alpha.to(torch.float64).clamp_min(1e-300)) + eta * lam.detach().to(torch.float64), 0)
    return (1.0 - smoothing) * a + smoothing / K


# ============================================================================ reference model


def train_reference(train_sources: Mapping[str, Any], cfg: DoReMiConfig, meter: ComputeMeter):
    """The reference model on ``reference_weights`` (cached). Returns ``(model, cached)``."""
    names = list(train_sources)
    ref_w = cfg.reference_weights or {n: 1.0 for n in names}
    # a different init seed from the proxy's, the same data order
    rcfg = dataclasses.replace(cfg.train, max_tokens=cfg.reference_tokens or cfg.train.max_tokens,
                               seed=cfg.train.seed + 1, data_seed=cfg.train.stream_seed)

    def train():
        trainer = ProxyTrainer(rcfg)
        it = iter(make_stream(train_sources, ref_w, rcfg))
        for _ in range(rcfg.total_steps):
            trainer.step(next(it)["tokens"])
        return trainer.model, trainer.meter.to_dict("doremi-reference", steps=trainer.steps)

    desc = {"kind": "doremi-reference", "sources": source_fingerprints(train_sources), "weights": ref_w,
            "train": rcfg.to_dict()}
    model, compute, cached = ProxyCache(cfg.cache_dir).get_or_train(desc, rcfg, train)
    meter.add("reference", compute, cached=cached)
    model.eval()
    return model, cached


# ============================================================================ the method


def run_doremi(train_sources: Mapping[str, Any], target: Any = None, config: DoReMiConfig | None = None,
               out_dir=None, sink=None) -> MethodResult:
    """DoReMi: reference model, then the group-DRO proxy; exports the run-average alpha."""
    cfg = config or DoReMiConfig()
    cfg.validate()
    names = list(train_sources)
    K = len(names)
    tcfg = cfg.train
    tset = as_target(target, tcfg.seq_len, max_seqs=cfg.target_max_seqs) if target is not None else None
    trainer = ProxyTrainer(tcfg)
    meter = trainer.meter
    ref, ref_cached = train_reference(train_sources, cfg, meter)
    alpha = torch.full((K,), 1.0 / K, dtype=torch.float64)
    a_sum = torch.zeros(K, dtype=torch.float64)
    lam_sum = torch.zeros(K, dtype=torch.float64)
    it = iter(make_stream(train_sources, None, tcfg))
    traj: list[dict] = [{"step": 0, "tokens": 0, "weights": dict(zip(names, alpha.tolist())), "target_loss": None}]
    push_weights(sink, dict(zip(names, alpha.tolist())))
    state = {"alpha": alpha}
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tcfg.total_steps, desc="doremi", unit="step", leave=False)
    for _ in range(tcfg.total_steps):
        b = next(it)
        tokens, source = b["tokens"].to(trainer.device), b["source"].to(trainer.device)
        with torch.no_grad():
            B, L = tokens.shape[0], tokens.shape[1] - 1
            ref_tl = torch.nn.functional.cross_entropy(
                ref(tokens[:, :-1]).reshape(B * L, -1), tokens[:, 1:].reshape(-1), reduction="none").view(B, L)
        meter.eval(B * L)

        def reduce(tl, src, ref_tl=ref_tl):
            lam, _ = excess_by_source(tl, ref_tl, src, K)
            state["alpha"] = doremi_update(state["alpha"], lam.detach().cpu(), cfg.eta, cfg.smoothing)
            state["lam"] = lam.detach().cpu().double()
            return (state["alpha"].to(lam.dtype).to(lam.device) * lam).sum()

        trainer.step(tokens, source, reduce=reduce)
        a_sum += state["alpha"]
        lam_sum += state["lam"]
        if bar is not None:
            bar.update(1)
        if trainer.steps % cfg.log_every == 0 or trainer.steps == tcfg.total_steps:
            w = dict(zip(names, state["alpha"].tolist()))
            tl = (evaluate(trainer.model, tset, batch_size=tcfg.eval_batch_size, meter=meter).loss
                  if (tset is not None and cfg.evaluate_target) else None)
            eff = push_weights(sink, w)
            traj.append({"step": trainer.steps, "tokens": trainer.tokens, "weights": w, "target_loss": tl,
                         "excess": dict(zip(names, (lam_sum / trainer.steps).tolist())),
                         "average": dict(zip(names, (a_sum / trainer.steps).tolist())), "effective_batch": eff})
    if bar is not None:
        bar.close()
    avg = a_sum / max(1, trainer.steps)
    weights = dict(zip(names, avg.tolist()))
    push_weights(sink, weights)
    compute = meter.to_dict("doremi", num_sources=K, steps=trainer.steps, reference_cached=ref_cached,
                            n_params=trainer.n_params["total"])
    extra = {"mode": "average", "last": dict(zip(names, state["alpha"].tolist())), "average": weights,
             "mean_excess": dict(zip(names, (lam_sum / max(1, trainer.steps)).tolist())),
             "target": tset.describe() if tset is not None else None}
    write_outputs(out_dir, "doremi", names, weights, traj, compute, extra=extra, plot=cfg.plot)
    return MethodResult("doremi", weights, names, traj, compute, extra, None if out_dir is None else Path(out_dir),
                        trainer.model)
