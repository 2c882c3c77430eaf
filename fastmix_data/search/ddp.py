"""Data-parallel proxy training: the pieces a search needs to run under ``torchrun`` with DDP.

The design keeps one meaning for every number a search writes, whatever the number of ranks:

* **Training.** Each rank trains on its own rows of every global batch (a ``MixtureStream``
  splits the global batch by rank itself; :meth:`Ranks.rows` does it for a plain batch) and
  ``DistributedDataParallel`` averages the gradients. With equal rows per rank, the average of the
  ranks' mean losses is the global batch's mean loss, so every optimiser step is the step one
  process would take on the whole global batch.
* **Scores.** FastMix's per-source score sums, token counts and loss sums are sums over tokens:
  one all-reduce (:meth:`Ranks.sum_scores`, ``3K`` numbers) makes them the global sums.
* **Target gradient.** Each rank takes its rows of the target batch; :meth:`Ranks.mean_gradient`
  turns the ranks' ``(G_r, n_r)`` into ``sum_r n_r G_r / sum_r n_r``, the gradient of the whole
  target batch (one all-reduce of ``V x d`` numbers per outer step).
* **The mixture.** Every rank then runs the same z update on the same numbers, so alpha is
  identical on every rank without a broadcast (:meth:`Ranks.assert_same` checks it cheaply).
* **Outputs.** Rank 0 alone writes ``weights.json``, the trajectory and checkpoints; the model
  state is the unwrapped module's (:func:`unwrap`), so a checkpoint loads in one process too.

The results equal the single-process run's up to the order of floating-point sums (all-reduce adds
the ranks' partial sums in its own order): the tests allow 1e-5 relative on fp32 weights.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .hypergrad import SourceScores


@dataclass(frozen=True)
class Ranks:
    """This process's place among the data-parallel ranks (``rank`` of ``world``); the identity
    (rank 0 of 1) without ``torch.distributed``, where every method is a no-op."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """From the initialised default process group, else rank 0 of 1."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the outputs (rank 0)."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (the first ``n % world`` ranks get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def all_sum_(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over the ranks, in place (one all-reduce of their concatenation)."""
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat)
        i = 0
        for t in tensors:
            t.copy_(flat[i : i + t.numel()].view_as(t))
            i += t.numel()

    def sum_scores(self, sc: SourceScores) -> SourceScores:
        """The global per-source sums of every rank's :class:`SourceScores`."""
        if self.world == 1:
            return sc
        out = SourceScores(sc.sums.clone(), sc.counts.clone(), sc.loss_sums.clone())
        self.all_sum_(out.sums, out.counts, out.loss_sums)
        return out

    def mean_gradient(self, G: torch.Tensor | None, n: int, loss: float) -> tuple[torch.Tensor, int, float]:
        """``(G, n, loss)`` of the whole target batch from each rank's token-mean ``G`` and ``loss``
        over ``n`` tokens (``G`` may be None where ``n == 0``)."""
        if self.world == 1:
            return G, n, loss
        if G is None:
            raise ValueError("mean_gradient needs a zero G of the right shape on a rank without tokens")
        acc = G.to(torch.float64) * n
        stats = torch.tensor([float(n), loss * n], dtype=torch.float64, device=G.device)
        self.all_sum_(acc, stats)
        total = int(stats[0])
        return (acc / max(total, 1)).to(G.dtype), total, float(stats[1]) / max(total, 1)

    def assert_same(self, t: torch.Tensor, what: str) -> None:
        """Raise if ``t`` differs between ranks (they must take identical decisions)."""
        if self.world == 1:
            return
        lo, hi = t.detach().to(torch.float64).clone(), t.detach().to(torch.float64).clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"{what} differs between ranks (max spread {float((hi - lo).abs().max())}): "
                               "every rank must see the same config, target and stream")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def rank_rows(batch, ranks: Ranks):
    """This rank's rows of a *global* batch: every tensor whose first dimension is the batch size
    (``batch["tokens"]``'s) is sliced by :meth:`Ranks.rows`; anything else is passed on. For data
    that does not split itself by rank (a ``MixtureStream`` does)."""
    if ranks.world == 1:
        return batch
    rows = ranks.rows(len(batch["tokens"]))
    n = len(batch["tokens"])
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v for k, v in batch.items()}


def init_distributed(backend: str | None = None, init_method: str | None = None) -> Ranks:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...).

    A no-op returning rank 0 of 1 when ``WORLD_SIZE`` is unset or 1, or when the group exists
    already. ``backend`` defaults to NCCL when CUDA is available, else gloo; under CUDA each rank
    uses GPU ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return Ranks.current()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend or ("nccl" if cuda else "gloo"), init_method=init_method)
    return Ranks.current()


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when there is more than one rank, else ``model``."""
    if ranks.world == 1:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    # broadcast_buffers=False: the only buffers are rotary tables, the same on every rank by construction
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or ``torch.compile``) wrapper; the model itself otherwise."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def no_sync(model: nn.Module, sync: bool):
    """Context for one micro-step of gradient accumulation: DDP skips its all-reduce unless ``sync``
    (the last micro-step before an optimiser step); a plain module needs nothing."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


__all__ = ["Ranks", "init_distributed", "no_sync", "rank_rows", "unwrap", "wrap"]
