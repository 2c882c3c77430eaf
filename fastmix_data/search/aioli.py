"""Aioli (Chen et al., ICLR 2025): online mixing with a mixing law estimated while training.

Aioli reads mixing methods as greedy minimisers of a *dynamic mixing law*: over a round, the target
losses fall as ``L^{t+1} = L^t - A^t p^t`` (``A[i, j]``: how much training on source j lowers
target loss i), which is greedily minimised by the exponentiated-gradient step

    p_j <- p_j * exp(eta * sum_i w_i A_ij) / normaliser

(``w_i`` the weight of target group i in the target loss). Aioli *estimates* A online. Each round:

1. **LearnParams.** For R sweeps, for each source j in a seeded random order (every second sweep
   probes the previous sweep's order *reversed*, see below), train S *real* steps of the model on
   the smoothed one-hot probe mixture
   ``q_j = rho e_j + (1 - rho)/(K - 1) (1 - e_j)`` -- served by ``stream.probe(q_j, steps=S)``, so
   the main stream's position and history stay intact -- and record the drop of every target
   group's validation loss into column j. Probes run back to back, so the loss after one probe is
   the loss before the next (K R + 1 evaluations per round).
2. Average the columns over sweeps; the observed drops are ``A Q`` with ``Q[:, j] = q_j``, so the
   smoothing is undone exactly by the small linear solve ``A = A_obs Q^{-1}`` (Q is invertible
   whenever rho != 1/K: its eigenvalues are 1 and rho - (1-rho)/(K-1)).
3. Shift A to be non-negative, normalise it to sum 1, optionally smooth it across rounds (EMA).
4. Update p with the EG step above, push it to the sink, and train the rest of the round on p.

Every probe step and every validation pass is counted in the compute. The exported static mixture
is the average of p over the training steps that used it (``final="average"``) or the last p.

Probe order. Because probes run back to back, a probe early in a sweep sits on a steeper part of the
learning curve and sees a larger drop for reasons that have nothing to do with its source (in the
first round, when the loss falls by nats per step, this bias dominates everything). Random orders
average it out only over many sweeps; pairing each sweep with its reverse (antithetic orders)
cancels any linear trend along the sweep exactly, so ``sweeps`` should be even. ``initial_steps``
trains on the initial mixture before the first LearnParams, away from the steepest part.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .train_static import (
    MethodConfig,
    MethodResult,
    ProxyTrainer,
    TargetSet,
    as_target,
    evaluate,
    make_stream,
    push_weights,
    write_outputs,
)

__all__ = [
    "AioliConfig",
    "learn_params",
    "normalise_mixing_matrix",
    "run_aioli",
    "smoothing_matrix",
    "unsmooth",
]


@dataclass
class AioliConfig(MethodConfig):
    """Aioli settings (plus the common :class:`MethodConfig` fields; ``train.max_tokens`` is the
    length of the online run, probe steps included).

    Attributes:
        rounds: number of rounds the run is divided into.
        sweeps: R, LearnParams sweeps per round.
        probe_steps: S, training steps per probe mixture.
        eta: EG step of the mixture update.
        rho: probe smoothing (weight of the probed source), must differ from 1/K.
        ema: None, or the EMA factor of A across rounds (``A <- ema * A_prev + (1 - ema) * A``).
        val_seqs_per_group: validation sequences per target group in each loss measurement.
        final: exported weights: ``"average"`` (p averaged over the steps trained on it) or ``"last"``.
        init_weights: starting p (default uniform).
        seed: seed of the probe order.
        antithetic: every second sweep probes the previous sweep's order reversed.
        initial_steps: steps on ``init_weights`` before the first round (part of the budget).

    Reference settings (K = 2/3/7): R = 4/4/2, S = 4/6/10, eta = 0.2/0.1/1.0, rho = 0.625/0.5/0.75.
    """

    rounds: int = 4
    sweeps: int = 1
    probe_steps: int = 4
    eta: float = 0.5
    rho: float = 0.75
    ema: float | None = None
    val_seqs_per_group: int = 16
    final: str = "average"
    init_weights: dict | None = None
    seed: int = 0
    antithetic: bool = True
    initial_steps: int = 0

    def problems(self) -> list[str]:
        p = []
        if not isinstance(self.initial_steps, int) or self.initial_steps < 0:
            p.append(f"initial_steps must be a non-negative integer, got {self.initial_steps!r}")
        for name in ("rounds", "sweeps", "probe_steps", "val_seqs_per_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                p.append(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0):
            p.append(f"eta must be a finite number >= 0, got {self.eta!r}")
        if not 0 < self.rho <= 1:
            p.append(f"rho must lie in (0, 1], got {self.rho}")
        if self.ema is not None and not 0 <= self.ema < 1:
            p.append(f"ema must be None or in [0, 1), got {self.ema}")
        if self.final not in ("average", "last"):
            p.append(f"final must be 'average' or 'last', got {self.final!r}")
        return p


# ============================================================================ pure pieces


def smoothing_matrix(K: int, rho: float) -> torch.Tensor:
    """``Q`` (float64 ``[K, K]``) whose column j is the probe mixture
    ``q_j = rho e_j + (1 - rho)/(K - 1) (1 - e_j)``."""
    if K < 2:
        raise ValueError(f"Aioli needs at least 2 sources, got {K}")
    off = (1.0 - rho) / (K - 1)
    return torch.full((K, K), off, dtype=torch.float64) + (rho - off) * torch.eye(K, dtype=torch.float64)


def unsmooth(observed: torch.Tensor, rho: float) -> torch.Tensor:
    """Undo the probe smoothing: solve ``A Q = observed`` for A (``observed`` ``[m, K]``, column j
    measured under probe q_j). Exact when the drops are linear in the mixture.

    Raises:
        ValueError: ``rho == 1/K`` (every probe is the uniform mixture; Q is singular).
    """
    obs = observed.to(torch.float64)
    K = obs.shape[1]
    if abs(rho - 1.0 / K) < 1e-9:
        raise ValueError(f"rho={rho} equals 1/K: all probes are the same mixture and A cannot be recovered")
    Q = smoothing_matrix(K, rho)
    # A Q = O  <=>  Q^T A^T = O^T
    return torch.linalg.solve(Q.T, obs.T).T


def normalise_mixing_matrix(A: torch.Tensor) -> torch.Tensor:
    """Shift to non-negative (subtract the minimum entry) and scale to sum 1 (uniform if all equal)."""
    A = A.to(torch.float64) - A.min()
    s = A.sum()
    return A / s if s > 0 else torch.full_like(A, 1.0 / A.numel())


def update_weights(p: torch.Tensor, A: torch.Tensor, row_weights: torch.Tensor, eta: float) -> torch.Tensor:
    """``p_j <- p_j exp(eta * sum_i w_i A_ij)``, normalised (in log space)."""
    score = (row_weights.to(torch.float64)[:, None] * A).sum(0)
    return torch.softmax(torch.log(p.to(torch.float64).clamp_min(1e-300)) + eta * score, dim=0)


# ============================================================================ LearnParams


def _group_losses(trainer: ProxyTrainer, val: TargetSet) -> torch.Tensor:
    r = evaluate(trainer.model, val, batch_size=trainer.cfg.eval_batch_size, meter=trainer.meter)
    return torch.tensor([r.group_losses.get(n, math.nan) for n in val.group_names], dtype=torch.float64)


def learn_params(trainer: ProxyTrainer, stream, val: TargetSet, cfg: AioliConfig, rng: np.random.Generator,
                 names: list[str]) -> tuple[torch.Tensor, dict]:
    """One round's LearnParams: R sweeps of K probes of S real training steps each (served by
    ``stream.probe``), returning the sweep-averaged observed loss drops ``[m, K]`` (before undoing
    the smoothing) and a log of the probes."""
    K = len(names)
    Q = smoothing_matrix(K, cfg.rho)
    sums = torch.zeros(len(val.group_names), K, dtype=torch.float64)
    before = _group_losses(trainer, val)
    log = {"probes": [], "steps": 0}
    order: list[int] = []
    for r in range(cfg.sweeps):
        order = order[::-1] if (cfg.antithetic and r % 2 == 1) else rng.permutation(K).tolist()
        for j in order:
            q = dict(zip(names, Q[:, j].tolist()))
            for batch in stream.probe(q, steps=cfg.probe_steps):
                trainer.step(batch["tokens"])
                log["steps"] += 1
            after = _group_losses(trainer, val)
            sums[:, j] += before - after
            log["probes"].append({"source": names[j], "drop": (before - after).tolist()})
            before = after
    return sums / cfg.sweeps, log


# ============================================================================ the method


def run_aioli(train_sources: Mapping[str, Any], target: Any, config: AioliConfig | None = None,
              out_dir=None, sink=None, *, stream=None) -> MethodResult:
    """Aioli online: trains a proxy for ``train.max_tokens`` (probe steps included) on a stream whose
    weights it updates every round, and pushes every new p to ``sink``.

    Args:
        stream: the main stream to train on (default: a packing ``MixtureStream`` over
            ``train_sources`` from ``train.data_seed``); it must offer ``probe`` and ``set_weights``.
    """
    cfg = config or AioliConfig()
    cfg.validate()
    names = list(train_sources)
    K = len(names)
    tcfg = cfg.train
    tset = as_target(target, tcfg.seq_len, max_seqs=cfg.target_max_seqs)
    val = _validation_subset(tset, cfg.val_seqs_per_group, cfg.seed)
    row_w = val.group_weights()
    if tset.average == "tokens":  # keep the target's own group shares as row weights
        row_w = torch.tensor([tset.shares()[n] for n in tset.group_names], dtype=torch.float64)
    total = tcfg.total_steps
    if cfg.initial_steps >= total:
        raise ValueError(f"Aioli: initial_steps={cfg.initial_steps} leaves no step of the {total}-step budget for rounds")
    per_round = (total - cfg.initial_steps) // cfg.rounds
    probe_per_round = K * cfg.sweeps * cfg.probe_steps
    if per_round < probe_per_round:
        raise ValueError(
            f"Aioli: a round has {per_round} steps ({total - cfg.initial_steps} steps / {cfg.rounds} rounds) but LearnParams needs "
            f"K*sweeps*probe_steps = {probe_per_round}: raise train.max_tokens or lower rounds/sweeps/probe_steps"
        )
    trainer = ProxyTrainer(tcfg)
    meter = trainer.meter
    if stream is None:
        stream = make_stream(train_sources, None, tcfg)
    p = torch.tensor([cfg.init_weights[n] for n in names] if cfg.init_weights else [1.0] * K, dtype=torch.float64)
    p = p / p.sum()
    A_prev = None
    rng = np.random.default_rng(cfg.seed)
    w_sum = torch.zeros(K, dtype=torch.float64)
    w_steps = 0
    traj: list[dict] = [{"round": -1, "step": 0, "tokens": 0, "weights": dict(zip(names, p.tolist())),
                         "target_loss": None}]
    eff = push_weights(sink, dict(zip(names, p.tolist())))
    stream.set_weights(dict(zip(names, p.tolist())))
    it = iter(stream)
    for _ in range(cfg.initial_steps):
        trainer.step(next(it)["tokens"])
    w_sum += p * cfg.initial_steps
    w_steps += cfg.initial_steps
    probe_steps_total = 0
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="aioli", unit="step", leave=False, initial=cfg.initial_steps)
    for rnd in range(cfg.rounds):
        steps_this = per_round if rnd < cfg.rounds - 1 else total - cfg.initial_steps - per_round * (cfg.rounds - 1)
        obs, log = learn_params(trainer, stream, val, cfg, rng, names)
        probe_steps_total += log["steps"]
        A = normalise_mixing_matrix(unsmooth(obs, cfg.rho))
        if cfg.ema is not None and A_prev is not None:
            A = cfg.ema * A_prev + (1 - cfg.ema) * A
        A_prev = A
        p = update_weights(p, A, row_w, cfg.eta)
        wd = dict(zip(names, p.tolist()))
        eff = push_weights(sink, wd)
        stream.set_weights(wd)
        main_steps = steps_this - log["steps"]
        tl_sum = 0.0
        for _ in range(main_steps):
            tl_sum += float(trainer.step(next(it)["tokens"]).mean())
        w_sum += p * main_steps
        w_steps += main_steps
        tl = evaluate(trainer.model, val, batch_size=tcfg.eval_batch_size, meter=meter).loss
        traj.append({"round": rnd, "step": trainer.steps, "tokens": trainer.tokens, "weights": wd,
                     "target_loss": tl, "A": A.tolist(), "observed": obs.tolist(), "probe_steps": log["steps"],
                     "train_loss": tl_sum / max(1, main_steps), "effective_batch": eff})
        if bar is not None:
            bar.update(steps_this)
    if bar is not None:
        bar.close()
    avg = (w_sum / w_steps) if w_steps else p
    chosen = avg if cfg.final == "average" else p
    weights = dict(zip(names, chosen.tolist()))
    if cfg.final == "average":
        push_weights(sink, weights)
    final_eval = evaluate(trainer.model, tset, batch_size=tcfg.eval_batch_size, meter=meter)
    compute = meter.to_dict("aioli", num_sources=K, steps=trainer.steps, probe_steps=probe_steps_total,
                            rounds=cfg.rounds, n_params=trainer.n_params["total"])
    extra = {"mode": cfg.final, "last": dict(zip(names, p.tolist())), "average": dict(zip(names, avg.tolist())),
             "probe_steps": probe_steps_total, "online_target_loss": final_eval.loss, "target": tset.describe()}
    write_outputs(out_dir, "aioli", names, weights, traj, compute, extra=extra, plot=cfg.plot)
    return MethodResult("aioli", weights, names, traj, compute, extra, None if out_dir is None else Path(out_dir),
                        trainer.model)


def _validation_subset(t: TargetSet, per_group: int, seed: int) -> TargetSet:
    g = torch.Generator().manual_seed(int(seed))
    keep = []
    for k in range(len(t.group_names)):
        idx = torch.nonzero(t.group == k).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:per_group]])
    return t.subset(torch.cat(keep).sort().values, f"{t.name}[val]")
