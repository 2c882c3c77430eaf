"""FastMix hypergradients: per-source gradient inner products with the target gradient.

The one-step, first-order hypergradient of the target loss with respect to mixture weight k is

    g_k = -eta * <grad L_T(theta), grad L_k(theta)>.

Restricted to the LM-head weight W (V x d), both gradients have closed forms in the head's inputs:
with h_t the final hidden state of token t, z_t = W h_t its logits and r_t = dl_t/dz_t the logit
residual (``softmax(z_t) - e_{y_t}`` for cross-entropy),

    grad_W L_k = mean_{t in k} r_t h_t^T          (V x d)
    <G_T, grad_W L_k> = mean_{t in k} r_t^T (G_T h_t)

so one pass over the scored tokens gives all K inner products: a per-token score
``s_t = r_t . (G_T h_t) = (r_t G_T) . h_t`` followed by a segment mean by source
(:func:`segment_sums`). The cost is one ``[N, V] x [V, d]`` product, the same as the head's
forward, and does not depend on K. Nothing here runs a backward pass through the trunk, and
nothing reads or writes any ``.grad`` buffer.

The full-parameter variant (:func:`full_source_scores`) instead takes ``torch.autograd.grad`` of
every present source's loss with respect to all parameters (K backward passes) and dots them with
the target's full gradient. ``torch.autograd.grad`` returns gradients without accumulating them
into ``.grad``, so the proxy's own gradient accumulation is untouched by it as well.

Every function works in the dtype of the target gradient ``G`` (float32 in training, float64 in
tests); inputs in lower precision (bf16 autocast) are up-cast chunk by chunk, except the one-pass
scores' ``[c, V] x [V, d]`` product, which then runs in that lower precision (float32 accumulation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fused_head import LOW_PRECISION, fused_head_loss

#: ``loss_fn(logits [N, V], targets [N]) -> per-token losses [N]``. The default is cross-entropy.
TokenLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_CHUNK_TOKENS = 4096


def token_losses(logits: torch.Tensor, targets: torch.Tensor, loss_fn: TokenLossFn | None = None) -> torch.Tensor:
    """Per-token losses ``[N]`` (cross-entropy unless ``loss_fn`` is given), computed in float32 or wider."""
    if logits.dtype in LOW_PRECISION:
        logits = logits.float()
    if loss_fn is None:
        return F.cross_entropy(logits, targets, reduction="none")
    out = loss_fn(logits, targets)
    if out.shape != targets.shape:
        raise ValueError(
            f"loss_fn must return one loss per token (shape {tuple(targets.shape)}), got shape {tuple(out.shape)}"
        )
    return out


def logit_residuals(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: TokenLossFn | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, loss)``: per-token logit gradients ``r_t = dl_t/dz_t`` ``[N, V]`` and losses ``[N]``, in
    ``dtype`` (default: the logits' dtype, at least float32).

    Cross-entropy uses the closed form ``softmax(z) - onehot(y)``, one softmax pass that reads
    lower-precision logits as they are; its loss ``-log p_y`` is capped where ``p_y`` underflows
    (at ~87 nats in float32). A custom ``loss_fn`` is differentiated with autograd with respect to
    a detached copy of the logits only (no trunk).
    """
    z = logits.detach()
    if dtype is None:
        dtype = torch.float32 if z.dtype in LOW_PRECISION else z.dtype
    if loss_fn is None:
        r = torch.softmax(z, dim=-1, dtype=dtype)
        rows = torch.arange(r.shape[0], device=r.device)
        loss = -torch.log(r[rows, targets].clamp_min(torch.finfo(dtype).tiny))
        r[rows, targets] -= 1
        return r, loss
    with torch.enable_grad():
        z = z.to(dtype).requires_grad_(True)
        loss = token_losses(z, targets, loss_fn)
        (r,) = torch.autograd.grad(loss.sum(), z)
    return r, loss.detach()


def _prep(
    h: torch.Tensor,
    targets: torch.Tensor,
    logits: torch.Tensor | None,
    mask: torch.Tensor | None,
    extra: torch.Tensor | None = None,
):
    d = h.shape[-1]
    h = h.reshape(-1, d)
    targets = targets.reshape(-1)
    if logits is not None:
        logits = logits.reshape(-1, logits.shape[-1])
    if extra is not None:
        extra = extra.reshape(-1)
    if mask is not None:
        mask = mask.reshape(-1).bool()
        h, targets = h[mask], targets[mask]
        logits = logits[mask] if logits is not None else None
        extra = extra[mask] if extra is not None else None
    return h, targets, logits, extra


def _chunk_logits(h_c, logits, i, j, head_weight, dtype):
    """Logits of tokens ``i:j``: the given ones as they are (any dtype), or ``h_c W^T``, computed in
    ``h_c``'s dtype when it is lower precision (bf16 autocast: tensor cores), else in ``dtype``."""
    if logits is not None:
        return logits[i:j]
    if head_weight is None:
        raise ValueError("pass either logits or head_weight")
    cdt = h_c.dtype if h_c.dtype in LOW_PRECISION else dtype
    return h_c.to(cdt) @ head_weight.detach().to(cdt).T


@dataclass
class HeadGradient:
    """The LM-head gradient of a (masked) token-mean loss: ``grad`` (V x d), ``loss`` and ``tokens``."""

    grad: torch.Tensor
    loss: float
    tokens: int


@torch.no_grad()
def head_gradient(
    h: torch.Tensor,
    targets: torch.Tensor,
    *,
    logits: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    loss_fn: TokenLossFn | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    weights: torch.Tensor | None = None,
) -> HeadGradient:
    """Closed-form gradient of the token-mean loss w.r.t. the head weight: ``sum_t w_t r_t h_t^T / n``.

    ``h``: hidden states ``[..., d]``; ``targets``: ``[...]``; ``logits`` ``[..., V]`` (or give
    ``head_weight`` to compute them); ``mask``: optional bool ``[...]`` of the tokens that count
    (e.g. answer tokens), n their number; ``weights``: optional per-token loss weights ``w_t``
    ``[...]`` (default 1; e.g. a sequence's ``alpha / serve``), which also weigh the returned mean
    loss. No autograd through the model is involved. With bf16 ``h`` and
    ``head_weight`` (autocast) the chunk products run in bf16 with float32 accumulation and each
    chunk's ``r^T h`` is added to ``G`` in ``dtype`` -- as autocast computes a weight gradient --
    instead of a float32 product without tensor cores.
    """
    if weights is not None:
        weights = torch.as_tensor(weights).to(h.device, dtype).expand(targets.shape)
    h, targets, logits, w = _prep(h, targets, logits, mask, weights)
    n = h.shape[0]
    V = logits.shape[-1] if logits is not None else head_weight.shape[0]
    G = torch.zeros(V, h.shape[1], dtype=dtype, device=h.device)
    loss_sum = torch.zeros((), dtype=dtype, device=h.device)
    for i in range(0, n, chunk_tokens):
        j = min(n, i + chunk_tokens)
        z = _chunk_logits(h[i:j], logits, i, j, head_weight, dtype)
        r, loss = logit_residuals(z, targets[i:j], loss_fn, dtype)
        if w is not None:
            r, loss = r * w[i:j, None], loss * w[i:j]
        if logits is None and h.dtype in LOW_PRECISION:
            G += (r.to(h.dtype).T @ h[i:j]).to(dtype)
        else:
            G.addmm_(r.T, h[i:j].to(dtype))
        loss_sum += loss.sum()
    if n:
        G /= n
    return HeadGradient(grad=G, loss=float(loss_sum / max(n, 1)), tokens=int(n))


@dataclass
class SourceScores:
    """Per-source sums over scored tokens: ``sums`` of the scores ``<G_T, grad_W l_t>``, token
    ``counts`` and ``loss_sums``. Scores of consecutive batches add up (``a + b``)."""

    sums: torch.Tensor
    counts: torch.Tensor
    loss_sums: torch.Tensor

    @classmethod
    def zeros(cls, num_sources: int, dtype=torch.float64, device=None) -> SourceScores:
        z = torch.zeros(num_sources, dtype=dtype, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def __add__(self, other: SourceScores) -> SourceScores:
        dt, dev = self.sums.dtype, self.sums.device
        return SourceScores(
            self.sums + other.sums.to(dev, dt),
            self.counts + other.counts.to(dev, dt),
            self.loss_sums + other.loss_sums.to(dev, dt),
        )

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    def means(self) -> torch.Tensor:
        """Per-source mean score, i.e. ``<G_T, grad_W L_k>``; NaN for sources with no token."""
        return torch.where(self.present, self.sums / self.counts.clamp_min(1), torch.nan)

    def losses(self) -> torch.Tensor:
        """Per-source mean token loss; NaN for absent sources."""
        return torch.where(self.present, self.loss_sums / self.counts.clamp_min(1), torch.nan)

    def state_dict(self) -> dict:
        return {"sums": self.sums.cpu(), "counts": self.counts.cpu(), "loss_sums": self.loss_sums.cpu()}

    @classmethod
    def from_state_dict(cls, d: dict, device=None) -> SourceScores:
        return cls(d["sums"].to(device), d["counts"].to(device), d["loss_sums"].to(device))


def segment_sums(values: torch.Tensor, ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-id sums ``[num_segments]`` of ``values`` ``[n]`` (ids in ``[0, num_segments)``), in the
    values' dtype and bitwise reproducible on every device: ``index_add_`` on the CPU; elsewhere a
    product with the one-hot matrix of ``ids``, since a CUDA ``index_add_`` adds floats with atomics
    in an order that varies from run to run."""
    if values.device.type == "cpu":
        return torch.zeros(num_segments, dtype=values.dtype).index_add_(0, ids, values)
    return _onehot_segment_sums(values, ids, num_segments)


def _onehot_segment_sums(values: torch.Tensor, ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    onehot = ids.to(values.device)[:, None] == torch.arange(num_segments, device=values.device)
    return values @ onehot.to(values.dtype)


def per_token_source(source: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Expand a per-sequence source id ``[B]`` to per-token ids ``[B, seq_len]``."""
    return source.reshape(-1, 1).expand(-1, seq_len)


@torch.no_grad()
def source_head_scores(
    h: torch.Tensor,
    targets: torch.Tensor,
    source_ids: torch.Tensor,
    G: torch.Tensor,
    num_sources: int,
    *,
    logits: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    loss_fn: TokenLossFn | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> SourceScores:
    """All K inner products ``<G, grad_W L_k>`` in one pass (sums and counts; see :class:`SourceScores`).

    ``h`` ``[..., d]``, ``targets`` and ``source_ids`` ``[...]`` (per token; use
    :func:`per_token_source` for per-sequence ids), ``G`` the target head gradient ``[V, d]`` whose
    dtype is the compute dtype. Per token: ``s_t = r_t . (G h_t) = (r_t G) . h_t``; the residuals
    ``r`` (``softmax(z) - onehot(y)`` for cross-entropy) are formed in the compute dtype, and the
    ``[c, V] x [V, d]`` product ``r G`` runs in the logits' dtype when they are lower precision
    (bf16 autocast: tensor cores, float32 accumulation), so no ``[c, V]`` product is materialised
    beyond ``r``. Then sums by source (:func:`segment_sums`). Cost O(N V d), independent of
    ``num_sources``.
    Source ids on the CPU are range-checked; ids on an accelerator are not (checking would wait for
    the device; :func:`~fastmix_data.search.trainer.run_search` checks them before the transfer).
    """
    h, targets, logits, src = _prep(h, targets, logits, mask, source_ids)
    dtype, dev = G.dtype, G.device
    n = h.shape[0]
    if n and src.device.type == "cpu" and (int(src.min()) < 0 or int(src.max()) >= num_sources):
        raise ValueError(f"source ids must lie in [0, {num_sources}), got range [{int(src.min())}, {int(src.max())}]")
    low = logits.dtype if logits is not None and logits.dtype in LOW_PRECISION else None
    if logits is None and h.dtype in LOW_PRECISION:
        low = h.dtype  # the logits are computed in h's precision (see _chunk_logits)
    G_mm = G.to(low) if low is not None else G
    scores = torch.empty(n, dtype=dtype, device=dev)
    losses = torch.empty(n, dtype=dtype, device=dev)
    for i in range(0, n, chunk_tokens):
        j = min(n, i + chunk_tokens)
        z = _chunk_logits(h[i:j], logits, i, j, head_weight, dtype)
        h_c = h[i:j].to(dtype)
        r, loss = logit_residuals(z, targets[i:j], loss_fn, dtype)
        del z
        rG = (r.to(low) @ G_mm).to(dtype) if low is not None else r @ G_mm  # [c, d]
        scores[i:j] = (rG * h_c).sum(-1)
        losses[i:j] = loss
    src = src.to(dev)
    return SourceScores(
        segment_sums(scores, src, num_sources),
        segment_sums(torch.ones_like(scores), src, num_sources),
        segment_sums(losses, src, num_sources),
    )


def softmax_chain_rule(
    s: torch.Tensor, g: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient w.r.t. the logits z of ``alpha = softmax(z) = s`` given ``g = dL/dalpha``:
    ``s * (g - <s, g>)``.

    With ``present`` (bool ``[K]``), only present sources take part: the mean ``<s, g>`` is taken
    over present sources with ``s`` renormalised over them, and absent sources get exactly 0, so a
    source missing from the search batch is neither pushed down nor up (defect 3 of the reference).
    """
    if present is None:
        present = torch.ones_like(s, dtype=torch.bool)
    present = present.to(s.device)
    g = torch.where(present, g, torch.zeros_like(g))
    sp = torch.where(present, s, torch.zeros_like(s))
    total = sp.sum()
    if total <= 0:
        return torch.zeros_like(s)
    mean = (sp * g).sum() / total
    return torch.where(present, s * (g - mean), torch.zeros_like(s))


class GradientEMA:
    """Exponential moving average of a gradient (a tensor or a list of tensors) across target batches.

    ``beta=0`` keeps only the latest gradient. The first update initialises the average (no bias
    correction needed)."""

    def __init__(self, beta: float = 0.0):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must lie in [0, 1), got {beta}")
        self.beta = beta
        self.value: torch.Tensor | list[torch.Tensor] | None = None
        self.updates = 0

    def update(self, g):
        b = self.beta
        if self.value is None or b == 0.0:
            self.value = [t.detach().clone() for t in g] if isinstance(g, (list, tuple)) else g.detach().clone()
        elif isinstance(g, (list, tuple)):
            for v, t in zip(self.value, g):
                v.mul_(b).add_(t.detach(), alpha=1 - b)
        else:
            self.value.mul_(b).add_(g.detach(), alpha=1 - b)
        self.updates += 1
        return self.value

    def state_dict(self) -> dict:
        v = self.value
        if isinstance(v, list):
            v = [t.cpu() for t in v]
        elif v is not None:
            v = v.cpu()
        return {"beta": self.beta, "value": v, "updates": self.updates}

    def load_state_dict(self, d: dict, device=None) -> None:
        self.beta = d["beta"]
        v = d["value"]
        if isinstance(v, (list, tuple)):
            v = [t.to(device) for t in v]
        elif v is not None:
            v = v.to(device)
        self.value = v
        self.updates = d["updates"]


# ----------------------------------------------------------------------------- tied head
#
# When the head shares its matrix E (V x d) with the input embedding, the gradient of a loss with
# respect to E has a second part: besides the head's ``sum_t r_t h_t^T``, every input token x_s
# adds the gradient at its embedding row, ``e_{x_s} (dl/de_s)^T``. The first-order hypergradient
# of the tied model is the inner product of the *full* gradients, so both the target gradient
# ``G_T`` and every source's gradient carry both parts:
#
#     <G_T, grad_E L_k> = mean_{t in k} (r_t G_T) . h_t  +  sum_{s in k} G_T[x_s] . dL_k/de_s / n_k
#
# The second term needs dL/de, a backward through the trunk: for the target, once per outer step
# (:func:`tied_head_gradient`); for trained tokens the training step's own backward already has it
# (the gradient at the embedding output, divided by each sequence's loss weight: sequences do not
# attend to each other, so it is that sequence's own gradient); :func:`tied_source_scores` runs it
# for a buffered search batch. Scoring the head part alone would be the hypergradient of a model
# whose head were a separate copy -- not the model being trained.


def embedding_gradient(ids: torch.Tensor, grad_e: torch.Tensor, num_embeddings: int, dtype=torch.float32) -> torch.Tensor:
    """``sum_t e_{ids_t} grad_e_t^T`` ``[num_embeddings, d]``: the gradient of an embedding matrix given
    the gradients ``grad_e`` ``[n, d]`` at its lookups ``ids`` ``[n]``.

    Bitwise reproducible on every device: the rows are sorted by id and summed by a float64 running
    sum (an ``index_add_`` on CUDA adds with atomics in a varying order)."""
    ids = ids.reshape(-1)
    grad_e = grad_e.reshape(ids.shape[0], grad_e.shape[-1])
    out = torch.zeros(num_embeddings, grad_e.shape[1], dtype=dtype, device=grad_e.device)
    if ids.numel() == 0:
        return out
    order = torch.argsort(ids, stable=True)
    uniq, counts = torch.unique_consecutive(ids[order], return_counts=True)
    csum = grad_e[order].to(torch.float64).cumsum(0)
    ends = csum[counts.cumsum(0) - 1]
    sums = torch.diff(ends, dim=0, prepend=torch.zeros_like(ends[:1]))
    out[uniq.to(out.device)] = sums.to(dtype)
    return out


def embedding_scores(ids: torch.Tensor, grad_e: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per-sequence embedding part of the tied scores: ``sum_s G[ids_s] . grad_e_s`` ``[B]`` for ids
    ``[B, L]`` and gradients at the embedding output ``[B, L, d]``, in ``G``'s dtype."""
    B = ids.shape[0]
    rows = G[ids.reshape(-1).to(G.device)]
    return (rows * grad_e.reshape(rows.shape).to(G.dtype)).reshape(B, -1).sum(1)


def _embedding_leaf_pass(model, x, autocast):
    """``(e, h)``: the embedding output as a leaf (its gradient is the embedding part) and the trunk's output."""
    e = model.embed(x).detach().requires_grad_(True)
    with autocast:
        h = model.trunk(e)
    return e, h


def _summed_loss(h, W, y, w, loss_fn, chunk_tokens):
    """``sum_t w_t l_t`` differentiable w.r.t. ``h`` (the fused head when the loss is cross-entropy)."""
    if loss_fn is None:
        return fused_head_loss(h, W, y, w, chunk_tokens=chunk_tokens).loss
    return (w * token_losses(h @ W.T.to(h.dtype), y, loss_fn)).sum()


def tied_head_gradient(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    loss_mask: torch.Tensor | None = None,
    loss_fn: TokenLossFn | None = None,
    autocast: AbstractContextManager | None = None,
    dtype: torch.dtype = torch.float32,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    weights: torch.Tensor | None = None,
) -> HeadGradient:
    """:func:`head_gradient` for a tied head/embedding matrix: the full gradient of the (masked,
    optionally weighted) token-mean loss of ``tokens`` ``[B, L+1]`` -- the head part in closed form
    plus the embedding part, from one backward to the embedding output (``torch.autograd.grad``; no
    ``.grad`` buffer is touched). ``weights``: per-token ``[B, L]`` or per-sequence ``[B, 1]`` loss
    weights. ``model`` has ``embed`` and ``trunk`` (see :func:`~fastmix_data.search.model.head_is_tied`)."""
    x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    W = model.head.weight.detach()
    m = torch.ones_like(y, dtype=torch.bool) if loss_mask is None else loss_mask.reshape(-1).bool().to(y.device)
    n = int(m.sum())
    w = m.to(torch.float64)
    if weights is not None:
        weights = torch.as_tensor(weights).to(y.device, torch.float64).expand(tokens[:, 1:].shape).reshape(-1)
        w = w * weights
    with torch.enable_grad():
        e, h = _embedding_leaf_pass(model, x, autocast or nullcontext())
        h = h.reshape(y.shape[0], -1)
        with autocast or nullcontext():
            loss = _summed_loss(h, W, y, w / max(n, 1), loss_fn, chunk_tokens)
        (ge,) = torch.autograd.grad(loss, e)
    hg = head_gradient(h.detach(), y, head_weight=W, mask=m, loss_fn=loss_fn, dtype=dtype, chunk_tokens=chunk_tokens,
                       weights=weights)
    G = hg.grad + embedding_gradient(x, ge, W.shape[0], dtype) if n else hg.grad
    return HeadGradient(grad=G, loss=hg.loss, tokens=hg.tokens)


def tied_source_scores(
    model: nn.Module,
    tokens: torch.Tensor,
    source: torch.Tensor,
    G: torch.Tensor,
    num_sources: int,
    *,
    loss_fn: TokenLossFn | None = None,
    autocast: AbstractContextManager | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> SourceScores:
    """:func:`source_head_scores` for a tied head: per source, ``<G, grad_E L_k>`` with both parts of
    the tied gradient, for sequences ``tokens`` ``[B, L+1]`` of per-sequence ``source`` ``[B]``. One
    forward and one backward to the embedding output (the embedding part)."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    B, L = y.shape
    W = model.head.weight.detach()
    with torch.enable_grad():
        e, h = _embedding_leaf_pass(model, x, autocast or nullcontext())
        h = h.reshape(B * L, -1)
        with autocast or nullcontext():
            loss = _summed_loss(h, W, y.reshape(-1), torch.ones(B * L, dtype=G.dtype, device=h.device), loss_fn, chunk_tokens)
        (ge,) = torch.autograd.grad(loss, e)  # dS_b/de_b for every sequence b at once
    out = source_head_scores(
        h.detach(), y, per_token_source(source, L), G, num_sources, head_weight=W, loss_fn=loss_fn, chunk_tokens=chunk_tokens
    )
    out.sums += segment_sums(embedding_scores(x, ge, G).to(out.sums.dtype), source.to(out.sums.device), num_sources)
    return out


# ----------------------------------------------------------------------------- full-parameter variant


def _forward_token_losses(model, tokens, loss_fn, autocast):
    x, y = tokens[:, :-1], tokens[:, 1:]
    with autocast:
        h = model.final_hidden(x)
        logits = model.head(h)
    B, L = y.shape
    return token_losses(logits.reshape(B * L, -1), y.reshape(-1), loss_fn).view(B, L)


def full_target_gradient(
    model: nn.Module,
    tokens: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    loss_mask: torch.Tensor | None = None,
    loss_fn: TokenLossFn | None = None,
    autocast: AbstractContextManager | None = None,
) -> tuple[list[torch.Tensor], float, int]:
    """``(grads, loss, tokens)``: gradient of the (masked) token-mean target loss w.r.t. ``params``,
    through ``torch.autograd.grad`` (``.grad`` buffers untouched)."""
    with torch.enable_grad():
        tl = _forward_token_losses(model, tokens, loss_fn, autocast or nullcontext())
        if loss_mask is not None:
            m = loss_mask.to(tl.device).bool()
            n = int(m.sum())
            loss = (tl * m).sum() / max(n, 1)
        else:
            n = tl.numel()
            loss = tl.mean()
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach().float() for g, p in zip(grads, params)]
    return grads, float(loss.detach()), n


def full_source_scores(
    model: nn.Module,
    tokens: torch.Tensor,
    source: torch.Tensor,
    target_grads: Sequence[torch.Tensor],
    num_sources: int,
    params: Sequence[torch.Tensor],
    *,
    loss_fn: TokenLossFn | None = None,
    autocast: AbstractContextManager | None = None,
) -> SourceScores:
    """Full-parameter inner products ``<grad L_T, grad L_k>`` for every source present in
    ``tokens`` (``[B, L+1]``, per-sequence ``source`` ``[B]``): one forward, then one
    ``torch.autograd.grad`` per present source (cost grows linearly with K). Returned as
    :class:`SourceScores` (``sums = mean * count``) so it plugs in where the head scores do."""
    params = list(params)
    dev = tokens.device
    out = SourceScores.zeros(num_sources, dtype=torch.float64, device=dev)
    with torch.enable_grad():
        tl = _forward_token_losses(model, tokens, loss_fn, autocast or nullcontext())
        seq_sum = tl.sum(1)
        L = tl.shape[1]
        src = source.to(dev)
        present = torch.unique(src).tolist()
        for i, k in enumerate(present):
            sel = src == k
            n_k = int(sel.sum()) * L
            loss_k = seq_sum[sel].sum() / n_k
            grads = torch.autograd.grad(
                loss_k, params, retain_graph=i < len(present) - 1, allow_unused=True
            )
            ip = sum(
                (g.double() * t.double()).sum() for g, t in zip(grads, target_grads) if g is not None
            )
            out.sums[k] = ip * n_k
            out.counts[k] = n_k
            out.loss_sums[k] = float(seq_sum[sel].sum().detach())
    return out


__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "GradientEMA",
    "embedding_gradient",
    "embedding_scores",
    "HeadGradient",
    "SourceScores",
    "TokenLossFn",
    "full_source_scores",
    "full_target_gradient",
    "head_gradient",
    "logit_residuals",
    "per_token_source",
    "segment_sums",
    "softmax_chain_rule",
    "source_head_scores",
    "tied_head_gradient",
    "tied_source_scores",
    "token_losses",
]
