"""Compute accounting: one meter and one ``compute.json`` layout for every method.

:class:`ComputeMeter` counts what a run trains and evaluates, in tokens and FLOPs: ``6 N`` per
trained token, ``2 N`` per evaluated token (target, validation, scoring and reference forwards
included), and the FastMix hypergradient's own matmuls. N is the count of parameters that take
part in matmuls (all but the input embedding, :func:`~fastmix_data.search.model.count_params`);
attention's ``L^2`` term is not counted. Sub-runs (MixMin's proxies, DoReMi's reference, grid
points) are folded in with :meth:`ComputeMeter.add` and **always charged**: a proxy reused from the
cache costs what it cost to train, and ``flops.cached`` says how much of the total was reused
rather than spent by this process.

``compute.json`` has the same keys for every method (see docs/search.md, "Outputs")::

    {"format_version": 1, "method": "mixmin", "n_params_flops": 434944,
     "tokens": {"train": 65536, "eval": 18432, "scored": 0},
     "flops": {"train": 1.7e11, "eval": 1.6e10, "hypergrad": 0.0, "total": 1.9e11, "cached": 1.7e11},
     "parts": [{"name": "proxy:code", "cached": true, "tokens": {...}, "flops": {...}}, ...],
     "optimizer_steps": 0, "wall_s": 3.1, "cpu_s": 3.0, "device": "cpu", "dtype": "float32",
     "host": "...", "torch": "2.13.0+cpu", "details": {"eg_steps": 14}}
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping

import torch

COMPUTE_FORMAT_VERSION = 1
TOKEN_KEYS = ("train", "eval", "scored")
FLOP_KEYS = ("train", "eval", "hypergrad")
FLOPS_NOTE = ("6*N per trained token, 2*N per evaluated token (target, validation, scoring and reference "
              "forwards), hypergrad = the FastMix score matmuls (2*V*d per scored or target token; 4*N per "
              "backward token for hypergrad='full'); N excludes the input embedding; attention's L^2 term "
              "is not counted; total charges every part, cached ones included (flops.cached)")


class ComputeMeter:
    """Counts tokens, FLOPs and time of one run (see the module docstring).

    Args:
        n_params_flops: N of the run's main model (0 when it has none; set later or per call).
    """

    def __init__(self, n_params_flops: int = 0):
        self.N = int(n_params_flops)
        self.tokens = dict.fromkeys(TOKEN_KEYS, 0)
        self.flops = dict.fromkeys(FLOP_KEYS, 0.0)
        self.cached_flops = 0.0
        self.parts: list[dict] = []
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        self.wall_before = self.cpu_before = 0.0  # time of earlier sessions of a resumed run

    def train(self, ntok: int, n_params: int | None = None) -> None:
        """``ntok`` trained tokens (6N FLOPs each)."""
        self.tokens["train"] += int(ntok)
        self.flops["train"] += 6.0 * (self.N if n_params is None else n_params) * ntok

    def eval(self, ntok: int, n_params: int | None = None) -> None:
        """``ntok`` evaluated tokens (one forward pass, 2N FLOPs each)."""
        self.tokens["eval"] += int(ntok)
        self.flops["eval"] += 2.0 * (self.N if n_params is None else n_params) * ntok

    def hypergrad(self, flops: float, scored: int = 0) -> None:
        """FLOPs of the hypergradient's own matmuls; ``scored``: tokens scored against the target."""
        self.flops["hypergrad"] += float(flops)
        self.tokens["scored"] += int(scored)

    def add(self, name: str, compute: Mapping, *, cached: bool) -> None:
        """Charge a sub-run's ``compute`` dict (a proxy, a reference model, a grid point) to this
        run. A cached sub-run is charged too (its original cost) and counted in ``flops.cached``."""
        tok = {k: int(compute.get("tokens", {}).get(k, 0)) for k in TOKEN_KEYS}
        fl = {k: float(compute.get("flops", {}).get(k, 0.0)) for k in FLOP_KEYS}
        for k in TOKEN_KEYS:
            self.tokens[k] += tok[k]
        for k in FLOP_KEYS:
            self.flops[k] += fl[k]
        if cached:
            self.cached_flops += sum(fl.values())
        self.parts.append({"name": name, "cached": bool(cached), "tokens": tok, "flops": {**fl, "total": sum(fl.values())}})
        if self.N == 0:
            self.N = int(compute.get("n_params_flops", 0))

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self._t0

    @property
    def cpu_s(self) -> float:
        return self.cpu_before + time.process_time() - self._c0

    def to_dict(self, method: str, *, optimizer_steps: int = 0, device: str = "cpu", dtype: str = "float32",
                details: Mapping | None = None) -> dict:
        """The ``compute.json`` layout (same keys for every method)."""
        return {
            "format_version": COMPUTE_FORMAT_VERSION,
            "method": method,
            "n_params_flops": self.N,
            "tokens": dict(self.tokens),
            "flops": {**self.flops, "total": self.total_flops, "cached": self.cached_flops},
            "flops_note": FLOPS_NOTE,
            "parts": list(self.parts),
            "optimizer_steps": int(optimizer_steps),
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "device": device,
            "dtype": dtype,
            "host": platform.node(),
            "torch": torch.__version__,
            "details": dict(details or {}),
        }

    # resume support for online searches
    def state_dict(self) -> dict:
        return {"N": self.N, "tokens": dict(self.tokens), "flops": dict(self.flops), "cached": self.cached_flops,
                "parts": list(self.parts), "wall": self.wall_s, "cpu": self.cpu_s}

    def load_state_dict(self, d: Mapping) -> None:
        self.N, self.tokens, self.flops = int(d["N"]), dict(d["tokens"]), dict(d["flops"])
        self.cached_flops, self.parts = float(d["cached"]), list(d["parts"])
        self.wall_before, self.cpu_before = float(d["wall"]), float(d["cpu"])
        self._t0, self._c0 = time.perf_counter(), time.process_time()


__all__ = ["COMPUTE_FORMAT_VERSION", "FLOP_KEYS", "TOKEN_KEYS", "ComputeMeter"]
