"""The LM head's loss, its gradients and FastMix's one-pass scores in one chunked pass over the logits.

A proxy's training step ends in ``logits = h W^T`` (``[N, V]``), a cross-entropy and its backward,
and FastMix then scores every trained token: ``s_t = (r_t G) . h_t`` with ``r_t = softmax(z_t) -
e_{y_t}`` (see :mod:`~fastmix_data.search.hypergrad`). Done separately that is three passes over
``[N, V]`` -- the loss's forward, its backward, and the scores' own softmax -- with ``[N, V]``
float32 tensors in between. But ``r_t`` *is* the loss's gradient with respect to the logits, so
one pass serves all three. :func:`fused_head_loss` walks the tokens in chunks of ``c``; per chunk:

1. ``z = h_c W^T`` (``[c, V]``, in the compute dtype: bf16 under autocast, tensor cores);
2. one softmax pass in float32 gives the losses ``lse - z_y`` and the residuals ``r`` (rounded back
   to the compute dtype);
3. ``r W`` (``[c, V] x [V, d]``) is the hidden-state gradient (times ``w_t``), and ``r G`` the
   score factor: the score costs one more product of the backward's shape, and no pass over the
   logits of its own. (Two products, not one ``r [W | G]``: a product's rounding can depend on its
   width, and scoring must leave training bitwise unchanged.)
4. ``grad_W += r^T (w h_c)`` (``[V, c] x [c, d]``).

The gradients are computed in the forward and kept (``[N, d]`` and ``[V, d]``), as fused
linear-cross-entropy kernels do; the backward only scales them by the incoming gradient. Only one
chunk's ``[c, V]`` block ever exists, so memory is ``O(c V + N d + V d)`` instead of ``O(N V)``.
Chunks run over tokens, not over the vocabulary: a token chunk needs one softmax pass and keeps
every product ``[c, d] x [d, V]``-shaped (large, efficient GEMMs), while vocabulary chunks would need
an online log-sum-exp and a second pass to form ``r``. ``chunk_tokens`` bounds ``c``.

The softmax pass is about seven float32 passes over the chunk's ``[c, V]`` block in eager mode;
``residuals=compiled_residuals()`` (what :class:`~fastmix_data.search.proxy_step.ProxyStep` uses
with ``compile=True``) has ``torch.compile`` fuse it into one kernel that reads the logits once or
twice and writes ``r`` once.

Numerics equal the unfused path's: the products run in the compute dtype with float32 accumulation
(what autocast does for ``F.linear``), the softmax, the losses and the gradient accumulation in
float32 (float64 inputs stay float64: the tests compare with autograd in float64).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)

#: default token chunk: ``c * V`` float32 logits per chunk stay under ``2**26`` elements (256 MiB)
CHUNK_ELEMENTS = 2**26


@dataclass
class HeadLoss:
    """What :func:`fused_head_loss` returns.

    Attributes:
        loss: ``sum_t w_t l_t``, a scalar differentiable with respect to ``h`` and ``weight``.
        token_losses: per-token cross-entropy ``l_t`` ``[N]`` (float32, or float64 for float64 inputs), detached.
        scores: FastMix's per-token scores ``(r_t G) . h_t`` ``[N]`` in ``G``'s dtype, detached; None without ``G``.
    """

    loss: torch.Tensor
    token_losses: torch.Tensor
    scores: torch.Tensor | None


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits hold at most :data:`CHUNK_ELEMENTS` (>= 128)."""
    return max(128, CHUNK_ELEMENTS // max(1, vocab_size))


def compute_dtype_for(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``h``'s device, else the wider of the two dtypes."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def fused_head_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    G: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    compute_dtype: torch.dtype | None = None,
    residuals: Callable | None = None,
) -> HeadLoss:
    """Cross-entropy of ``h W^T`` weighted per token, its gradients and (with ``G``) FastMix's scores.

    Args:
        h: final hidden states ``[N, d]`` (any float dtype).
        weight: the head matrix ``W`` ``[V, d]`` (a parameter: gradients flow into it, tied or not).
        targets: next-token ids ``[N]`` in ``[0, V)``.
        token_weights: ``w_t`` ``[N]``: the loss is ``sum_t w_t l_t`` (e.g. ``1/N`` for the mean, or
            the search's ``alpha[source] / serve[source] / N``). Not differentiated.
        G: the target's head gradient ``[V, d]`` (its dtype is the scores' dtype), or None for no scores.
        chunk_tokens: tokens per chunk (default :func:`default_chunk_tokens`).
        compute_dtype: dtype of the products (default: autocast's when it is on, else the inputs').
        residuals: the softmax pass, :func:`softmax_residuals` (default) or :func:`compiled_residuals`.

    Returns:
        :class:`HeadLoss`. Calling ``.backward()`` on ``loss`` adds ``sum_t w_t r_t h_t^T`` to
        ``weight.grad`` and gives ``h`` its gradient, like the unfused cross-entropy would.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be [N, d] and weight [V, d] with the same d, got {tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1] or token_weights.shape != h.shape[:1]:
        raise ValueError(
            f"targets and token_weights must be [N]=[{h.shape[0]}], got {tuple(targets.shape)} and {tuple(token_weights.shape)}"
        )
    if G is not None and G.shape != weight.shape:
        raise ValueError(f"G must have the head's shape {tuple(weight.shape)}, got {tuple(G.shape)}")
    cdt = compute_dtype or compute_dtype_for(h, weight)
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    kernel = residuals or softmax_residuals
    loss, tok, scores = _FusedHeadLoss.apply(h, weight, targets, token_weights, G, chunk, cdt, kernel)
    return HeadLoss(loss, tok, scores)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, G, chunk, cdt, kernel):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            out = _chunked(h, weight, targets, token_weights, G, chunk, cdt, need_h, need_w, kernel)
        loss, tok, scores, grad_h, grad_w = out
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.mark_non_differentiable(tok, *(() if scores is None else (scores,)))
        return loss, tok, scores

    @staticmethod
    def backward(ctx, grad_loss, _grad_tok, _grad_scores):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h.numel() == 0 else (grad_h * grad_loss.to(grad_h.dtype)).to(ctx.h_dtype)
        gw = None if grad_w.numel() == 0 else (grad_w * grad_loss.to(grad_w.dtype)).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None, None


def _chunked(h, weight, targets, token_weights, G, chunk, cdt, need_h, need_w, kernel):
    """The chunk loop of :func:`fused_head_loss` (autocast off; dtypes explicit)."""
    N, d = h.shape
    V = weight.shape[0]
    acc = torch.float32 if cdt in LOW_PRECISION else cdt  # softmax, losses, gradient sums
    W = weight.detach().to(cdt)
    Gc = None if G is None else G.detach().to(cdt)
    w = token_weights.detach().to(h.device, acc)
    tok = torch.empty(N, dtype=acc, device=h.device)
    scores = None if G is None else torch.empty(N, dtype=G.dtype, device=h.device)
    grad_h = torch.empty((N, d) if need_h else (0,), dtype=acc, device=h.device)
    grad_w = torch.zeros((V, d) if need_w else (0,), dtype=acc, device=h.device)
    for i in range(0, N, chunk):
        j = min(N, i + chunk)
        hc = h[i:j].detach().to(cdt)
        r, tok[i:j] = kernel(hc @ W.T, targets[i:j], acc, cdt)
        if need_h:
            grad_h[i:j] = w[i:j, None] * (r @ W).to(acc)
        if G is not None:
            scores[i:j] = ((r @ Gc).to(acc) * hc.to(acc)).sum(-1).to(G.dtype)
        if need_w:
            grad_w += (r.T @ (hc * w[i:j, None].to(cdt))).to(acc)
    loss = (w * tok).sum()
    return loss, tok, scores, grad_h, grad_w


def softmax_residuals(
    z: torch.Tensor, targets: torch.Tensor, acc: torch.dtype, out: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, loss)`` of logits ``z`` ``[c, V]``: ``r = softmax(z) - onehot(y)`` in ``out`` and the
    cross-entropy ``lse(z) - z_y`` in ``acc``, from one float32 (``acc``) pass over ``z``."""
    rows = torch.arange(z.shape[0], device=z.device)
    z_y = z[rows, targets].to(acc)
    e = z.to(acc, copy=True)
    m = e.amax(dim=-1, keepdim=True)
    e.sub_(m).exp_()
    s = e.sum(dim=-1, keepdim=True)
    loss = (m + s.log()).squeeze(-1) - z_y
    e.div_(s)
    e[rows, targets] -= 1
    return e.to(out), loss


_COMPILED: dict[str | None, Callable] = {}


def compiled_residuals(backend: str | None = None) -> Callable:
    """:func:`softmax_residuals` through ``torch.compile`` (``backend`` None: inductor), cached: on a GPU
    one generated kernel instead of the eager passes. Shapes are static: a run compiles twice, for
    the full chunk and the last one."""
    if backend not in _COMPILED:
        kw = {} if backend is None else {"backend": backend}
        _COMPILED[backend] = torch.compile(softmax_residuals, dynamic=False, **kw)
    return _COMPILED[backend]


__all__ = ["CHUNK_ELEMENTS", "compiled_residuals", "HeadLoss", "compute_dtype_for", "default_chunk_tokens", "fused_head_loss", "softmax_residuals"]
