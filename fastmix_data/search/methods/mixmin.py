"""MixMin (Thudi et al., ICML 2025): the data-mixing bilevel problem made convex.

Idea: for a rich model class and no covariate shift, the best model for mixture alpha is the
alpha-mixture of the per-source best models. So with one cheap proxy ``q_k`` trained on source k
*alone*, the target loss of mixture alpha is approximately

    M(alpha) = - sum_n w_n (1/len_n) log sum_k alpha_k q_k(x_n)

(x_n the target sequences, w_n their weights in the target loss), which is convex in alpha. Store
``S[k, n] = log q_k(x_n)`` once; then minimise M over the simplex with exponentiated gradient (EG),
in log space (``logsumexp``): ``alpha <- alpha * exp(-eta * grad M(alpha)) / normaliser``, from
uniform, at most ``mixmin.max_iters`` steps. The K proxies share the budget (``max_tokens / K``
each by default) and are cached on disk (a new target only costs the scoring passes; the reused
proxies are still charged in ``compute.json``).

Two deliberate, documented departures from the reference code:

* **Step size.** ``grad M`` carries the factor 1/len_n, so with eta = 1 an EG step moves log alpha by
  about (share_k / alpha_k) / len: with 128-token sequences 100 steps do not converge. By default
  (``eta_scale="length"``) the step is ``eta / sum_n (w_n / len_n)`` -- eta per unit of the
  objective's total log-term weight. Same objective, same minimiser. ``"none"`` is the literal step.
* **Stopping.** ``grad M`` never vanishes on the simplex (at the optimum every active coordinate
  equals ``-sum_n w_n/len_n``), so "max|grad M| < tol" cannot trigger. We stop when no weight would
  move by more than ``tol`` in one step: ``max_k alpha_k * eta_eff * |g_k - <alpha, g>| < tol``.

Target sequences are split ``fit_fraction`` / rest (stratified by group): EG fits on the first part
and the objective on the rest is reported for the chosen alpha, uniform alpha and each single source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..context import MethodResult, MethodSpec, RunContext, finish
from ..proxy.cache import ProxyCache, source_fingerprints
from ..proxy.compute import ComputeMeter
from ..proxy.trainer import ProxyTrainer, evaluate, make_stream
from ..schedule import Budget, mixmin_proxy_tokens
from ..targets import TargetSet


def _lse_columns(log_alpha: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_alpha[:, None] + logq, dim=0)


def mixture_objective(alpha: torch.Tensor, logq: torch.Tensor, coef: torch.Tensor) -> float:
    """``M(alpha) = -sum_m coef_m log sum_k alpha_k exp(logq[k, m])`` (float64, log space).

    ``logq`` ``[K, M]``: log-likelihoods of M target items (sequences, or tokens with
    ``per_token``); ``coef`` ``[M]``: each item's weight, ``w_n / len_n``."""
    la = torch.log(alpha.to(torch.float64))
    return float(-(coef.to(torch.float64) * _lse_columns(la, logq.to(torch.float64))).sum())


def mixture_gradient(alpha: torch.Tensor, logq: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``dM/dalpha_k = -sum_m coef_m q_k(x_m) / sum_j alpha_j q_j(x_m)`` (never forms a likelihood)."""
    a, lq = alpha.to(torch.float64), logq.to(torch.float64)
    lse = _lse_columns(torch.log(a), lq)
    return -(coef.to(torch.float64)[None, :] * torch.exp(lq - lse[None, :])).sum(1)


@dataclass
class EGResult:
    """Result of :func:`exponentiated_gradient`: final ``alpha``, ``history`` (per iterate: ``step``,
    ``alpha``, ``objective``, ``movement``), ``converged``, ``steps`` taken, ``eta_effective``."""

    alpha: torch.Tensor
    history: list[dict]
    converged: bool
    steps: int
    eta_effective: float


def exponentiated_gradient(logq: torch.Tensor, coef: torch.Tensor, *, eta: float = 1.0, eta_scale: str = "length",
                           max_steps: int = 100, tol: float = 1e-4, init: torch.Tensor | None = None) -> EGResult:
    """Minimise :func:`mixture_objective` over the simplex by EG from uniform (or ``init``)."""
    logq, coef = logq.to(torch.float64), coef.to(torch.float64)
    if logq.dim() != 2 or coef.shape != (logq.shape[1],):
        raise ValueError(f"logq must be [K, M] and coef [M]; got {tuple(logq.shape)} and {tuple(coef.shape)}")
    if not torch.isfinite(logq).all():
        raise ValueError("logq has non-finite entries (a proxy produced NaN/inf log-likelihoods)")
    K = logq.shape[0]
    eta_eff = float(eta / coef.sum()) if eta_scale == "length" else float(eta)
    alpha = torch.full((K,), 1.0 / K, dtype=torch.float64) if init is None else init.to(torch.float64) / init.sum()
    history, converged, steps = [], False, 0
    while True:
        g = mixture_gradient(alpha, logq, coef)
        movement = float((alpha * eta_eff * (g - (alpha * g).sum()).abs()).max())
        history.append({"step": steps, "alpha": alpha.tolist(), "objective": mixture_objective(alpha, logq, coef),
                        "movement": movement})
        if movement < tol:
            converged = True
            break
        if steps >= max_steps:
            break
        alpha = torch.softmax(torch.log(alpha) - eta_eff * g, dim=0)
        steps += 1
    return EGResult(alpha, history, converged, steps, eta_eff)


def train_source_proxies(ctx: RunContext, meter: ComputeMeter, tokens_total: int) -> list[tuple[str, object, bool]]:
    """One proxy per source on that source alone, ``mixmin.proxy_tokens`` each (default
    ``tokens_total / K``), from the cache when possible; every proxy is charged to ``meter``."""
    cfg, sources = ctx.config, ctx.require_sources("mixmin")
    per = mixmin_proxy_tokens(tokens_total, ctx.K, cfg.mixmin.proxy_tokens)
    seed = cfg.mixmin.proxy_seed
    tcfg = cfg.train if seed is None else dataclasses.replace(cfg.train, seed=seed, data_seed=seed)
    budget = Budget(per, tcfg.tokens_per_step, tcfg.grad_accum)
    fps = source_fingerprints(sources)
    cache = ProxyCache(cfg.cache_dir)
    out = []
    for name in ctx.names:
        def fit(name=name):
            trainer = ProxyTrainer(tcfg, budget.optimizer_steps)
            it = iter(make_stream({name: sources[name]}, {name: 1.0}, tcfg))
            for _ in range(budget.steps):
                trainer.step(next(it)["tokens"])
            return trainer.model, trainer.meter.to_dict("mixmin-proxy", optimizer_steps=trainer.steps,
                                                        details={"source": name})

        desc = {"kind": "mixmin-proxy", "source": fps[name], "train": tcfg.to_dict(), "tokens": per}
        model, compute, cached = cache.get_or_train(desc, tcfg, fit)
        meter.add(f"proxy:{name}", compute, cached=cached)
        out.append((name, model, cached))
    return out


def score_matrix(models, target: TargetSet, *, per_token: bool = False, meter: ComputeMeter | None = None,
                 batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logq, coef)`` for the EG: sequence log-likelihoods ``S[k, n] = log q_k(x_n)`` (scored
    tokens only) with ``coef_n = w_n / len_n`` -- or, with ``per_token``, token log-probabilities
    flattened to ``[K, N*L]``."""
    rows = []
    scored = target.scored()
    for m in models:
        r = evaluate(m, target, batch_size=batch_size, meter=meter, keep_token_logprobs=per_token)
        rows.append(r.token_logprobs.reshape(-1) if per_token else -r.seq_losses * scored)
    w = target.example_weights() / scored
    coef = w.repeat_interleave(target.seq_len) if per_token else w
    return torch.stack(rows), coef


@dataclass
class MixMinFit:
    """MixMin's fitted mixture, its EG trajectory records and what to report."""

    weights: dict[str, float]
    records: list[dict]
    details: dict


def fit(ctx: RunContext, tokens_total: int) -> MixMinFit:
    """Train (or reuse) the proxies on ``tokens_total`` tokens, score the target, fit alpha by EG."""
    cfg, tset, names = ctx.config.mixmin, ctx.target, ctx.names
    proxies = train_source_proxies(ctx, ctx.meter, tokens_total)
    logq, coef = score_matrix([m for _, m, _ in proxies], tset, per_token=cfg.per_token, meter=ctx.meter,
                              batch_size=ctx.config.train.eval_batch_size)
    if cfg.fit_fraction < 1:
        fit_idx, rep_idx = tset.split_indices(cfg.fit_fraction, cfg.split_seed)
    else:
        fit_idx, rep_idx = torch.arange(len(tset)), None

    def cols(idx):
        sub = tset.subset(idx)
        w = sub.example_weights() / sub.scored()
        if cfg.per_token:
            L = tset.seq_len
            c = (idx[:, None] * L + torch.arange(L)[None, :]).reshape(-1)
            return logq[:, c], w.repeat_interleave(L)
        return logq[:, idx], w

    lq_fit, c_fit = cols(fit_idx)
    eg = exponentiated_gradient(lq_fit, c_fit, eta=cfg.eta, eta_scale=cfg.eta_scale, max_steps=cfg.max_iters,
                                tol=cfg.tol)
    report = {}
    if rep_idx is not None:
        lq, c = cols(rep_idx)
        K = len(names)
        report = {"objective": mixture_objective(eg.alpha, lq, c),
                  "uniform_objective": mixture_objective(torch.full((K,), 1.0 / K, dtype=torch.float64), lq, c),
                  "single_source": {n: mixture_objective(torch.eye(K, dtype=torch.float64)[k].clamp_min(1e-300), lq, c)
                                    for k, n in enumerate(names)},
                  "sequences": len(rep_idx)}
    trained = int(sum(p["tokens"]["train"] for p in ctx.meter.parts))
    records = [{"step": h["step"], "tokens": trained, "weights": dict(zip(names, h["alpha"])),
                "target_loss": h["objective"], "movement": h["movement"]} for h in eg.history]
    details = {"fit_objective": eg.history[-1]["objective"], "report": report, "converged": eg.converged,
               "eg_steps": eg.steps, "eta_effective": eg.eta_effective, "per_token": cfg.per_token,
               "proxies_cached": [n for n, _, c in proxies if c], "target": tset.describe()}
    return MixMinFit(dict(zip(names, eg.alpha.tolist())), records, details)


def run(ctx: RunContext) -> MethodResult:
    """MixMin on the whole budget; the trajectory holds the EG iterates."""
    f = fit(ctx, int(ctx.config.max_tokens))
    for rec in f.records:
        ctx.writer.record(rec)
    return finish(ctx, "mixmin", f.weights, details=f.details, x="step", xlabel="exponentiated-gradient step")


SPEC = MethodSpec("mixmin", run, uses_target=True, online=False,
                  summary="one proxy per source, convex mixture fit by exponentiated gradient")

__all__ = ["EGResult", "MixMinFit", "SPEC", "exponentiated_gradient", "fit", "mixture_gradient",
           "mixture_objective", "run", "score_matrix", "train_source_proxies"]
