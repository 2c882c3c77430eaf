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

* **Examples.** The mixture-of-proxies posterior of an example decides which source explains it, and
  a 64-token sequence carries too little evidence to tell overlapping sources apart: weak proxies
  then spread every example over several sources and the fit shrinks toward uniform. So, as in the
  paper (whole-example likelihoods), a document is the example: the consecutive target sequences
  of one document are scored together, in examples of up to ``mixmin.example_tokens`` (1,024) tokens
  (long documents give several examples, so a target of a few long documents still gives many), each
  weighted by its tokens, which keeps alpha a token share. On the quality benchmark's planted
  targets this took the L1 to the planted token shares from about 0.25 (64-token examples) to
  about 0.1 at the same proxies.

Target examples are split ``fit_fraction`` / rest (stratified by group): EG fits on the first part
and the objective on the rest is reported for the chosen alpha, uniform alpha and each single source.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..context import MethodResult, MethodSpec, RunContext, finish
from ..proxy.cache import ProxyCache, source_fingerprints
from ..proxy.compute import ComputeMeter
from ..proxy.trainer import ProxyTrainer, evaluate, make_stream
from ..schedule import Budget, mixmin_proxy_tokens
from ..targets import TargetSet, stratified_split


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


def example_ids(target: TargetSet, example_tokens: int) -> torch.Tensor:
    """int64 ``[N]``: the example each target sequence belongs to -- the consecutive sequences of one
    document (``target.doc``), in blocks of ``ceil(example_tokens / L)`` sequences; every sequence
    alone when the target has no document ids or the blocks would hold one sequence."""
    per = max(1, math.ceil(example_tokens / target.seq_len)) if example_tokens else 1
    if target.doc is None or per <= 1:
        return torch.arange(len(target))
    # sequences of one document in their order: rank within the document, then block of `per`
    order = torch.argsort(target.doc * len(target) + torch.arange(len(target)))
    doc_sorted = target.doc[order]
    start = torch.ones(len(target), dtype=torch.bool)
    start[1:] = doc_sorted[1:] != doc_sorted[:-1]
    first = torch.cummax(torch.where(start, torch.arange(len(target)), 0), 0).values
    block = (torch.arange(len(target)) - first) // per
    key = torch.empty(len(target), dtype=torch.int64)
    key[order] = doc_sorted * (len(target) + 1) + block
    return torch.unique(key, return_inverse=True)[1]


@dataclass
class Examples:
    """The target's examples: ``logq`` ``[K, E]`` (the sum of their sequences' log-likelihoods),
    ``weight`` ``[E]`` (their share of the target loss), ``tokens`` ``[E]`` (scored tokens) and
    ``group`` ``[E]``."""

    logq: torch.Tensor
    weight: torch.Tensor
    tokens: torch.Tensor
    group: torch.Tensor

    def coef(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """MixMin's ``w_e / len_e`` of the examples ``idx`` (all by default), with the weights
        renormalised over them: :func:`mixture_objective` is then a per-token loss."""
        idx = torch.arange(len(self.weight)) if idx is None else idx
        w = self.weight[idx]
        return w / w.sum() / self.tokens[idx]

    def token_shares(self, beta: torch.Tensor) -> torch.Tensor:
        """The token shares of a mixture ``beta`` of EXAMPLES: each example's target weight split
        over the sources by its posterior ``beta_k q_k(x_e) / sum_j beta_j q_j(x_e)``. (The EG fits
        the probability that an example comes from each source; examples of one source may be
        longer than another's, so those are not token shares.)"""
        lq = self.logq.to(torch.float64)
        post = torch.softmax(torch.log(beta.to(torch.float64)).clamp_min(-1e300)[:, None] + lq, dim=0)
        a = (post * self.weight[None, :]).sum(1)
        return a / a.sum()


def example_columns(logq: torch.Tensor, target: TargetSet, ex: torch.Tensor) -> Examples:
    """Sum the sequences' columns of ``logq`` ``[K, N]`` into the examples ``ex`` ``[N]``."""
    E = int(ex.max()) + 1 if len(ex) else 0
    z = lambda: torch.zeros(E, dtype=torch.float64)  # noqa: E731
    return Examples(torch.zeros(logq.shape[0], E, dtype=logq.dtype).index_add_(1, ex, logq),
                    z().index_add_(0, ex, target.example_weights()), z().index_add_(0, ex, target.scored()),
                    torch.zeros(E, dtype=torch.int64).index_copy_(0, ex, target.group))


def _split_examples(group: torch.Tensor, groups: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (fit, report) split of examples, stratified by group (as :meth:`TargetSet.split_indices`)."""
    ia, ib = stratified_split(group, groups, fraction, seed)
    if len(ia) == 0 or len(ib) == 0:
        raise ValueError(f"the target has too few examples ({len(group)}) to split fit/report; set "
                         "mixmin.fit_fraction=1 or lower mixmin.example_tokens")
    return ia, ib


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
    ex = None if cfg.per_token else example_columns(logq, tset, example_ids(tset, cfg.example_tokens))
    if cfg.fit_fraction < 1:
        fit_idx, rep_idx = (tset.split_indices(cfg.fit_fraction, cfg.split_seed) if ex is None else
                            _split_examples(ex.group, len(tset.group_names), cfg.fit_fraction, cfg.split_seed))
    else:
        fit_idx, rep_idx = torch.arange(len(tset) if ex is None else len(ex.weight)), None

    def cols(idx):
        if ex is not None:
            return ex.logq[:, idx], ex.coef(idx)
        sub = tset.subset(idx)
        w = sub.example_weights() / sub.scored()
        L = tset.seq_len
        c = (idx[:, None] * L + torch.arange(L)[None, :]).reshape(-1)
        return logq[:, c], w.repeat_interleave(L)

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
                  "examples" if ex is not None else "sequences": len(rep_idx)}
    trained = int(sum(p["tokens"]["train"] for p in ctx.meter.parts))
    shares = (lambda a: a) if ex is None else (lambda a: ex.token_shares(torch.as_tensor(a)).tolist())  # noqa: E731
    records = [{"step": h["step"], "tokens": trained, "weights": dict(zip(names, shares(h["alpha"]))),
                "target_loss": h["objective"], "movement": h["movement"]} for h in eg.history]
    details = {"fit_objective": eg.history[-1]["objective"], "report": report, "converged": eg.converged,
               "eg_steps": eg.steps, "eta_effective": eg.eta_effective, "per_token": cfg.per_token,
               "examples": None if ex is None else len(ex.weight),
               "example_shares": None if ex is None else dict(zip(names, eg.alpha.tolist())),
               "proxies_cached": [n for n, _, c in proxies if c], "target": tset.describe()}
    return MixMinFit(dict(zip(names, shares(eg.alpha.tolist()))), records, details)


def run(ctx: RunContext) -> MethodResult:
    """MixMin on the whole budget; the trajectory holds the EG iterates."""
    f = fit(ctx, int(ctx.config.max_tokens))
    for rec in f.records:
        ctx.writer.record(rec)
    return finish(ctx, "mixmin", f.weights, details=f.details, x="step", xlabel="exponentiated-gradient step")


SPEC = MethodSpec("mixmin", run, uses_target=True, online=False,
                  summary="one proxy per source, convex mixture fit by exponentiated gradient")

__all__ = ["EGResult", "Examples", "MixMinFit", "SPEC", "example_columns", "example_ids", "exponentiated_gradient", "fit",
           "mixture_gradient", "mixture_objective", "run", "score_matrix", "train_source_proxies"]
