"""Compute accounting for mixture method runs.

:class:`ComputeMeter` counts the tokens, FLOPs and wall time of one method run: ``6 N`` FLOPs per
trained token and ``2 N`` per evaluated token (validation and scoring passes included; N excludes the
input embedding, as in :func:`~fastmix_data.search.model.count_params`), and folds in the cost of
sub-runs such as cached proxies. Moved out of :mod:`fastmix_data.search.train_static`, which
re-exports it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping

import torch

# ============================================================================ compute accounting


class ComputeMeter:
    """Counts tokens, FLOPs and wall time of one method run.

    FLOPs: ``6 * N`` per trained token, ``2 * N`` per evaluated token (validation/target/scoring
    passes), N = parameters that take part in matmuls (all but the input embedding).
    """

    def __init__(self, n_params_flops: int = 0):
        self.N = int(n_params_flops)
        self.tokens = {"train": 0, "eval": 0}
        self.flops = {"train": 0.0, "eval": 0.0}
        self.t0 = time.perf_counter()
        self.parts: dict[str, dict] = {}

    def train(self, ntok: int, n_params: int | None = None) -> None:
        self.tokens["train"] += int(ntok)
        self.flops["train"] += 6.0 * (self.N if n_params is None else n_params) * ntok

    def eval(self, ntok: int, n_params: int | None = None) -> None:
        self.tokens["eval"] += int(ntok)
        self.flops["eval"] += 2.0 * (self.N if n_params is None else n_params) * ntok

    def add(self, name: str, compute: Mapping, *, cached: bool = False) -> None:
        """Fold in a sub-run's ``compute`` dict (e.g. a proxy). Cached sub-runs are recorded with
        their original cost but not added to this run's totals."""
        self.parts[name] = {**dict(compute), "cached": cached}
        if cached:
            return
        for k in ("train", "eval"):
            self.tokens[k] += int(compute.get("tokens", {}).get(k, 0))
            self.flops[k] += float(compute.get("flops", {}).get(k, 0.0))

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.t0

    def to_dict(self, method: str, **extra) -> dict:
        total = self.flops["train"] + self.flops["eval"]
        cached = sum(float(p.get("flops", {}).get("total", 0.0)) for p in self.parts.values() if p.get("cached"))
        return {
            "method": method,
            "n_params_flops": self.N,
            "tokens": dict(self.tokens),
            "flops": {**self.flops, "total": total, "cached": cached, "total_with_cached": total + cached},
            "flops_note": "6*N per trained token, 2*N per evaluated token (validation and scoring passes "
            "included); N excludes the input embedding; attention's L^2 term is not counted; 'cached' is "
            "the original cost of reused proxies, not spent by this run",
            "wall_s": self.wall_s,
            "parts": self.parts,
            "host": platform.node(),
            "torch": torch.__version__,
            **extra,
        }
