"""Schedules derived from the budget: pure functions from (token budget, batch shape, K, config) to
the number of warm-up steps, the outer-step interval, step sizes, rounds, sweeps and probe lengths.

Design problem: a fixed schedule is right at one budget only. The reference FastMix settings (an
outer step every 20 micro-batches after 100, Adam lr 0.01 on z) make ~35 mixture updates of 0.01
in a 20M-token CPU search -- the mixture barely leaves uniform -- and ~15,000 at 10B tokens. Aioli's
reference rounds and probe lengths likewise assume one run length.

Solution: every config field that depends on the budget defaults to None and is resolved here, the
same way whether the config came from Python, YAML or the command line:

* **FastMix** makes about :data:`FASTMIX_UPDATES` mixture updates after a warm-up of
  :data:`FASTMIX_WARMUP_FRACTION` of the micro-batches, and takes Adam steps of
  ``z_lr = FASTMIX_TRAVEL / updates`` on the logits, so that the mixture can travel about
  ``FASTMIX_TRAVEL`` logit units over the run (e.g. from 1/3 to 0.9 or 0.02) at any budget. The
  window of each outer step grows with the budget, so each update averages the hypergradient over
  more tokens instead of making ever smaller steps, and each outer step forwards about as many
  target sequences as the window trained on (:data:`FASTMIX_TARGET_RATIO`; at most one pass over
  the target), so that the target gradient is no noisier than the window's.
* **Aioli** trains :data:`AIOLI_INITIAL_FRACTION` of the steps on the initial mixture (away from
  the steepest part of the learning curve, whose trend biases the first probes), then spends
  :data:`AIOLI_PROBE_FRACTION` of the rest on probes, in rounds of 2 antithetic sweeps (an even
  number, which cancels a linear trend along the sweep): about :data:`AIOLI_ROUNDS` rounds while
  probes are at most :data:`AIOLI_MAX_PROBE_STEPS` steps, more rounds beyond. The EG step ``eta``
  is scaled so that the mixture can travel about :data:`AIOLI_TRAVEL` in log space over all
  rounds (the normalised mixing matrix's entries shrink as 1/(K * groups)).
* **DoReMi** splits the budget between reference and proxy; **MixMin** between its K proxies.
* The proxy's learning-rate warm-up is 2 % of the optimiser steps (at most 2,000).

Everything here is a pure function (tested at 100k and 10B tokens in tests/test_search_schedule.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

#: mixture updates FastMix aims for over a run
FASTMIX_UPDATES = 100
#: z_lr * updates: how far (in logit units) Adam may move the mixture logits over the run
FASTMIX_TRAVEL = 4.0
#: share of the micro-batches before the mixture first moves
FASTMIX_WARMUP_FRACTION = 0.05
#: the z step decays along a cosine to this share of its peak by the last update: Adam's per-coordinate
#: normalisation keeps its steps full-size however small the mean signal near the fixed point is, so
#: a constant step ends in an oscillation of its own size around it
FASTMIX_Z_MIN_LR_RATIO = 0.05
#: largest default Adam step on z (tiny budgets with few updates)
FASTMIX_MAX_Z_LR = 0.5
#: target sequences forwarded per outer step, per sequence trained in the window (the target
#: gradient's noise enters every source's score; a forward costs a third of a training step)
FASTMIX_TARGET_RATIO = 1.0

AIOLI_INITIAL_FRACTION = 0.1
AIOLI_PROBE_FRACTION = 0.25
AIOLI_SWEEPS = 2
#: rounds aimed for while probes are short (longer budgets lengthen the probes up to the maximum,
#: then add rounds)
AIOLI_ROUNDS = 4
AIOLI_MIN_PROBE_STEPS = 2
AIOLI_MAX_PROBE_STEPS = 64
AIOLI_TRAVEL = 2.0

LR_WARMUP_FRACTION = 0.02
LR_WARMUP_MAX = 2000


@dataclass(frozen=True)
class Budget:
    """A token budget in micro-batches.

    Attributes:
        tokens: the training tokens allowed.
        tokens_per_step: trained tokens per micro-batch (``batch_size * seq_len``).
        grad_accum: micro-batches per optimiser step.
    """

    tokens: int
    tokens_per_step: int
    grad_accum: int = 1

    @property
    def steps(self) -> int:
        """Micro-batches: ``ceil(tokens / tokens_per_step)`` rounded up to whole optimiser steps (>= 1)."""
        n = max(1, math.ceil(self.tokens / self.tokens_per_step))
        return math.ceil(n / self.grad_accum) * self.grad_accum

    @property
    def optimizer_steps(self) -> int:
        return self.steps // self.grad_accum


def lr_warmup_steps(optimizer_steps: int, given: int | None = None) -> int:
    """Optimiser steps of linear learning-rate warm-up: ``given``, else 2 % of the steps (1 to 2,000)."""
    if given is not None:
        return given
    return int(min(LR_WARMUP_MAX, max(1, round(LR_WARMUP_FRACTION * optimizer_steps))))


@dataclass(frozen=True)
class FastMixSchedule:
    """Resolved FastMix schedule (micro-batches): ``warmup_steps`` before the first update, an
    update every ``outer_every``, ``updates`` in all, Adam step ``z_lr``, and
    ``target_batches_per_step`` target batches forwarded at each outer step."""

    warmup_steps: int
    outer_every: int
    z_lr: float
    updates: int
    target_batches_per_step: int = 1
    z_lr_schedule: str = "constant"
    z_min_lr_ratio: float = 1.0

    def z_lr_at(self, update: int) -> float:
        """The Adam step on z for update number ``update`` (0-based): ``z_lr`` decayed along a cosine
        to ``z_min_lr_ratio * z_lr`` at the last planned update (``"cosine"``), or constant."""
        if self.z_lr_schedule != "cosine" or self.updates <= 1:
            return self.z_lr
        prog = min(1.0, update / (self.updates - 1))
        lo = self.z_lr * self.z_min_lr_ratio
        return lo + (self.z_lr - lo) * 0.5 * (1 + math.cos(math.pi * prog))

    def to_dict(self) -> dict:
        return asdict(self)


def fastmix_schedule(steps: int, *, warmup_steps: int | None = None, outer_every: int | None = None,
                     z_lr: float | None = None, target_batches_per_step: int | None = None, batch_size: int = 1,
                     target_batch_size: int = 1, target_seqs: int | None = None, z_lr_schedule: str = "cosine",
                     z_min_lr_ratio: float = FASTMIX_Z_MIN_LR_RATIO) -> FastMixSchedule:
    """FastMix's schedule for a run of ``steps`` micro-batches of ``batch_size`` sequences; given
    values are kept. The target batches per outer step (of ``target_batch_size``) cover about
    :data:`FASTMIX_TARGET_RATIO` times the window's sequences, at most one pass over the
    ``target_seqs`` of the target, at least one batch."""
    if warmup_steps is None:
        warmup_steps = int(round(FASTMIX_WARMUP_FRACTION * steps))
    avail = max(0, steps - warmup_steps)
    if outer_every is None:
        outer_every = max(1, round(avail / FASTMIX_UPDATES))
    # an outer step follows every outer_every-th micro-batch; it moves z from micro-batch warmup_steps on
    updates = max(0, steps // outer_every - (max(warmup_steps, 1) - 1) // outer_every)
    mean_factor = (1 + z_min_lr_ratio) / 2 if z_lr_schedule == "cosine" else 1.0  # mean step / peak step
    if z_lr is None:
        z_lr = min(FASTMIX_MAX_Z_LR, FASTMIX_TRAVEL / (max(1, updates) * mean_factor))
    if target_batches_per_step is None:
        want = FASTMIX_TARGET_RATIO * outer_every * batch_size
        if target_seqs is not None:
            want = min(want, target_seqs)
        target_batches_per_step = max(1, round(want / max(1, target_batch_size)))
    return FastMixSchedule(int(warmup_steps), int(outer_every), float(z_lr), int(updates), int(target_batches_per_step),
                           z_lr_schedule, float(z_min_lr_ratio))


@dataclass(frozen=True)
class AioliSchedule:
    """Resolved Aioli schedule (optimiser steps): ``initial_steps`` on the initial mixture, then
    ``rounds`` rounds of ``sweeps`` x K probes of ``probe_steps`` each, EG step ``eta``, probe
    smoothing ``rho``."""

    initial_steps: int
    rounds: int
    sweeps: int
    probe_steps: int
    eta: float
    rho: float

    def to_dict(self) -> dict:
        return asdict(self)

    def probe_steps_per_round(self, K: int) -> int:
        return K * self.sweeps * self.probe_steps


def aioli_schedule(steps: int, K: int, groups: int, *, initial_steps: int | None = None, rounds: int | None = None,
                   sweeps: int | None = None, probe_steps: int | None = None, eta: float | None = None,
                   rho: float | None = None) -> AioliSchedule:
    """Aioli's schedule for ``steps`` training steps, K sources and a target of ``groups`` groups.

    Raises:
        ValueError: the budget cannot hold one round of probes (it names the numbers).
    """
    if sweeps is None:
        sweeps = AIOLI_SWEEPS
    if initial_steps is None:
        initial_steps = int(round(AIOLI_INITIAL_FRACTION * steps))
    avail = steps - initial_steps
    probe_budget = AIOLI_PROBE_FRACTION * max(0, avail)
    per_round = K * sweeps  # probes per round
    if probe_steps is None:
        r = rounds or AIOLI_ROUNDS
        probe_steps = int(min(AIOLI_MAX_PROBE_STEPS, max(AIOLI_MIN_PROBE_STEPS, round(probe_budget / (r * per_round)))))
        probe_steps = max(1, min(probe_steps, int(probe_budget // per_round)))
    if rounds is None:
        rounds = int(max(1, probe_budget // (per_round * probe_steps)))
    if rho is None:
        rho = 0.75 if K == 2 else 0.5
    if eta is None:
        eta = AIOLI_TRAVEL * K * max(1, groups) / rounds
    if avail < rounds * per_round * probe_steps:
        raise ValueError(
            f"Aioli: {avail} steps after {initial_steps} initial steps cannot hold {rounds} round(s) of "
            f"K*sweeps*probe_steps = {K}*{sweeps}*{probe_steps} probe steps: raise max_tokens or lower "
            "aioli.rounds/sweeps/probe_steps"
        )
    return AioliSchedule(int(initial_steps), int(rounds), int(sweeps), int(probe_steps), float(eta), float(rho))


def doremi_split(tokens: int, reference_fraction: float) -> tuple[int, int]:
    """``(reference tokens, proxy tokens)``: the budget split between DoReMi's two models."""
    ref = max(1, int(round(reference_fraction * tokens)))
    return ref, max(1, tokens - ref)


def doremi_log_every(proxy_steps: int, given: int | None = None) -> int:
    """Steps between DoReMi's trajectory records: ``given``, else about 100 records per run."""
    return given if given is not None else max(1, proxy_steps // 100)


def mixmin_proxy_tokens(tokens: int, K: int, given: int | None = None) -> int:
    """Training tokens of each of MixMin's K proxies: ``given``, else the budget split evenly."""
    return given if given is not None else max(1, tokens // K)


def checkpoint_every(steps: int, grad_accum: int = 1, given: int | None = None) -> int:
    """Micro-batches between checkpoints: ``given``, else about a tenth of the run (whole optimiser steps)."""
    n = given if given is not None else max(1, steps // 10)
    return math.ceil(n / grad_accum) * grad_accum


__all__ = [
    "AioliSchedule",
    "Budget",
    "FastMixSchedule",
    "aioli_schedule",
    "checkpoint_every",
    "doremi_log_every",
    "doremi_split",
    "fastmix_schedule",
    "lr_warmup_steps",
    "mixmin_proxy_tokens",
]
