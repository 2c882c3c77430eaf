"""The FastMix mixture optimiser: logits z, alpha = softmax(z), Adam on z.

One :meth:`FastMix.step` turns per-source inner products ``c_k = <grad L_T, grad L_k>`` into a
hypergradient ``g = dL_T/dalpha`` and an Adam update of z:

* ``signal="literal"``: ``g_k = -eta * c_k`` with ``eta`` the proxy's current learning rate -- the
  paper's first-order formula. It inherits the reference's scale problem (defect 5): ``g ~ 0``
  while the proxy's lr warms up, so Adam's epsilon dominates, and the step size of z depends on
  the lr schedule.
* ``signal="normalized"`` (default): ``g_k = -c_k / rms(c)``, the RMS taken over the sources
  present in the search batch. It is the literal hypergradient times one positive scalar per step,
  so it keeps the exact *direction* of the first-order hypergradient (the ranking of the sources and
  the ratios between them) and only fixes its scale: it no longer depends on the proxy's lr, the
  loss scale or the vocabulary, Adam's epsilon never dominates, and it costs O(K). (The per-source
  cosine ``c_k / (|G_T| |grad L_k|)`` was rejected: it changes the direction -- boosting sources
  whose gradients are small because they are already learned -- and the per-source gradient norms
  need K separate V x d gradients, which breaks the K-independent one-pass cost.)

Then the chain rule through the floor and the softmax (present sources only, see
:func:`fastmix_data.search.hypergrad.softmax_chain_rule`), an optional KL-to-prior penalty, and a
masked Adam step (absent sources keep their z and their moments).

Against collapse onto one source (defect 6): a floor ``alpha = (1 - eps) softmax(z) + eps / K``
and/or a penalty ``kl_coef * KL(alpha || prior)``. Entropy and min(alpha) are reported every step.

Non-finite or all-zero signals skip the update and are counted. The trajectory average of alpha
(over the steps after warm-up) is kept alongside the last value; :meth:`final_weights` returns
either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hypergrad import softmax_chain_rule

SIGNALS = ("normalized", "literal")


@dataclass
class StepInfo:
    """What one :meth:`FastMix.step` did: ``updated``, ``reason`` when not (``"warmup"``,
    ``"nonfinite"``, ``"zero"``, ``"no_source"``), the signal ``g`` and ``grad_z`` (lists, NaN for absent)."""

    updated: bool
    reason: str | None
    g: list[float]
    grad_z: list[float]


class FastMix:
    """Mixture-logit state and its Adam optimiser.

    Args:
        num_sources: K.
        lr, betas, eps: Adam on z (reference: 0.01, (0.9, 0.95)).
        signal: ``"normalized"`` or ``"literal"`` (see module docstring).
        floor: eps of the floor ``alpha = (1 - floor) softmax(z) + floor / K``; 0 disables it.
        kl_coef: weight of ``KL(alpha || prior)`` added to the objective; 0 disables it.
        prior: prior mixture for the KL term (default uniform), K non-negative numbers.
        init: starting mixture (default uniform); z starts at ``log(init)``.
    """

    def __init__(
        self,
        num_sources: int,
        *,
        lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        signal: str = "normalized",
        floor: float = 0.0,
        kl_coef: float = 0.0,
        prior: list[float] | None = None,
        init: list[float] | None = None,
    ):
        if num_sources < 1:
            raise ValueError(f"num_sources must be >= 1, got {num_sources}")
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"floor must lie in [0, 1), got {floor}")
        K = num_sources
        self.K = K
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.signal, self.floor, self.kl_coef = signal, float(floor), float(kl_coef)
        self.prior = _simplex(prior, K, "prior") if prior is not None else torch.full((K,), 1.0 / K, dtype=torch.float64)
        start = _simplex(init, K, "init") if init is not None else torch.full((K,), 1.0 / K, dtype=torch.float64)
        if (start <= 0).any():
            raise ValueError("init weights must all be > 0 (z = log(init))")
        self.z = start.log()
        self.z -= self.z.mean()
        self.m = torch.zeros(K, dtype=torch.float64)
        self.v = torch.zeros(K, dtype=torch.float64)
        self.t = torch.zeros(K, dtype=torch.int64)  # per-coordinate Adam step counts
        self.steps = 0  # updates applied
        self.skipped_nonfinite = 0
        self.skipped_zero = 0
        self.alpha_sum = torch.zeros(K, dtype=torch.float64)
        self.alpha_count = 0

    # ------------------------------------------------------------------ weights
    def softmax(self) -> torch.Tensor:
        return torch.softmax(self.z, dim=0)

    def alpha(self) -> torch.Tensor:
        """Current mixture (float64 ``[K]``), floor included."""
        return (1.0 - self.floor) * self.softmax() + self.floor / self.K

    def average(self) -> torch.Tensor:
        """Trajectory average of alpha over the updates so far (the current alpha before any)."""
        if self.alpha_count == 0:
            return self.alpha()
        return self.alpha_sum / self.alpha_count

    def final_weights(self, mode: str = "average") -> torch.Tensor:
        if mode == "last":
            return self.alpha()
        if mode == "average":
            return self.average()
        raise ValueError(f"final weights mode must be 'last' or 'average', got {mode!r}")

    @staticmethod
    def entropy(alpha: torch.Tensor) -> float:
        a = alpha[alpha > 0]
        return float(-(a * a.log()).sum())

    # ------------------------------------------------------------------ update
    def hypergradient(self, scores: torch.Tensor, proxy_lr: float) -> torch.Tensor:
        """``g = dL_T/dalpha`` from inner products ``scores`` (NaN = absent; call after the
        finiteness checks of :meth:`step`)."""
        c = scores.to(torch.float64)
        if self.signal == "literal":
            return -float(proxy_lr) * c
        present = ~torch.isnan(c)
        rms = c[present].pow(2).mean().sqrt() if present.any() else torch.tensor(0.0, dtype=torch.float64)
        return -c / rms

    def step(
        self,
        scores: torch.Tensor,
        *,
        present: torch.Tensor | None = None,
        proxy_lr: float = 0.0,
        update: bool = True,
    ) -> StepInfo:
        """One outer step from per-source inner products ``scores`` ``[K]``.

        ``present`` (bool ``[K]``) marks the sources that had tokens in the search batch; by default
        every non-NaN score counts as present. A NaN or infinite score of a *present* source makes the
        whole step a counted skip. ``update=False`` (warm-up) computes and reports the signal
        without changing z.
        """
        scores = scores.detach().to("cpu", torch.float64)
        if scores.shape != (self.K,):
            raise ValueError(f"expected {self.K} scores, got shape {tuple(scores.shape)}")
        if present is None:
            present = ~torch.isnan(scores)
        present = present.detach().to("cpu", torch.bool)
        scores = torch.where(present, scores, torch.nan)
        if not present.any():
            return StepInfo(False, "no_source", _lst(scores), [math.nan] * self.K)
        if not torch.isfinite(scores[present]).all():
            self.skipped_nonfinite += 1
            return StepInfo(False, "nonfinite", _lst(scores), [math.nan] * self.K)
        if float(scores[present].abs().max()) == 0.0:
            self.skipped_zero += 1
            return StepInfo(False, "zero", _lst(scores), [math.nan] * self.K)
        g = self.hypergradient(scores, proxy_lr)
        if not torch.isfinite(g[present]).all():
            self.skipped_nonfinite += 1
            return StepInfo(False, "nonfinite", _lst(g), [math.nan] * self.K)
        s = self.softmax()
        alpha = self.alpha()
        gk = g.clone()
        if self.kl_coef:
            gk = gk + self.kl_coef * (alpha.log() - self.prior.clamp_min(1e-300).log())
        grad_z = (1.0 - self.floor) * softmax_chain_rule(s, torch.nan_to_num(gk), present)
        info = StepInfo(update, None if update else "warmup", _lst(g), _lst(torch.where(present, grad_z, torch.nan)))
        if not update:
            return info
        b1, b2 = self.betas
        p = present
        self.t[p] += 1
        self.m[p] = b1 * self.m[p] + (1 - b1) * grad_z[p]
        self.v[p] = b2 * self.v[p] + (1 - b2) * grad_z[p] ** 2
        t = self.t[p].to(torch.float64)
        mhat = self.m[p] / (1 - b1**t)
        vhat = self.v[p] / (1 - b2**t)
        self.z[p] -= self.lr * mhat / (vhat.sqrt() + self.eps)
        self.z -= self.z.mean()  # softmax-invariant; keeps z bounded
        self.steps += 1
        self.alpha_sum += self.alpha()
        self.alpha_count += 1
        return info

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-serialisable state (lists of floats)."""
        return {
            "version": 1,
            "K": self.K,
            "z": self.z.tolist(),
            "m": self.m.tolist(),
            "v": self.v.tolist(),
            "t": self.t.tolist(),
            "steps": self.steps,
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_zero": self.skipped_zero,
            "alpha_sum": self.alpha_sum.tolist(),
            "alpha_count": self.alpha_count,
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("K") != self.K:
            raise ValueError(f"FastMix state has K={d.get('K')} sources, this run has {self.K}")
        f64 = torch.float64
        self.z = torch.tensor(d["z"], dtype=f64)
        self.m = torch.tensor(d["m"], dtype=f64)
        self.v = torch.tensor(d["v"], dtype=f64)
        self.t = torch.tensor(d["t"], dtype=torch.int64)
        self.steps = int(d["steps"])
        self.skipped_nonfinite = int(d["skipped_nonfinite"])
        self.skipped_zero = int(d.get("skipped_zero", 0))
        self.alpha_sum = torch.tensor(d["alpha_sum"], dtype=f64)
        self.alpha_count = int(d["alpha_count"])


def _lst(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.tolist()]


def _simplex(w, K: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(list(w), dtype=torch.float64)
    if t.shape != (K,):
        raise ValueError(f"{what} must have {K} entries (one per source), got {t.numel()}")
    if not torch.isfinite(t).all() or (t < 0).any() or t.sum() <= 0:
        raise ValueError(f"{what} must be finite, non-negative and not all zero, got {t.tolist()}")
    return t / t.sum()


__all__ = ["SIGNALS", "FastMix", "StepInfo"]
