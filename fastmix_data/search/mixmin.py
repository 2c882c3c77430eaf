"""MixMin (Thudi et al., ICML 2025): the data-mixing bilevel problem made convex.

Idea: for a rich model class and no covariate shift, the best model for mixture alpha is the
alpha-mixture of the per-source best models. So with one cheap proxy ``q_k`` trained on source k
*alone*, the target loss of mixture alpha is approximately

    M(alpha) = - sum_n w_n (1/len_n) log sum_k alpha_k q_k(x_n)

(x_n the target sequences, w_n their weights in the target loss -- 1/N for a token-averaged
target), which is convex in alpha. Store ``S[k, n] = log q_k(x_n)`` once; then minimise M over the
simplex with exponentiated gradient (EG), working in log space (``logsumexp``):

    alpha <- alpha * exp(-eta * grad M(alpha)) / normaliser,     start uniform, <= 100 steps.

A new target only needs the K proxies to score it: proxies are cached on disk (:class:`ProxyCache`)
keyed by the content fingerprint of their source and their training config.

Two deliberate, documented departures from the reference code (``eta_scale``, stopping rule):

* **Step size.** ``grad M`` carries the factor 1/len_n, so with eta = 1 an EG step moves log alpha by
  about (share_k / alpha_k) / len: with 128-token sequences 100 steps do not converge. By default
  (``eta_scale="length"``) the step is ``eta / sum_n (w_n / len_n)`` -- eta per unit of the
  objective's total log-term weight, i.e. eta = 1 on the mean *sequence* log-likelihood. This
  changes the step, not the objective or its minimiser. ``eta_scale="none"`` is the literal update.
* **Stopping.** ``grad M`` never vanishes on the simplex (at the optimum every active coordinate
  equals -sum_n w_n/len_n), so "max|grad M| < tol" cannot trigger. We stop when no weight would move
  by more than ``tol`` in one step: ``max_k alpha_k * eta_eff * |g_k - <alpha, g>| < tol``.

Target sequences are split 80/20 (fit / report, stratified by group): EG fits on 80 %, and the
objective on the held-out 20 % is reported for the chosen alpha, for uniform alpha and for each
single source. ``per_token=True`` mixes the proxies per token instead of per sequence (ablation).
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
    TargetSet,
    as_target,
    evaluate,
    make_stream,
    push_weights,
    source_fingerprints,
    write_outputs,
)

__all__ = [
    "EGResult",
    "MixMinConfig",
    "exponentiated_gradient",
    "mixture_gradient",
    "mixture_objective",
    "run_mixmin",
    "score_matrix",
    "train_source_proxies",
]


@dataclass
class MixMinConfig(MethodConfig):
    """MixMin settings (plus the common :class:`MethodConfig` fields).

    Attributes:
        proxy_tokens: training tokens of *each* per-source proxy (default ``train.max_tokens // K``,
            so that all K proxies together cost ``train.max_tokens``).
        eta: EG step size (see ``eta_scale``).
        eta_scale: ``"length"`` (default: eta per unit of total log-term weight, see module doc) or
            ``"none"`` (the literal ``alpha * exp(-eta * grad)``).
        max_steps: at most this many EG steps.
        tol: stop when no weight moves by more than this in a step.
        fit_fraction: share of target sequences used to fit alpha (the rest is reported).
        split_seed: seed of the fit/report split.
        per_token: mix the proxies' per-token probabilities instead of whole-sequence likelihoods.
        proxy_seed: when set, the proxies' model and data seed (instead of ``train.seed`` /
            ``train.data_seed``), so runs that differ only in seed share one cached proxy set.
    """

    proxy_tokens: int | None = None
    eta: float = 1.0
    eta_scale: str = "length"
    max_steps: int = 100
    tol: float = 1e-4
    fit_fraction: float = 0.8
    split_seed: int = 0
    per_token: bool = False
    proxy_seed: int | None = None

    def problems(self) -> list[str]:
        p = []
        if self.proxy_tokens is not None and (not isinstance(self.proxy_tokens, int) or self.proxy_tokens < 1):
            p.append(f"proxy_tokens must be a positive integer or None, got {self.proxy_tokens!r}")
        if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta > 0):
            p.append(f"eta must be a finite number > 0, got {self.eta!r}")
        if self.eta_scale not in ("length", "none"):
            p.append(f"eta_scale must be 'length' or 'none', got {self.eta_scale!r}")
        if not isinstance(self.max_steps, int) or self.max_steps < 0:
            p.append(f"max_steps must be a non-negative integer, got {self.max_steps!r}")
        if not self.tol >= 0:
            p.append(f"tol must be >= 0, got {self.tol}")
        if self.proxy_seed is not None and (not isinstance(self.proxy_seed, int) or self.proxy_seed < 0):
            p.append(f"proxy_seed must be None or a non-negative integer, got {self.proxy_seed!r}")
        if not 0 < self.fit_fraction <= 1:
            p.append(f"fit_fraction must lie in (0, 1], got {self.fit_fraction}")
        return p


# ============================================================================ the convex problem


def _lse_columns(log_alpha: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_alpha[:, None] + logq, dim=0)


def mixture_objective(alpha: torch.Tensor, logq: torch.Tensor, coef: torch.Tensor) -> float:
    """``M(alpha) = -sum_m coef_m log sum_k alpha_k exp(logq[k, m])`` (float64, log space).

    ``logq`` ``[K, M]``: log-likelihoods of M target items (sequences, or tokens with
    ``per_token``); ``coef`` ``[M]``: each item's weight, ``w_n / len_n``."""
    la = torch.log(alpha.to(torch.float64))
    return float(-(coef.to(torch.float64) * _lse_columns(la, logq.to(torch.float64))).sum())


def mixture_gradient(alpha: torch.Tensor, logq: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``dM/dalpha_k = -sum_m coef_m q_k(x_m) / sum_j alpha_j q_j(x_m)``, computed as
    ``exp(logq - logsumexp)`` (never forms a likelihood)."""
    a = alpha.to(torch.float64)
    lq = logq.to(torch.float64)
    lse = _lse_columns(torch.log(a), lq)
    return -(coef.to(torch.float64)[None, :] * torch.exp(lq - lse[None, :])).sum(1)


@dataclass
class EGResult:
    """Result of :func:`exponentiated_gradient`: final ``alpha``, ``history`` (one record per
    iterate: ``step``, ``alpha``, ``objective``, ``movement``), ``converged``, ``steps`` taken."""

    alpha: torch.Tensor
    history: list[dict]
    converged: bool
    steps: int
    eta_effective: float


def exponentiated_gradient(
    logq: torch.Tensor,
    coef: torch.Tensor,
    *,
    eta: float = 1.0,
    eta_scale: str = "length",
    max_steps: int = 100,
    tol: float = 1e-4,
    init: torch.Tensor | None = None,
) -> EGResult:
    """Minimise :func:`mixture_objective` over the simplex by exponentiated gradient from uniform
    (or ``init``). See the module docstring for ``eta_scale`` and the stopping rule."""
    logq = logq.to(torch.float64)
    coef = coef.to(torch.float64)
    K = logq.shape[0]
    if logq.dim() != 2 or coef.shape != (logq.shape[1],):
        raise ValueError(f"logq must be [K, M] and coef [M]; got {tuple(logq.shape)} and {tuple(coef.shape)}")
    if not torch.isfinite(logq).all():
        raise ValueError("logq has non-finite entries (a proxy produced NaN/inf log-likelihoods)")
    eta_eff = float(eta / coef.sum()) if eta_scale == "length" else float(eta)
    alpha = torch.full((K,), 1.0 / K, dtype=torch.float64) if init is None else init.to(torch.float64) / init.sum()
    history = []
    converged = False
    steps = 0
    while True:
        g = mixture_gradient(alpha, logq, coef)
        centred = g - (alpha * g).sum()
        movement = float((alpha * eta_eff * centred.abs()).max())
        history.append({"step": steps, "alpha": alpha.tolist(), "objective": mixture_objective(alpha, logq, coef),
                        "movement": movement, "grad": g.tolist()})
        if movement < tol:
            converged = True
            break
        if steps >= max_steps:
            break
        alpha = torch.softmax(torch.log(alpha) - eta_eff * g, dim=0)
        steps += 1
    return EGResult(alpha, history, converged, steps, eta_eff)


# ============================================================================ proxies and scores


def train_source_proxies(train_sources: Mapping[str, Any], cfg: MixMinConfig, meter: ComputeMeter):
    """One proxy per source, trained on that source alone (cached). Returns ``[(name, model, cached)]``
    and folds each proxy's compute into ``meter`` (cached ones recorded, not counted)."""
    names = list(train_sources)
    tokens = cfg.proxy_tokens or max(1, cfg.train.max_tokens // len(names))
    tcfg = dataclasses.replace(cfg.train, max_tokens=tokens)
    if cfg.proxy_seed is not None:
        tcfg = dataclasses.replace(tcfg, seed=cfg.proxy_seed, data_seed=cfg.proxy_seed)
    fps = source_fingerprints(train_sources)
    cache = ProxyCache(cfg.cache_dir)
    out = []
    for name in names:
        def train(name=name):
            trainer = ProxyTrainer(tcfg)
            stream = make_stream({name: train_sources[name]}, {name: 1.0}, tcfg)
            it = iter(stream)
            for _ in range(tcfg.total_steps):
                trainer.step(next(it)["tokens"])
            return trainer.model, trainer.meter.to_dict("mixmin-proxy", source=name, steps=trainer.steps)

        desc = {"kind": "mixmin-proxy", "source": fps[name], "train": tcfg.to_dict()}
        model, compute, cached = cache.get_or_train(desc, tcfg, train)
        meter.add(f"proxy:{name}", compute, cached=cached)
        if meter.N == 0:
            meter.N = int(compute.get("n_params_flops", 0))
        out.append((name, model, cached))
    return out


def score_matrix(models, target: TargetSet, *, per_token: bool = False, meter: ComputeMeter | None = None,
                 batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logq, coef)`` for the EG: sequence log-likelihoods ``S[k, n] = log q_k(x_n)`` with
    ``coef_n = w_n / len_n`` -- or, with ``per_token``, token log-probabilities flattened to
    ``[K, N*L]`` with ``coef = w_n / len_n`` per token."""
    rows = []
    for m in models:
        r = evaluate(m, target, batch_size=batch_size, meter=meter, keep_token_logprobs=per_token)
        rows.append(r.token_logprobs.reshape(-1) if per_token else -r.seq_losses * target.seq_len)
    logq = torch.stack(rows)
    w = target.example_weights() / target.seq_len
    coef = w.repeat_interleave(target.seq_len) if per_token else w
    return logq, coef


# ============================================================================ the method


def run_mixmin(train_sources: Mapping[str, Any], target: Any, config: MixMinConfig | None = None,
               out_dir=None, sink=None) -> MethodResult:
    """MixMin: per-source proxies (cached), target scores, EG on the fit split, report on the rest.

    ``extra`` (also in ``weights.json``): the report-split objective for the chosen alpha, for
    uniform alpha and for each single source, the EG convergence, and the target's group shares.
    """
    cfg = config or MixMinConfig()
    cfg.validate()
    names = list(train_sources)
    tset = as_target(target, cfg.train.seq_len, max_seqs=cfg.target_max_seqs)
    meter = ComputeMeter(0)
    proxies = train_source_proxies(train_sources, cfg, meter)
    models = [m for _, m, _ in proxies]
    logq, coef = score_matrix(models, tset, per_token=cfg.per_token, meter=meter, batch_size=cfg.train.eval_batch_size)
    if cfg.fit_fraction < 1:
        fit_idx, rep_idx = tset.split_indices(cfg.fit_fraction, cfg.split_seed)
        fit, rep = tset.subset(fit_idx), tset.subset(rep_idx)
    else:
        fit, rep, fit_idx, rep_idx = tset, None, torch.arange(len(tset)), None

    def cols(idx, sub: TargetSet):
        w = sub.example_weights() / sub.seq_len
        if cfg.per_token:
            L = tset.seq_len
            c = (idx[:, None] * L + torch.arange(L)[None, :]).reshape(-1)
            return logq[:, c], w.repeat_interleave(L)
        return logq[:, idx], w

    lq_fit, c_fit = cols(fit_idx, fit)
    eg = exponentiated_gradient(lq_fit, c_fit, eta=cfg.eta, eta_scale=cfg.eta_scale, max_steps=cfg.max_steps, tol=cfg.tol)
    alpha = eg.alpha
    weights = dict(zip(names, alpha.tolist()))
    report = {}
    if rep is not None:
        lq_rep, c_rep = cols(rep_idx, rep)
        uni = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
        report = {
            "objective": mixture_objective(alpha, lq_rep, c_rep),
            "uniform_objective": mixture_objective(uni, lq_rep, c_rep),
            "single_source": {n: mixture_objective(torch.eye(len(names), dtype=torch.float64)[k].clamp_min(1e-300),
                                                   lq_rep, c_rep) for k, n in enumerate(names)},
            "sequences": len(rep),
        }
    proxy_tokens = int(sum(p["tokens"]["train"] for p in meter.parts.values()))
    traj = [{"step": h["step"], "tokens": proxy_tokens, "weights": dict(zip(names, h["alpha"])),
             "target_loss": h["objective"], "movement": h["movement"]} for h in eg.history]
    eff = push_weights(sink, weights)
    compute = meter.to_dict("mixmin", num_sources=len(names), eg_steps=eg.steps,
                            proxies_cached=[n for n, _, c in proxies if c])
    extra = {"fit_objective": eg.history[-1]["objective"], "report": report, "converged": eg.converged,
             "eg_steps": eg.steps, "eta_effective": eg.eta_effective, "per_token": cfg.per_token,
             "target": tset.describe(), "effective_batch": eff}
    write_outputs(out_dir, "mixmin", names, weights, traj, compute, extra=extra, plot=cfg.plot,
                  x="step", xlabel="exponentiated-gradient step")
    return MethodResult("mixmin", weights, names, traj, compute, extra, None if out_dir is None else Path(out_dir))
