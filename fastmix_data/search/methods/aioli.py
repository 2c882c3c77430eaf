"""Aioli (Chen et al., ICLR 2025): online mixing with a mixing law estimated while training.

Aioli reads mixing methods as greedy minimisers of a *dynamic mixing law*: over a round, the target
losses fall as ``L^{t+1} = L^t - A^t p^t`` (``A[i, j]``: how much training on source j lowers
target loss i), greedily minimised by ``p_j <- p_j * exp(eta * sum_i w_i A_ij) / normaliser``
(``w_i`` the weight of target group i). Aioli *estimates* A online. Each round:

1. **LearnParams.** For R sweeps, for each source j in a seeded random order (every second sweep
   the previous order reversed: antithetic pairs cancel a linear trend along the sweep), train S
   *real* steps on the smoothed one-hot probe ``q_j = rho e_j + (1 - rho)/(K - 1) (1 - e_j)`` --
   served by ``stream.probe(q_j, steps=S)``, which leaves the main stream's position and history
   intact -- and record the drop of every target group's validation loss into column j. Probes
   run back to back (K R + 1 evaluations per round).
2. Average over sweeps; the observed drops are ``A Q`` with ``Q[:, j] = q_j``, so the smoothing is
   undone exactly by ``A = A_obs Q^{-1}`` (Q is invertible whenever rho != 1/K).
3. Shift A to non-negative, normalise it to sum 1, optionally smooth it across rounds (EMA).
4. Update p, publish it, and train the rest of the round on p.

The schedule -- steps on the initial mixture before the first round (away from the steepest part
of the learning curve, whose trend biases the first probes), rounds, an even number of sweeps,
probe length, eta and rho -- derives from the budget and K
(:func:`fastmix_data.search.schedule.aioli_schedule`). Every probe step and validation pass is
counted. Exported: p averaged over the training steps that used it (``final="average"``) or the last p.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..context import MethodResult, MethodSpec, RunContext, finish
from ..proxy.trainer import ProxyTrainer, evaluate
from ..schedule import AioliSchedule, aioli_schedule
from ..targets import TargetSet


def smoothing_matrix(K: int, rho: float) -> torch.Tensor:
    """``Q`` (float64 ``[K, K]``) whose column j is the probe mixture ``q_j``."""
    if K < 2:
        raise ValueError(f"Aioli needs at least 2 sources, got {K}")
    off = (1.0 - rho) / (K - 1)
    return torch.full((K, K), off, dtype=torch.float64) + (rho - off) * torch.eye(K, dtype=torch.float64)


def unsmooth(observed: torch.Tensor, rho: float) -> torch.Tensor:
    """Solve ``A Q = observed`` for A (``observed`` ``[m, K]``, column j measured under probe q_j).

    Raises:
        ValueError: ``rho == 1/K`` (every probe is the uniform mixture; Q is singular).
    """
    obs = observed.to(torch.float64)
    K = obs.shape[1]
    if abs(rho - 1.0 / K) < 1e-9:
        raise ValueError(f"rho={rho} equals 1/K: all probes are the same mixture and A cannot be recovered")
    return torch.linalg.solve(smoothing_matrix(K, rho).T, obs.T).T


def normalise_mixing_matrix(A: torch.Tensor) -> torch.Tensor:
    """Shift to non-negative (subtract the minimum entry) and scale to sum 1 (uniform if all equal)."""
    A = A.to(torch.float64) - A.min()
    s = A.sum()
    return A / s if s > 0 else torch.full_like(A, 1.0 / A.numel())


def update_weights(p: torch.Tensor, A: torch.Tensor, row_weights: torch.Tensor, eta: float) -> torch.Tensor:
    """``p_j <- p_j exp(eta * sum_i w_i A_ij)``, normalised (in log space)."""
    score = (row_weights.to(torch.float64)[:, None] * A).sum(0)
    return torch.softmax(torch.log(p.to(torch.float64).clamp_min(1e-300)) + eta * score, dim=0)


def _group_losses(trainer: ProxyTrainer, val: TargetSet) -> torch.Tensor:
    r = evaluate(trainer.model, val, batch_size=trainer.cfg.eval_batch_size, meter=trainer.meter)
    return torch.tensor([r.group_losses.get(n, math.nan) for n in val.group_names], dtype=torch.float64)


def learn_params(trainer: ProxyTrainer, stream, val: TargetSet, sched: AioliSchedule, rng: np.random.Generator,
                 names: list[str], antithetic: bool = True) -> tuple[torch.Tensor, dict]:
    """One round's LearnParams: ``sweeps`` x K probes of ``probe_steps`` real training steps each
    (``stream.probe``); returns the sweep-averaged observed loss drops ``[groups, K]`` and a log."""
    K = len(names)
    Q = smoothing_matrix(K, sched.rho)
    sums = torch.zeros(len(val.group_names), K, dtype=torch.float64)
    before = _group_losses(trainer, val)
    log: dict = {"probes": [], "steps": 0}
    order: list[int] = []
    for r in range(sched.sweeps):
        order = order[::-1] if (antithetic and r % 2 == 1) else rng.permutation(K).tolist()
        for j in order:
            for batch in stream.probe(dict(zip(names, Q[:, j].tolist())), steps=sched.probe_steps):
                trainer.step(batch["tokens"])
                log["steps"] += 1
            after = _group_losses(trainer, val)
            sums[:, j] += before - after
            log["probes"].append({"source": names[j], "drop": (before - after).tolist()})
            before = after
    return sums / sched.sweeps, log


def validation_subset(t: TargetSet, per_group: int, seed: int) -> TargetSet:
    """At most ``per_group`` seeded sequences of each group: the set each loss drop is measured on."""
    g = torch.Generator().manual_seed(int(seed))
    keep = []
    for k in range(len(t.group_names)):
        idx = torch.nonzero(t.group == k).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_group]])
    return t.subset(torch.cat(keep).sort().values, f"{t.name}[val]")


def run(ctx: RunContext) -> MethodResult:
    """Aioli online over the budget (probe steps included); publishes every new p."""
    cfg, names, K = ctx.config.aioli, ctx.names, ctx.K
    tset = ctx.target
    val = validation_subset(tset, cfg.val_seqs_per_group, cfg.seed)
    row_w = val.group_weights()
    if tset.average == "tokens":  # keep the target's own group shares as row weights
        row_w = torch.tensor([tset.shares()[n] for n in tset.group_names], dtype=torch.float64)
    budget = ctx.budget
    total = budget.steps
    sched = aioli_schedule(total, K, len(val.group_names), initial_steps=cfg.initial_steps, rounds=cfg.rounds,
                           sweeps=cfg.sweeps, probe_steps=cfg.probe_steps, eta=cfg.eta, rho=cfg.rho)
    trainer = ProxyTrainer(ctx.config.train, budget.optimizer_steps, ctx.meter)
    stream = ctx.train_stream()
    if not callable(getattr(stream, "probe", None)):
        raise TypeError("Aioli's stream must offer probe(weights, steps) (a MixtureStream does)")
    p = torch.tensor([cfg.init_weights[n] for n in names] if cfg.init_weights else [1.0] * K, dtype=torch.float64)
    p = p / p.sum()
    ctx.writer.write_config(ctx.config.to_dict(), {"aioli": sched.to_dict(), "lr_warmup_steps": trainer.warmup})
    eff = ctx.publish(dict(zip(names, p.tolist())))
    ctx.writer.record({"round": -1, "step": 0, "tokens": 0, "weights": dict(zip(names, p.tolist())),
                       "target_loss": None, "effective_batch": eff})
    stream.set_weights(dict(zip(names, p.tolist())))
    it = iter(stream)
    for _ in range(sched.initial_steps):
        trainer.step(next(it)["tokens"])
    w_sum, w_steps = p * sched.initial_steps, sched.initial_steps
    A_prev, rng, probes = None, np.random.default_rng(cfg.seed), 0
    per_round = (total - sched.initial_steps) // sched.rounds
    bar = _bar(ctx, total, sched.initial_steps)
    for rnd in range(sched.rounds):
        steps_this = per_round if rnd < sched.rounds - 1 else total - sched.initial_steps - per_round * rnd
        obs, log = learn_params(trainer, stream, val, sched, rng, names, cfg.antithetic)
        probes += log["steps"]
        A = normalise_mixing_matrix(unsmooth(obs, sched.rho))
        if cfg.ema is not None and A_prev is not None:
            A = cfg.ema * A_prev + (1 - cfg.ema) * A
        A_prev = A
        p = update_weights(p, A, row_w, sched.eta)
        wd = dict(zip(names, p.tolist()))
        eff = ctx.publish(wd)
        stream.set_weights(wd)
        main_steps = steps_this - log["steps"]
        tl_sum = sum(float(trainer.step(next(it)["tokens"]).mean()) for _ in range(main_steps))
        w_sum, w_steps = w_sum + p * main_steps, w_steps + main_steps
        tl = evaluate(trainer.model, val, batch_size=ctx.config.train.eval_batch_size, meter=ctx.meter).loss
        ctx.writer.record({"round": rnd, "step": trainer.micro, "tokens": trainer.tokens, "weights": wd,
                           "target_loss": tl, "A": A.tolist(), "observed": obs.tolist(), "probe_steps": log["steps"],
                           "train_loss": tl_sum / max(1, main_steps), "effective_batch": eff})
        if bar is not None:
            bar.update(steps_this)
    if bar is not None:
        bar.close()
    avg = (w_sum / w_steps) if w_steps else p
    cand = {"average": dict(zip(names, avg.tolist())), "last": dict(zip(names, p.tolist()))}
    online = evaluate(trainer.model, tset, batch_size=ctx.config.train.eval_batch_size, meter=ctx.meter)
    details = {"schedule": sched.to_dict(), "probe_steps": probes, "online_target_loss": online.loss,
               "target": tset.describe()}
    return finish(ctx, "aioli", cand[cfg.final], exported=cfg.final, candidates=cand, details=details,
                  stopped_reason="max_tokens", optimizer_steps=trainer.steps, device=trainer.device_name,
                  dtype=trainer.dtype_name, model=trainer.model)


def _bar(ctx: RunContext, total: int, initial: int):
    if not ctx.config.output.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="aioli", unit="step", leave=False)


SPEC = MethodSpec("aioli", run, uses_target=True, online=True,
                  summary="online; estimates a mixing law with probe mixtures every round")

__all__ = ["SPEC", "learn_params", "normalise_mixing_matrix", "run", "smoothing_matrix", "unsmooth",
           "update_weights", "validation_subset"]
