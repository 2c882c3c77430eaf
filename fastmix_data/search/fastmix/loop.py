"""The FastMix search loop: a proxy trained on a stratified stream, the mixture updated on the way.

Design problem: the search interleaves five things -- training the proxy, scoring what it trained
on against the target's gradient, updating the mixture, checkpointing, and stopping on the budget
-- which share a lot of state (the proxy and its optimiser, the mixture logits and their Adam
moments, the score window, the target rotation, counters). Written as one function with closures
around a shared dict, nobody could find where one phase ends and the next begins.

Solution: :class:`FastMixLoop`, whose methods are the phases, called by :meth:`FastMixLoop.run`:

* :meth:`~FastMixLoop.inner_step` -- one micro-batch of proxy training on the alpha-weighted loss
  (a source-k sequence's loss times ``alpha_k / serve_k``: training on a uniform stream with these
  weights has the expected loss and gradient of training on an alpha-sampled stream) and, in the
  same pass (:class:`~fastmix_data.search.proxy_step.ProxyStep`: the fused head loss), the
  micro-batch's per-source inner products with the target's LM-head gradient, summed over the
  outer step's window (no extra forward, no backward through the trunk, no ``.grad`` touched);
* :meth:`~FastMixLoop.score` -- keeps the micro-batch for the buffered search batch
  (``search_batch="buffer"``);
* :meth:`~FastMixLoop.outer_step` -- every ``outer_every`` micro-batches: hypergradient -> Adam
  step on the mixture logits (after the warm-up) -> :meth:`RunContext.publish` -> trajectory
  record -> ``weights.json`` -> a fresh target gradient for the next window;
* :meth:`~FastMixLoop.checkpoint` / :meth:`~FastMixLoop.restore` -- everything needed to continue
  bitwise, every ``checkpoint_every`` micro-batches and at the end;
* :meth:`~FastMixLoop.budget_reached` -- stop at ``max_tokens``.

Under ``torchrun`` every rank runs this loop on its rows of each global batch (DDP averages the
gradients); scores, telemetry and head gradients are summed over the ranks before they are used,
so every rank takes the same mixture update and the outputs (written by rank 0) mean what one
process's would with ``train.batch_size`` times the number of ranks (:mod:`..ddp`).

The schedule (warm-up, outer-step interval, z step size) comes from the budget
(:func:`fastmix_data.search.schedule.fastmix_schedule`). The exported mixture is chosen by
``fastmix.final``: the average over all updates (default: no other export was better beyond the
noise on a development set apart from the quality benchmark, ``benchmarks/quality/export_rule.md``),
over the last ``tail_fraction`` of them, or the last one.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fastmix_data.io import atomic_path

from ..context import MethodResult, RunContext, finish
from ..hypergrad import GradientEMA, SourceScores, full_source_scores, full_target_gradient
from ..outputs import CHECKPOINT_FILE
from ..proxy.trainer import ProxyTrainer
from ..schedule import FastMixSchedule, checkpoint_every, fastmix_schedule
from ..targets import TargetBatches, TargetSet
from ..vocab import check_ids
from .optimizer import FastMix

CHECKPOINT_VERSION = 2
#: the phases whose wall time is reported in ``details.wall_breakdown_s``
PHASES = ("data", "train", "score", "outer", "io")
#: config fields that may change between a checkpoint and its resumption
RESUMABLE = ("max_tokens", "output", "train.device", "train.compile")


def loss_weights(alpha: torch.Tensor, serve: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-source loss weights ``alpha / serve`` (``K * alpha`` for a uniform stream): training on a
    stream that serves source k with probability ``serve_k``, each sequence's loss times this
    weight, has the expected loss and gradient of training on an alpha-sampled stream."""
    return (alpha.to(torch.float64) / serve.to(torch.float64)).to(dtype)


@dataclass
class _Micro:
    """What one inner step leaves for the buffered search batch."""

    tokens: torch.Tensor
    source: torch.Tensor


@dataclass
class LoopState:
    """Counters and records of a search (all in the checkpoint)."""

    step: int = 0  # micro-batches trained
    outer: int = 0  # outer steps taken
    target_loss: float | None = None  # at the last target pass
    effective_batch: int | None = None  # reported by the sink at the last publish
    history: list[list[float]] = field(default_factory=list)  # alpha after each update
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # wall seconds per phase
    held_out_batches: int = 0  # stream batches used for the training gradient only (never trained on)


class FastMixLoop:
    """One FastMix search (see the module docstring).

    Args:
        ctx: the run context (config, names, writer, meter, sink, optional model/loss_fn/resume).
        data: the search stream: batches ``{"tokens": [B, L+1], "source": [B]}`` serving every source
            (uniformly, or in ``fastmix.serve_weights``).
        target: the target (None only with ``hypergrad="none"``).
        init_weights: starting mixture (overrides ``fastmix.init_weights``; e.g. MixMin's estimate).
        method: the name the results are written under.
        extra_details: added to ``details`` in ``weights.json`` (e.g. the MixMin fit it started from).
    """

    def __init__(self, ctx: RunContext, data: Iterable, target: TargetSet | None, *,
                 init_weights: Mapping[str, float] | None = None, method: str = "fastmix",
                 extra_details: Mapping | None = None):
        self.ctx, self.cfg, self.fc, self.method = ctx, ctx.config, ctx.config.fastmix, method
        self.extra_details = dict(extra_details or {})
        self.names, self.K = ctx.names, ctx.K
        if target is None and self.fc.hypergrad != "none":
            raise ValueError("FastMix needs a target unless fastmix.hypergrad='none'")
        self.budget = ctx.budget
        self.world = ctx.ranks.world
        global_batch = self.cfg.train.batch_size * self.world  # sequences per micro-batch, all ranks
        tbs = self.cfg.target.batch_size or global_batch
        self.sched: FastMixSchedule = fastmix_schedule(
            self.budget.steps, warmup_steps=self.fc.warmup_steps, outer_every=self.fc.outer_every, z_lr=self.fc.z_lr,
            target_batches_per_step=self.fc.target_batches_per_step, batch_size=global_batch,
            target_batch_size=tbs, target_seqs=len(target) if target is not None else None,
            z_lr_schedule=self.fc.z_lr_schedule, z_min_lr_ratio=self.fc.z_min_lr_ratio)
        self.trainer = ProxyTrainer(self.cfg.train, self.budget.optimizer_steps, ctx.meter, model=ctx.model,
                                    loss_fn=ctx.loss_fn, num_sources=self.K,
                                    chunk_tokens=self.fc.chunk_tokens, ranks=ctx.ranks)
        self.proxy = self.trainer.proxy
        self.ranks = ctx.ranks
        self.device = self.trainer.device
        init = init_weights if init_weights is not None else self.fc.init_weights
        self.z = FastMix(self.K, lr=self.sched.z_lr, betas=tuple(self.fc.z_betas), eps=self.fc.z_eps,
                         signal=self.fc.signal, floor=self.fc.floor, kl_coef=self.fc.kl_coef,
                         prior=self._vector(self.fc.prior, "fastmix.prior"), init=self._vector(init, "init_weights"))
        serve = self._vector(self.fc.serve_weights, "fastmix.serve_weights")
        if serve is not None and min(serve) <= 0:
            raise ValueError(f"fastmix.serve_weights must be > 0 for every source (the stream serves each), got {serve}")
        self.serve = torch.tensor(serve or [1.0 / self.K] * self.K, dtype=torch.float64)
        self.loss_w = loss_weights(self.z.alpha(), self.serve).to(self.device)
        self.window = SourceScores.zeros(self.K, dtype=torch.float64, device=self.device)
        self.tele = SourceScores.zeros(self.K, dtype=torch.float64, device=self.device)
        self.ema = GradientEMA(self.fc.target_ema)
        self.residual = self.fc.residual and self.fc.residual_weight > 0 and self.fc.hypergrad == "head"
        self.reference: torch.Tensor | list | None = None  # what the window's tokens are scored against
        self.buffers: list[deque] = [deque(maxlen=self.fc.search_seqs_per_source) for _ in range(self.K)]
        self.targets = TargetBatches(target, tbs, self.cfg.target.seed) if target is not None else None
        self.tbs = tbs
        self._it = None  # the stream's iterator (held-out batches are drawn from it at outer steps)
        self.state = LoopState()
        self.data = data
        self.ckpt_every = checkpoint_every(self.budget.steps, self.cfg.train.grad_accum, self.cfg.output.checkpoint_every)
        self.ckpt_path = ctx.writer.path(CHECKPOINT_FILE)
        self._V = self.trainer.vocab_size
        self._d = self.trainer.model.head.in_features

    def _vector(self, d: Mapping | None, what: str) -> list[float] | None:
        if d is None:
            return None
        missing, extra = [n for n in self.names if n not in d], [k for k in d if k not in self.names]
        if missing or extra:
            raise ValueError(f"{what} must give one weight per source {self.names}"
                             + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        vals = [float(d[n]) for n in self.names]
        if any(not math.isfinite(v) or v < 0 for v in vals) or sum(vals) <= 0:
            raise ValueError(f"{what} must be finite, non-negative and not all zero, got {vals}")
        return [v / sum(vals) for v in vals]

    # ================================================================== phases
    def inner_step(self, batch: Mapping) -> _Micro:
        """Train the proxy on one micro-batch with the alpha-weighted loss; in window mode add its
        per-source scores against the current reference gradient, from the same pass, to the window."""
        tokens, source = self._unpack(batch)
        G = self._window_reference()
        m = self.trainer.train_step(tokens, source, loss_w=self.loss_w, G=G)
        self.tele = self.tele + m.losses
        self.state.step += 1
        if m.scores is not None:
            self.window = self.window + m.scores
            n = m.token_losses.numel() * self.world
            self.ctx.meter.hypergrad(2.0 * self._V * self._d * n, scored=n)
        return _Micro(tokens, source)

    def _window_reference(self) -> torch.Tensor | None:
        """The gradient the next micro-batch is scored against in window mode, or None (not scored:
        no hypergradient, buffer mode, no reference yet, or outside ``score_last``)."""
        if self.fc.hypergrad != "head" or self.fc.search_batch != "window" or self.reference is None:
            return None
        E = self.sched.outer_every
        pos = self.state.step % E + 1  # the next micro-batch's place in its window, 1..outer_every
        if self.fc.score_last is not None and pos <= E - self.fc.score_last:
            return None
        return self.reference

    def score(self, m: _Micro) -> None:
        """Keep the micro-batch's sequences for the buffered search batch (window mode scored them
        in :meth:`inner_step` already)."""
        if self.fc.hypergrad == "none" or self.fc.search_batch != "buffer":
            return
        for i, k in enumerate(m.source.tolist()):
            self.buffers[k].append(m.tokens[i].detach())

    def outer_step(self) -> None:
        """Hypergradient -> mixture update (after the warm-up) -> publish -> record -> weights.json."""
        info = None
        if self.fc.hypergrad != "none":
            if self.fc.search_batch == "buffer":
                self.state.target_loss = self.target_pass()
                scores = self.ranks.sum_scores(self.buffer_scores())
            else:
                scores = self.ranks.sum_scores(self.window)
            update = self.state.step >= self.sched.warmup_steps
            self.z.lr = self.sched.z_lr_at(self.z.steps)
            info = self.z.step(scores.means(), present=scores.present, proxy_lr=self.trainer.lr(), update=update)
            if info.updated:
                alpha = self.z.alpha()
                self.ranks.assert_same(alpha, "the mixture")
                self.state.history.append(alpha.tolist())
                self.loss_w = loss_weights(alpha, self.serve).to(self.device)
                self.state.effective_batch = self.ctx.publish(dict(zip(self.names, alpha.tolist())))
            if self.fc.search_batch == "window":
                self.window = SourceScores.zeros(self.K, dtype=torch.float64, device=self.device)
                self.state.target_loss = self.target_pass()
                self.reference = self._reference(self.train_gradient())
        self.state.outer += 1
        self.record(info)
        self.tele = SourceScores.zeros(self.K, dtype=torch.float64, device=self.device)
        self.write_weights(final=False)

    def target_pass(self) -> float:
        """Forward the next target batch(es) at the current parameters: update the target gradient
        (EMA) and return the target loss."""
        G_sum, loss_sum, n_sum = None, 0.0, 0
        tr = self.trainer
        for _ in range(self.sched.target_batches_per_step):
            b = self.targets.next()
            check_ids(b["tokens"], self._V, f"target {self.targets.target.name!r}")
            tokens = b["tokens"].to(self.device)
            mask = b.get("loss_mask")
            mask = mask.to(self.device) if mask is not None else None
            ntok = tokens.shape[0] * (tokens.shape[1] - 1)
            self.ctx.meter.eval(ntok)
            if self.fc.hypergrad == "full":
                G, loss, n = full_target_gradient(tr.model, tokens, tr.params, loss_mask=mask, loss_fn=self.ctx.loss_fn,
                                                  autocast=tr.autocast())
                self.ctx.meter.hypergrad(4.0 * self.ctx.meter.N * ntok)
            else:  # this rank's rows of the target batch, the gradient summed over the ranks
                hg = self.proxy.head_gradient(tokens, loss_mask=mask)
                self.ctx.meter.hypergrad(2.0 * self._V * self._d * hg.tokens)
                G, loss, n = hg.grad, hg.loss, hg.tokens
            if n == 0:
                continue
            G_sum = _accumulate(G_sum, G, n)
            loss_sum += loss * n
            n_sum += n
        if n_sum == 0:
            raise ValueError("the target batches have no scored token (is every loss_mask all False?)")
        self.ema.update([g / n_sum for g in G_sum] if isinstance(G_sum, list) else G_sum / n_sum)
        return loss_sum / n_sum

    def buffer_scores(self) -> SourceScores:
        """Scores of the buffered sequences, forwarded again at the current parameters."""
        rows = [r for buf in self.buffers for r in buf]
        if not rows:
            return SourceScores.zeros(self.K, device=self.device)
        src = torch.tensor([k for k, buf in enumerate(self.buffers) for _ in buf], device=self.device)
        tokens = torch.stack(rows)
        ntok = tokens.shape[0] * (tokens.shape[1] - 1)
        tr, meter = self.trainer, self.ctx.meter
        meter.eval(ntok)
        if self.fc.hypergrad == "full":
            sc = full_source_scores(tr.model, tokens, src, self.ema.value, self.K, tr.params, loss_fn=self.ctx.loss_fn,
                                    autocast=tr.autocast())
            meter.hypergrad(4.0 * meter.N * ntok * int(sc.present.sum()), scored=ntok)
            return sc
        meter.hypergrad(2.0 * self._V * self._d * ntok, scored=ntok)
        train = self.train_gradient() if self.residual else None
        return self.proxy.score_batch(tokens, src, self._reference(train))

    def train_gradient(self) -> torch.Tensor | None:
        """The alpha-weighted training loss's LM-head gradient at the CURRENT parameters (where the
        target gradient was just taken), on FRESH sequences: the next batches of the search stream,
        which the proxy then skips -- like the target's, a gradient on unseen data (one taken on
        just-trained sequences is biased low) that is independent of the tokens it is compared with
        and, unlike a fixed held-out sample, whose sampling error averages out over the run. About as
        many sequences as the target pass forwards, with the current loss weights."""
        if self._it is None:
            return None
        G, n, seqs = None, 0, 0
        while seqs < self.sched.target_batches_per_step * self.tbs:
            tokens, src = self._unpack(next(self._it))  # this rank's rows of the next global batch
            seqs += tokens.shape[0] * self.world
            self.state.held_out_batches += 1
            hg = self.proxy.head_gradient(tokens, seq_weights=self.loss_w[src], split=False)
            self.ctx.meter.eval(hg.tokens)
            self.ctx.meter.hypergrad(2.0 * self._V * self._d * hg.tokens)
            G = hg.grad * hg.tokens if G is None else G + hg.grad * hg.tokens
            n += hg.tokens
        return G / n

    def _reference(self, train_grad: torch.Tensor | None):
        """The gradient scores are taken against: ``G_T`` (the target's), or with ``fastmix.residual``
        ``G_T - w G_train`` (minus the alpha-weighted training gradient times ``fastmix.residual_weight``:
        see FastMixConfig.residual); with ``fastmix.precondition`` that times the proxy AdamW's step
        scale ``P`` for the head weight (:meth:`~fastmix_data.search.proxy_step.ProxyStep.head_preconditioner`)."""
        ref = self.ema.value
        if train_grad is not None:
            ref = ref - self.fc.residual_weight * train_grad.to(ref.dtype)  # x 1.0: exact
        return self._preconditioned(ref)

    def _preconditioned(self, ref):
        """``P * ref`` with ``fastmix.precondition`` once the optimiser has a state for the head, else ``ref``."""
        P = self.proxy.head_preconditioner() if self.fc.precondition else None
        return ref if P is None else ref * P

    def budget_reached(self) -> str | None:
        """``"max_tokens"`` once the budget's micro-batches are trained (at an optimiser-step boundary)."""
        return "max_tokens" if self.state.step >= self.budget.steps else None

    # ================================================================== weights and records
    def candidates(self) -> dict[str, dict[str, float]]:
        """The mixtures FastMix can export: ``last``, ``average`` (all updates), ``tail`` (the last
        ``tail_fraction`` of the updates); before any update all are the starting mixture."""
        last = self.z.alpha().tolist()
        hist = self.state.history or [last]
        n_tail = max(1, math.ceil(self.fc.tail_fraction * len(hist)))
        mean = lambda rows: [sum(c) / len(rows) for c in zip(*rows)]  # noqa: E731
        return {k: dict(zip(self.names, v)) for k, v in
                (("last", last), ("average", mean(hist)), ("tail", mean(hist[-n_tail:])))}

    def record(self, info) -> None:
        a = self.z.alpha()
        self.ctx.writer.record({
            "outer_step": self.state.outer, "step": self.state.step, "tokens": self.trainer.tokens,
            "weights": dict(zip(self.names, a.tolist())),
            "source_loss": dict(zip(self.names, self.ranks.sum_scores(self.tele).losses().tolist())),
            "target_loss": self.state.target_loss, "entropy": self.z.entropy(a), "min_weight": float(a.min()),
            "lr": self.trainer.lr(), "z_lr": self.z.lr, "updated": bool(info and info.updated),
            "reason": None if info is None else info.reason,
            "signal": None if info is None else dict(zip(self.names, info.g)),
            "skipped_nonfinite": self.z.skipped_nonfinite, "effective_batch": self.state.effective_batch,
            "wall_s": self.ctx.meter.wall_s,
        })

    def write_weights(self, final: bool, reason: str | None = None) -> None:
        c = self.candidates()
        self.ctx.writer.write_weights(c[self.fc.final], exported=self.fc.final, candidates=c, final=final,
                                      stopped_reason=reason, tokens=self.trainer.tokens, details=self.details())

    def details(self) -> dict:
        return {"schedule": self.sched.to_dict(), "updates": self.z.steps, "outer_steps": self.state.outer,
                "wall_breakdown_s": dict(self.state.times), "residual": self.residual,
                "held_out_batches": self.state.held_out_batches,
                "micro_batches": self.state.step, "skipped_nonfinite_hypergrad": self.z.skipped_nonfinite,
                "skipped_nonfinite_train": self.trainer.skipped_nonfinite, "hypergrad": self.fc.hypergrad,
                "search_batch": self.fc.search_batch, "target": None if self.targets is None else
                self.targets.target.describe(), **self.extra_details}

    # ================================================================== checkpoint
    def checkpoint(self, data_state: Any = None) -> None:
        """Write ``checkpoint.pt`` atomically (and the trajectory so far)."""
        if self.ckpt_path is None:
            return
        ck = {
            "version": CHECKPOINT_VERSION, "config": self.cfg.to_dict(), "source_names": self.names,
            "trainer": self.trainer.state_dict(), "fastmix": self.z.state_dict(), "state": asdict(self.state),
            "meter": self.ctx.meter.state_dict(), "window": self.window.state_dict(), "tele": self.tele.state_dict(),
            "ema": self.ema.state_dict(), "buffers": [[r.cpu() for r in buf] for buf in self.buffers],
            "reference": None if self.reference is None or isinstance(self.reference, list) else self.reference.cpu(),
            "target": None if self.targets is None else self.targets.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "data": data_state,
        }
        with atomic_path(self.ckpt_path) as tmp:
            torch.save(ck, tmp)
        self.ctx.writer.flush()

    def restore(self) -> Any:
        """Load ``checkpoint.pt`` (refusing one written with another config or other sources);
        returns the stream state it holds."""
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        diff = _config_diff(ck["config"], self.cfg.to_dict())
        if diff:
            raise ValueError(f"checkpoint {self.ckpt_path} was written with a different config:\n  " + "\n  ".join(diff))
        if ck["source_names"] != self.names:
            raise ValueError(f"checkpoint {self.ckpt_path} has sources {ck['source_names']}, this run has {self.names}")
        self.trainer.load_state_dict(ck["trainer"])
        self.z.load_state_dict(ck["fastmix"])
        self.state = LoopState(**ck["state"])
        self.ctx.meter.load_state_dict(ck["meter"])
        self.window = SourceScores.from_state_dict(ck["window"], self.device)
        self.tele = SourceScores.from_state_dict(ck["tele"], self.device)
        self.ema.load_state_dict(ck["ema"], self.device)
        ref = ck.get("reference")
        self.reference = ref.to(self.device) if ref is not None else (
            self._preconditioned(self.ema.value) if self.fc.hypergrad == "head" else None)
        for k, rows in enumerate(ck["buffers"]):
            self.buffers[k].extend(r.to(self.device) for r in rows)
        if self.targets is not None and ck["target"] is not None:
            self.targets.load_state_dict(ck["target"])
        torch.set_rng_state(ck["rng"]["torch"])
        if self.device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        self.ctx.writer.restore(self.state.step)
        self.loss_w = loss_weights(self.z.alpha(), self.serve).to(self.device)
        return ck.get("data")

    # ================================================================== the loop
    def _iterator(self, resumed: bool, data_state: Any):
        if data_state is not None and callable(getattr(self.data, "load_state_dict", None)):
            self.data.load_state_dict(data_state)
            return iter(self.data)
        it = iter(self.data)
        used = self.state.step + self.state.held_out_batches
        if resumed and used:
            warnings.warn(f"the search stream has no state_dict(): skipping the {used} batches already "
                          "used (the stream must be deterministic for an identical resumption)", stacklevel=3)
            for _ in range(used):
                next(it)
        return it

    def _start(self):
        """Resume from the checkpoint, or start: take the first reference gradient and publish the
        starting mixture. Returns the stream's iterator."""
        resume = self.ctx.resume
        if resume not in (False, True, "auto"):
            raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
        exists = self.ckpt_path is not None and self.ckpt_path.exists()
        if resume is True and not exists:
            where = self.ckpt_path or "(no out_dir)"
            raise FileNotFoundError(f"resume=True but there is no checkpoint at {where}")
        if resume and exists:
            data_state = self.restore()
            self.state.effective_batch = self.ctx.publish(dict(zip(self.names, self.z.alpha().tolist())))
            it = self._iterator(True, data_state)
            self._it = it if self.residual else None
            return it
        it = self._iterator(False, None)
        self._it = it if self.residual else None
        if self.fc.hypergrad != "none":
            self.state.target_loss = self.target_pass()
            self.reference = self._reference(self.train_gradient() if self.residual else None)
        self.state.effective_batch = self.ctx.publish(dict(zip(self.names, self.z.alpha().tolist())))
        self.record(None)
        self.write_weights(final=False)
        return it

    def run(self) -> MethodResult:
        """Train and search until the budget is spent; write the outputs; return the result."""
        self.ctx.writer.write_config(self.cfg.to_dict(), {"fastmix": self.sched.to_dict(),
                                                          "lr_warmup_steps": self.trainer.warmup,
                                                          "checkpoint_every": self.ckpt_every,
                                                          "vocabulary": self.ctx.vocab.to_dict(),
                                                          "ranks": self.ranks.world,
                                                          "micro_batches": self.budget.steps})
        if self.fc.hypergrad != "none" and self.sched.updates == 0:
            warnings.warn(f"the budget allows {self.budget.steps} micro-batches but the mixture is first updated "
                          f"after warmup_steps={self.sched.warmup_steps} + outer_every={self.sched.outer_every}: this "
                          "search will return its starting weights; raise max_tokens or lower them", stacklevel=2)
        it = self._start()
        stopped, error = self.budget_reached(), None
        bar = self._bar()
        try:
            while stopped is None:
                clock = _Clock(self.state.times)
                try:
                    batch = next(it)
                except StopIteration:
                    stopped = "data_exhausted"
                    warnings.warn(f"the search stream ended after {self.state.step} batches, before the budget",
                                  stacklevel=2)
                    break
                clock.lap("data")
                m = self.inner_step(batch)
                clock.lap("train")
                self.score(m)
                del m
                clock.lap("score")
                if self.state.step % self.sched.outer_every == 0:
                    self.outer_step()
                    clock.lap("outer")
                if bar is not None:
                    bar.update(self.budget.tokens_per_step)
                    if self.state.step % self.sched.outer_every == 0:
                        bar.set_postfix_str(self._postfix(), refresh=False)
                if self.trainer.micro % self.cfg.train.grad_accum == 0:
                    if self.state.step % self.ckpt_every == 0:
                        self.checkpoint(self._data_state())
                        clock.lap("io")
                    stopped = self.budget_reached()
        except BaseException as e:  # a crash keeps the weights and the trajectory found so far
            error = e
            raise
        finally:
            if bar is not None:
                bar.close()
            self.ctx.writer.flush()
            self.write_weights(final=error is None, reason=stopped if error is None else f"error: {type(error).__name__}")
        self.checkpoint(self._data_state())
        c = self.candidates()
        return finish(self.ctx, self.method, c[self.fc.final], exported=self.fc.final, candidates=c,
                      details=self.details(), stopped_reason=stopped or "unknown",
                      optimizer_steps=self.trainer.steps, device=self.trainer.device_name,
                      dtype=self.trainer.dtype_name, model=self.trainer.model)

    # ================================================================== helpers
    def _data_state(self) -> Any:
        return self.data.state_dict() if callable(getattr(self.data, "state_dict", None)) else None

    def _bar(self):
        if not self.cfg.output.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.budget.steps * self.budget.tokens_per_step, initial=self.trainer.tokens, unit="tok",
                    unit_scale=True, desc="fastmix search", dynamic_ncols=True)

    def _postfix(self) -> str:
        top = sorted(zip(self.names, self.z.alpha().tolist()), key=lambda t: -t[1])[:4]
        tl = self.state.target_loss
        return (f"target={'-' if tl is None else round(tl, 3)} " + " ".join(f"{n}={w:.2f}" for n, w in top))

    def _unpack(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, Mapping) or "tokens" not in batch or "source" not in batch:
            raise ValueError("search batches must be dicts with 'tokens' (LongTensor [B, L+1]) and 'source' "
                             f"(LongTensor [B]); got {type(batch).__name__}"
                             + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else ""))
        tokens, source = torch.as_tensor(batch["tokens"]), torch.as_tensor(batch["source"])
        if self.state.step == 0 or self.trainer.micro == 0:
            if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"batch['tokens'] must be an integer tensor [B, L+1] with L >= 1, got "
                                 f"{tuple(tokens.shape)} {tokens.dtype}")
            if source.shape != (tokens.shape[0],):
                raise ValueError(f"batch['source'] must have shape [B]=[{tokens.shape[0]}], got {tuple(source.shape)}")
        if tokens.device.type == "cpu" or self.state.step == 0:  # (on a device: the first batch, one sync)
            check_ids(tokens, self._V, f"search batch {self.state.step + self.state.held_out_batches + 1}")
        if source.numel() and (int(source.min()) < 0 or int(source.max()) >= self.K):
            raise ValueError(f"batch['source'] holds ids outside [0, {self.K}) (there are {self.K} sources): "
                             f"{source.unique().tolist()}")
        return tokens.long().to(self.device, non_blocking=True), source.long().to(self.device, non_blocking=True)


class _Clock:
    """Adds the wall time since the last lap to ``times[phase]``."""

    def __init__(self, times: dict[str, float]):
        self.times, self.t = times, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self.t
        self.t = now


def _accumulate(acc, G, n: int):
    if acc is None:
        return [g * n for g in G] if isinstance(G, list) else G * n
    if isinstance(G, list):
        for a, b in zip(acc, G):
            a.add_(b * n)
        return acc
    return acc + G * n


def _config_diff(saved: Mapping, now: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        p = f"{prefix}{k}"
        if p in RESUMABLE:
            continue
        a, b = saved.get(k), now.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _config_diff(a, b, p + ".")
        elif a != b:
            out.append(f"{p}: checkpoint {a!r} != now {b!r}")
    return out


__all__ = ["CHECKPOINT_VERSION", "FastMixLoop", "LoopState", "loss_weights"]
