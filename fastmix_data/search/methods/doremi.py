"""DoReMi (Xie et al., NeurIPS 2023): domain weights from group DRO on excess loss.

1. A **reference model** trained on the reference weights (uniform by default) on
   ``doremi.reference_fraction`` of the budget -- cached on disk like MixMin's proxies (it does not
   depend on the target), and charged to every run that uses it.
2. A **proxy** trained on the rest of the budget on a stratified stream with group DRO: at every
   step, per token, the excess loss ``l_theta - l_ref`` is clipped at 0 and averaged per source into
   ``lambda``; then ``alpha <- softmax(log alpha + eta * lambda)``, ``alpha <- (1 - c) alpha + c / K``
   (eta = 1, c = 1e-3), and the proxy steps on ``sum_k alpha_k lambda_k``. An absent source gets 0.
3. The output is the average of alpha over all steps.

DoReMi ignores the target (it minimises the worst-case excess loss over the training sources); a
target, when given, is only evaluated (``doremi.evaluate_target``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..context import MethodResult, MethodSpec, RunContext, finish, uniform
from ..proxy.cache import ProxyCache, source_fingerprints
from ..proxy.compute import ComputeMeter
from ..proxy.trainer import ProxyTrainer, evaluate, make_stream
from ..schedule import Budget, doremi_log_every, doremi_split
from ..vocab import check_ids


def excess_by_source(token_loss: torch.Tensor, ref_loss: torch.Tensor, source: torch.Tensor, K: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-source mean of the clipped per-token excess ``max(l_theta - l_ref, 0)``: ``(lambda [K],
    present [K])``; keeps the autograd graph of ``token_loss``. Absent sources get 0."""
    ex = (token_loss - ref_loss).clamp_min(0.0)
    per_seq = ex.sum(1)
    ntok = torch.full_like(per_seq, float(ex.shape[1]))
    sums = torch.zeros(K, dtype=ex.dtype, device=ex.device).index_add(0, source, per_seq)
    counts = torch.zeros(K, dtype=ex.dtype, device=ex.device).index_add(0, source, ntok)
    return sums / counts.clamp_min(1.0), counts > 0


def doremi_update(alpha: torch.Tensor, lam: torch.Tensor, eta: float = 1.0, smoothing: float = 1e-3) -> torch.Tensor:
    """``alpha' ∝ alpha * exp(eta * lambda)`` (log space), then ``(1 - c) alpha' + c / K``."""
    K = alpha.numel()
    a = torch.softmax(torch.log(alpha.to(torch.float64).clamp_min(1e-300)) + eta * lam.detach().to(torch.float64), 0)
    return (1.0 - smoothing) * a + smoothing / K


def train_reference(ctx: RunContext, tokens: int, meter: ComputeMeter):
    """The reference model on ``doremi.reference_weights`` (cached). Returns ``(model, cached)``."""
    sources = ctx.require_sources("doremi")
    ref_w = ctx.config.doremi.reference_weights or uniform(ctx.names)
    t = ctx.config.train
    rcfg = dataclasses.replace(t, seed=t.seed + 1, data_seed=t.stream_seed)  # another init, the same data order
    budget = Budget(tokens, rcfg.tokens_per_step, rcfg.grad_accum)

    def fit():
        trainer = ProxyTrainer(rcfg, budget.optimizer_steps)
        it = iter(make_stream(sources, ref_w, rcfg))
        for _ in range(budget.steps):
            trainer.step(next(it)["tokens"])
        return trainer.model, trainer.meter.to_dict("doremi-reference", optimizer_steps=trainer.steps)

    desc = {"kind": "doremi-reference", "sources": source_fingerprints(sources), "weights": ref_w,
            "train": rcfg.to_dict(), "tokens": tokens}
    model, compute, cached = ProxyCache(ctx.config.cache_dir).get_or_train(desc, rcfg, fit)
    meter.add("reference", compute, cached=cached)
    model.eval()
    return model, cached


def run(ctx: RunContext) -> MethodResult:
    """Reference model, then the group-DRO proxy; exports the run-average alpha."""
    cfg, names, K = ctx.config.doremi, ctx.names, ctx.K
    ref_tokens, proxy_tokens = doremi_split(int(ctx.config.max_tokens), cfg.reference_fraction)
    t = ctx.config.train
    budget = Budget(proxy_tokens, t.tokens_per_step, t.grad_accum)
    ref, ref_cached = train_reference(ctx, ref_tokens, ctx.meter)
    trainer = ProxyTrainer(t, budget.optimizer_steps, ctx.meter)
    log_every = doremi_log_every(budget.steps, cfg.log_every)
    alpha = torch.full((K,), 1.0 / K, dtype=torch.float64)
    a_sum, lam_sum = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    it = iter(ctx.train_stream())
    ctx.writer.write_config(ctx.config.to_dict(), {"doremi": {"reference_tokens": ref_tokens,
                                                              "proxy_tokens": proxy_tokens, "log_every": log_every}})
    eff = ctx.publish(dict(zip(names, alpha.tolist())))
    ctx.writer.record({"step": 0, "tokens": 0, "weights": dict(zip(names, alpha.tolist())), "target_loss": None,
                       "effective_batch": eff})
    state = {"alpha": alpha, "lam": torch.zeros(K, dtype=torch.float64)}
    for _ in range(budget.steps):
        b = next(it)
        check_ids(b["tokens"], trainer.vocab_size, f"training micro-batch {trainer.micro + 1}")  # before the reference
        tokens, source = b["tokens"].to(trainer.device), b["source"].to(trainer.device)
        with torch.no_grad():
            B, L = tokens.shape[0], tokens.shape[1] - 1
            ref_tl = torch.nn.functional.cross_entropy(
                ref(tokens[:, :-1]).reshape(B * L, -1), tokens[:, 1:].reshape(-1), reduction="none").view(B, L)
        ctx.meter.eval(B * L)

        def reduce(tl, src, ref_tl=ref_tl):
            lam, _ = excess_by_source(tl, ref_tl, src, K)
            state["alpha"] = doremi_update(state["alpha"], lam.detach().cpu(), cfg.eta, cfg.smoothing)
            state["lam"] = lam.detach().cpu().double()
            return (state["alpha"].to(lam.dtype).to(lam.device) * lam).sum()

        trainer.step(tokens, source, reduce=reduce)
        a_sum += state["alpha"]
        lam_sum += state["lam"]
        if trainer.micro % log_every == 0 or trainer.micro == budget.steps:
            w = dict(zip(names, state["alpha"].tolist()))
            tl = (evaluate(trainer.model, ctx.target, batch_size=t.eval_batch_size, meter=ctx.meter).loss
                  if (ctx.target is not None and cfg.evaluate_target) else None)
            ctx.writer.record({"step": trainer.micro, "tokens": trainer.tokens, "weights": w, "target_loss": tl,
                               "excess": dict(zip(names, (lam_sum / trainer.micro).tolist())),
                               "average": dict(zip(names, (a_sum / trainer.micro).tolist())),
                               "effective_batch": ctx.publish(w)})
    avg = dict(zip(names, (a_sum / max(1, trainer.micro)).tolist()))
    details = {"reference_cached": ref_cached, "reference_tokens": ref_tokens, "proxy_tokens": proxy_tokens,
               "mean_excess": dict(zip(names, (lam_sum / max(1, trainer.micro)).tolist()))}
    return finish(ctx, "doremi", avg, exported="average",
                  candidates={"average": avg, "last": dict(zip(names, state["alpha"].tolist()))}, details=details,
                  stopped_reason="max_tokens", optimizer_steps=trainer.steps, device=trainer.device_name,
                  dtype=trainer.dtype_name, model=trainer.model)


SPEC = MethodSpec("doremi", run, uses_target=False, online=True,
                  summary="group DRO on excess loss against a reference model (ignores the target)")

__all__ = ["SPEC", "doremi_update", "excess_by_source", "run", "train_reference"]
