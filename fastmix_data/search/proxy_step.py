"""One search proxy's side of the work: its model, its optimiser, and one micro-step at hardware speed.

The search loop decides *when* things happen (windows, outer steps, checkpoints, budgets);
:class:`ProxyStep` owns *how* the proxy does its part, the same way on a CPU in a test and on
several GPUs:

* the model on its device, in ``DistributedDataParallel`` across ranks (:mod:`.ddp`), its trunk
  compiled with ``torch.compile`` (``compile=True``), activation checkpointing by its own config;
* bf16 autocast (``bf16=True``) and fused AdamW on CUDA;
* a micro-step: the trunk's forward, the fused head loss (:mod:`.fused_head`) with FastMix's
  per-token scores folded into it when a target gradient ``G`` is given, the backward, gradient
  accumulation (DDP all-reduces on the last micro-step of an optimiser step only);
* a tied head's second score term, from the gradient at the embedding output that the backward
  computes anyway (a hook; see :mod:`.hypergrad`'s tied-head section);
* head gradients (the target's; an alpha-weighted training loss's) from this rank's share of a
  batch, all-reduced, and the scores of a buffered search batch.

Scoring never changes training: with and without ``G`` the parameters move bitwise the same (tested).
Scores and telemetry come back as this rank's per-source sums; the loop sums them over ranks at
the outer step (:meth:`Ranks.sum_scores`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ddp import Ranks, no_sync, unwrap, wrap
from .fused_head import compiled_residuals, default_chunk_tokens, fused_head_loss
from .hypergrad import (
    HeadGradient,
    SourceScores,
    TokenLossFn,
    embedding_scores,
    head_gradient,
    per_token_source,
    segment_sums,
    source_head_scores,
    tied_head_gradient,
    tied_source_scores,
    token_losses,
)
from .model import head_is_tied, is_headed_lm


@dataclass
class MicroStep:
    """What one micro-step returns (all on the device, detached).

    Attributes:
        token_losses: per-token losses ``[B, L]`` (float32, or float64 for a float64 model).
        losses: per-source token ``counts`` and ``loss_sums`` of this rank (``sums`` zero).
        scores: per-source FastMix score sums (and the same counts and loss sums), or None when
            the step was not scored (no ``G``).
        finite: whether the loss was finite on every rank (if not, no gradient was accumulated).
    """

    token_losses: torch.Tensor
    losses: SourceScores
    scores: SourceScores | None
    finite: bool

    @property
    def seq_losses(self) -> torch.Tensor:
        """Mean token loss per sequence ``[B]``."""
        return self.token_losses.mean(1)


class ProxyStep:
    """The proxy model, its AdamW optimiser and its micro-step (see the module docstring).

    Args:
        model: a :class:`~fastmix_data.search.model.HeadedLM`; moved to ``device``. Under DDP (more
            than one rank) its ``forward(x, head=False)`` must return the final hidden states, as
            :class:`~fastmix_data.search.model.ProxyLM`'s does.
        num_sources: K.
        device: where the model trains.
        bf16: bf16 autocast for the products (float32 master weights and optimiser state).
        compile: ``torch.compile`` the trunk (``model.trunk``, else ``model.final_hidden``) and the
            fused head's softmax pass; the compiled trunk replaces the model's method on this instance. A string names the
            backend (``"eager"`` traces without generating code: the tests' fast check).
        lr, betas, weight_decay: AdamW (decay on matrices only); fused on CUDA.
        grad_clip: global gradient-norm clip per optimiser step (None: none).
        grad_accum: micro-steps per optimiser step.
        chunk_tokens: token chunk of the fused head and the score products (None: by vocabulary).
        loss_fn: a per-token loss ``(logits [N, V], targets [N]) -> [N]`` instead of cross-entropy
            (then, as with a head bias, the head is not fused: its logits are materialised).
        fused: the fused head loss (:mod:`.fused_head`) where it applies; False: the logits are
            materialised and scored in a separate pass over them.
        ranks: data-parallel ranks (default: the initialised process group's, else one).
    """

    def __init__(
        self,
        model: nn.Module,
        num_sources: int,
        *,
        device: torch.device | str = "cpu",
        bf16: bool = False,
        compile: bool | str = False,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        grad_clip: float | None = 1.0,
        grad_accum: int = 1,
        chunk_tokens: int | None = None,
        loss_fn: TokenLossFn | None = None,
        ranks: Ranks | None = None,
        fused: bool = True,
    ):
        if not is_headed_lm(model):
            raise TypeError(
                "the proxy model must expose final_hidden(x) -> [B, L, d] and head: nn.Linear(d, V) "
                "(see fastmix_data.search.model.HeadedLM)"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.model.train()
        self.K = int(num_sources)
        self.bf16 = bool(bf16)
        self.grad_clip = grad_clip
        self.grad_accum = int(grad_accum)
        self.chunk_tokens = chunk_tokens
        self.loss_fn = loss_fn
        self.ranks = ranks or Ranks.current()
        self.tied = head_is_tied(model)
        self.fused = bool(fused) and loss_fn is None and model.head.bias is None
        self._residuals = None
        if compile:
            backend = None if compile is True else str(compile)
            _compile_trunk(model, backend)
            self._residuals = compiled_residuals(backend)
        self.net = wrap(model, self.ranks, self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = _adamw(self.params, lr, betas, weight_decay, fused=self.device.type == "cuda")
        self.micro = 0  # micro-batches trained (gradients sync every grad_accum-th)
        self._grad_e: torch.Tensor | None = None
        self._capture = False
        self._hook = model.embed.register_forward_hook(self._tap_embedding) if self.tied else None

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self.model.head.out_features

    @property
    def d_model(self) -> int:
        return self.model.head.in_features

    @property
    def grad_dtype(self) -> torch.dtype:
        """dtype of the target gradient: float32, or float64 for a float64 model (tests)."""
        return torch.float64 if self.model.head.weight.dtype == torch.float64 else torch.float32

    def autocast(self):
        """bf16 autocast on this device when enabled, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.ranks.world > 1:
            return self.net(x, head=False)  # through DDP, so that its hooks see the forward
        return self.model.final_hidden(x)

    def _tap_embedding(self, _module, _inputs, out):
        if self._capture and out.requires_grad:
            out.register_hook(self._store_grad_e)

    def _store_grad_e(self, grad):
        self._grad_e = grad.detach()

    # ------------------------------------------------------------------ training
    def micro_step(
        self,
        tokens: torch.Tensor,
        source: torch.Tensor | None = None,
        loss_w: torch.Tensor | None = None,
        G: torch.Tensor | None = None,
        *,
        reduce: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    ) -> MicroStep:
        """Forward, loss ``mean_b loss_w[source_b] * mean_t l_bt``, backward (accumulated), and with
        ``G`` the per-source FastMix scores of every trained token.

        ``tokens`` ``[B, L+1]`` and ``source`` ``[B]`` on the device (this rank's rows); ``loss_w``
        ``[K]`` per-source loss weights (None: 1, the token mean; then, without ``G`` either, the
        per-source sums of the result put every sequence in source 0); ``G`` the target head
        gradient ``[V, d]``. ``reduce(token_losses [B, L], source) -> loss`` replaces
        the weighted mean by any loss of the token losses (then the head is not fused and nothing
        is scored).
        """
        x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
        B, L = x.shape
        given = source
        if loss_w is None and G is None:  # plain training: no per-source weights or sums
            source = torch.zeros(B, dtype=torch.long, device=tokens.device)
        seq_w = torch.full((B,), 1.0 / (B * L), dtype=self.grad_dtype, device=self.device)
        if loss_w is not None:
            seq_w = loss_w.to(self.device, self.grad_dtype)[source] / (B * L)
        self.micro += 1
        self._grad_e, self._capture = None, self.tied and G is not None and reduce is None
        with no_sync(self.net, sync=self.micro % self.grad_accum == 0):
            with self.autocast():
                h = self._hidden(x).reshape(B * L, -1)
                if reduce is None:
                    loss, tok, tok_scores, logits = self._head_loss(h, y, seq_w.repeat_interleave(L), G)
                else:
                    tok = token_losses(self.model.head(h), y, self.loss_fn)
                    loss, tok_scores, logits, G = reduce(tok.view(B, L), given), None, None, None
            finite = self._all_finite(loss)
            if finite:
                (loss / self.grad_accum).backward()
        self._capture = False
        tok = tok.detach().view(B, L)
        losses = _loss_sums(tok.mean(1), source, L, self.K)
        scores = None
        if G is not None:
            scores = self._scores(h, x, y, source, G, tok_scores, logits, seq_w, losses)
        return MicroStep(tok, losses, scores, finite)

    def _head_loss(self, h, y, w, G):
        """``(loss, token losses, per-token scores or None, logits or None)``."""
        W = self.model.head.weight
        if self.fused:
            out = fused_head_loss(h, W, y, w, G=G, chunk_tokens=self.chunk_tokens, residuals=self._residuals)
            return out.loss, out.token_losses, out.scores, None
        logits = F.linear(h, W, self.model.head.bias)
        tok = token_losses(logits, y, self.loss_fn)
        return (w * tok).sum(), tok, None, logits

    def _scores(self, h, x, y, source, G, tok_scores, logits, seq_w, losses) -> SourceScores:
        B, L = x.shape
        if tok_scores is not None:
            sums = segment_sums(tok_scores.view(B, L).sum(1).double(), source, self.K)
        else:  # a custom loss: the unfused one-pass scores on the materialised logits
            sums = source_head_scores(
                h.detach(), y, per_token_source(source, L).reshape(-1), G, self.K,
                logits=logits.detach(), loss_fn=self.loss_fn, chunk_tokens=self.chunk_tokens or 4096,
            ).sums.double()
        if self.tied:
            if self._grad_e is None:  # no backward ran (non-finite loss): the score is unknown
                emb = torch.full((B,), torch.nan, dtype=torch.float64, device=self.device)
            else:  # d(sum_t l_bt)/de_b = (gradient at the embedding output) / (sequence b's weight)
                emb = embedding_scores(x, self._grad_e, G).double() / (seq_w.double() / self.grad_accum)
            sums = sums + segment_sums(emb, source, self.K)
        return SourceScores(sums, losses.counts, losses.loss_sums)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).to(torch.float64).reshape(1)
        if self.ranks.world > 1:  # one rank skipping its backward alone would hang DDP
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return bool(ok.item())

    def optimizer_step(self, lr: float) -> None:
        """Clip, step AdamW at ``lr`` and clear the gradients (after ``grad_accum`` micro-steps)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ search passes
    def head_gradient(
        self,
        tokens: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        seq_weights: torch.Tensor | None = None,
        *,
        split: bool = True,
    ) -> HeadGradient:
        """The head gradient ``G`` (``[V, d]``; a tied head's full gradient), mean loss and token count
        of the (masked, weighted) token-mean loss of ``tokens`` ``[B, L+1]`` at the current
        parameters -- the target's, or with per-sequence ``seq_weights`` ``[B]`` an alpha-weighted
        training loss's. Computed on this rank's rows and summed over ranks: every rank gets the
        whole batch's ``G``. ``loss_mask`` ``[B, L]``: the tokens that count. ``split=False``: the
        batch is this rank's already (a rank's own stream batch), use all of it."""
        rows = self.ranks.rows(tokens.shape[0]) if split else slice(None)
        t = tokens[rows]
        m = None if loss_mask is None else loss_mask[rows]
        w = None if seq_weights is None else seq_weights[rows].reshape(-1, 1).to(self.device, self.grad_dtype)
        kw = dict(loss_mask=m, loss_fn=self.loss_fn, dtype=self.grad_dtype, chunk_tokens=self._chunk(), weights=w)
        if t.shape[0] == 0:
            hg = HeadGradient(torch.zeros(self.vocab_size, self.d_model, dtype=self.grad_dtype, device=self.device), 0.0, 0)
        elif self.tied:
            hg = tied_head_gradient(self.model, t, autocast=self.autocast(), **kw)
        else:
            with torch.no_grad(), self.autocast():
                h = self.model.final_hidden(t[:, :-1])
            kw["mask"] = kw.pop("loss_mask")
            hg = head_gradient(h, t[:, 1:], head_weight=self.model.head.weight, **kw)
        G, n, loss = self.ranks.mean_gradient(hg.grad, hg.tokens, hg.loss)
        return HeadGradient(G, loss, n)

    def score_batch(self, tokens: torch.Tensor, source: torch.Tensor, G: torch.Tensor) -> SourceScores:
        """Per-source scores of a search batch ``tokens`` ``[B, L+1]`` (per-sequence ``source``) at
        the current parameters: one forward (and for a tied head one backward to the embedding
        output). This rank's sums."""
        if self.tied:
            return tied_source_scores(
                self.model, tokens, source, G, self.K, loss_fn=self.loss_fn, autocast=self.autocast(),
                chunk_tokens=self._chunk(),
            )
        with torch.no_grad(), self.autocast():
            h = self.model.final_hidden(tokens[:, :-1])
        L = tokens.shape[1] - 1
        return source_head_scores(
            h, tokens[:, 1:], per_token_source(source, L), G, self.K,
            head_weight=self.model.head.weight, loss_fn=self.loss_fn, chunk_tokens=self._chunk(),
        )

    def head_preconditioner(self) -> torch.Tensor | None:
        """AdamW's per-coordinate step scale for the LM-head weight, ``P = 1 / (sqrt(v_hat) + eps)``
        ``[V, d]`` in :attr:`grad_dtype` (``v_hat = exp_avg_sq / (1 - beta2**step)``, the bias-corrected
        second moment; ``eps`` the optimiser's): the current gradient ``g`` moves the weight by
        ``-lr * P * g`` (momentum aside). None while the optimiser has no state for it (P = 1).
        Derived from the optimiser state alone: the same on every rank, and restored with it."""
        W = self.model.head.weight
        st = self.opt.state.get(W)
        if not st or "exp_avg_sq" not in st:
            return None
        group = next(g for g in self.opt.param_groups if any(p is W for p in g["params"]))
        v_hat = st["exp_avg_sq"] / (1.0 - group["betas"][1] ** float(st["step"]))
        return (1.0 / (v_hat.sqrt() + group["eps"])).to(self.grad_dtype)

    def _chunk(self) -> int:
        return self.chunk_tokens or default_chunk_tokens(self.vocab_size)

    def close(self) -> None:
        """Remove the embedding hook a tied head installed on the model (the model stays usable)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Model (unwrapped: loads in one process too) and optimiser state."""
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.opt.state_dict(), "micro": self.micro}

    def load_state_dict(self, d: dict) -> None:
        unwrap(self.model).load_state_dict(d["model"])
        self.opt.load_state_dict(d["optimizer"])
        self.micro = int(d.get("micro", 0))


def _loss_sums(seq: torch.Tensor, source: torch.Tensor, L: int, K: int) -> SourceScores:
    sd = seq.double()
    counts = segment_sums(torch.full_like(sd, L), source, K)
    return SourceScores(torch.zeros_like(counts), counts, segment_sums(sd * L, source, K))


def _adamw(params, lr, betas, weight_decay, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=tuple(betas), **kw,
    )


def _compile_trunk(model: nn.Module, backend: str | None) -> None:
    """Replace ``model.trunk`` (else ``model.final_hidden``) on this instance by its compiled version:
    the embedding lookup (and a tied head's hook on it) stays eager, and a DDP forward reaches the
    compiled code through the model's own ``forward``."""
    name = "trunk" if callable(getattr(model, "trunk", None)) else "final_hidden"
    fn = getattr(model, name)
    if not hasattr(fn, "_torchdynamo_orig_callable"):
        setattr(model, name, torch.compile(fn) if backend is None else torch.compile(fn, backend=backend))


__all__ = ["MicroStep", "ProxyStep"]
