"""The one-pass LM-head hypergradient against autograd (float64), the softmax chain rule, the full
variant, and the alpha-sampling identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmix_data.search.fastmix import loss_weights
from fastmix_data.search.hypergrad import (
    GradientEMA,
    embedding_gradient,
    embedding_scores,
    full_source_scores,
    full_target_gradient,
    head_gradient,
    logit_residuals,
    per_token_source,
    softmax_chain_rule,
    source_head_scores,
    tied_head_gradient,
    tied_source_scores,
)
from fastmix_data.search.model import build_proxy, proxy_config

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning
    OpenMP threads make them many times slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(N=60, d=6, V=11, K=4, seed=0, absent=(3,)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=F64)
    W = torch.randn(V, d, generator=g, dtype=F64)
    y = torch.randint(0, V, (N,), generator=g)
    choices = [k for k in range(K) if k not in absent]
    src = torch.tensor(choices)[torch.randint(0, len(choices), (N,), generator=g)]
    G = torch.randn(V, d, generator=g, dtype=F64)
    return h, W, y, src, G


def _autograd_scores(h, W, y, src, G, K, loss=None, mask=None):
    out = torch.full((K,), torch.nan, dtype=F64)
    for k in range(K):
        sel = src == k
        if mask is not None:
            sel = sel & mask
        if not sel.any():
            continue
        Wv = W.clone().requires_grad_(True)
        logits = h[sel] @ Wv.T
        lk = (F.cross_entropy(logits, y[sel], reduction="none") if loss is None else loss(logits, y[sel])).mean()
        (gW,) = torch.autograd.grad(lk, Wv)
        out[k] = (G * gW).sum()
    return out


def _label_smoothed(logits, targets):
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("via", ["logits", "head_weight"])
@pytest.mark.parametrize("chunk", [7, 4096])
def test_one_pass_head_scores_match_autograd(via, chunk):
    K = 4
    h, W, y, src, G = _problem(K=K, absent=(2,))
    ref = _autograd_scores(h, W, y, src, G, K)
    kw = {"logits": h @ W.T} if via == "logits" else {"head_weight": W}
    sc = source_head_scores(h, y, src, G, K, chunk_tokens=chunk, **kw)
    got = sc.means()
    assert torch.isnan(got[2]) and torch.isnan(ref[2])  # the absent source
    assert sc.counts[2] == 0 and not sc.present[2]
    pres = ~torch.isnan(ref)
    torch.testing.assert_close(got[pres], ref[pres], rtol=1e-10, atol=1e-12)
    # per-source losses come along
    for k in (0, 1, 3):
        torch.testing.assert_close(sc.losses()[k], F.cross_entropy(h[src == k] @ W.T, y[src == k]), rtol=1e-12, atol=0)


def test_one_pass_custom_loss_and_mask_match_autograd():
    K = 3
    h, W, y, src, G = _problem(N=50, K=K, absent=())
    mask = torch.arange(50) % 3 != 0
    ref = _autograd_scores(h, W, y, src, G, K, loss=_label_smoothed, mask=mask)
    got = source_head_scores(h, y, src, G, K, logits=h @ W.T, loss_fn=_label_smoothed, mask=mask).means()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_low_precision_logits_run_the_product_in_their_dtype_and_stay_close():
    """bf16 logits (autocast): the [c, V] x [V, d] product runs in bf16 with float32 accumulation.
    Against float64 autograd on the same (bf16-rounded) inputs the per-source scores stay within
    0.3 %, and every source keeps its rank."""
    K = 4
    g = torch.Generator().manual_seed(5)
    N, d, V = 3000, 64, 500
    h = torch.randn(N, d, generator=g, dtype=F64).to(torch.bfloat16).to(F64)
    W = (torch.randn(V, d, generator=g, dtype=F64) / d**0.5).to(torch.bfloat16).to(F64)
    y = torch.randint(0, V, (N,), generator=g)
    src = torch.randint(0, K, (N,), generator=g)
    # a target gradient that separates the sources: each one's residual direction, weighted
    G = sum((k + 1) * head_gradient(h[src == k], y[src == k], head_weight=W, dtype=F64).grad for k in range(K))
    ref = _autograd_scores(h, W, y, src, G, K)
    logits = (h @ W.T).to(torch.bfloat16)
    got = source_head_scores(h.to(torch.bfloat16), y, src, G.float(), K, logits=logits).means()
    assert got.dtype == torch.float32
    assert float((got.double() - ref).norm() / ref.norm()) < 3e-3
    assert torch.equal(got.argsort(), ref.argsort())
    # the same rounded inputs in float32: identical but for the bf16 product, which adds under 0.3 %
    f32 = source_head_scores(h.float(), y, src, G.float(), K, logits=logits.float()).means()
    assert not torch.equal(got, f32)  # the product did run in bf16
    assert float((got - f32).norm() / f32.norm()) < 3e-3


def test_bf16_target_gradient_from_the_head_weight_stays_close():
    """bf16 hidden states with the head weight (the target pass under autocast): chunk products in
    bf16 with float32 accumulation, within the bf16 rounding of the float64 gradient."""
    g = torch.Generator().manual_seed(6)
    N, d, V = 3000, 64, 500
    h = torch.randn(N, d, generator=g, dtype=F64).to(torch.bfloat16)
    W = (torch.randn(V, d, generator=g, dtype=F64) / d**0.5).to(torch.bfloat16).to(F64)
    y = torch.randint(0, V, (N,), generator=g)
    ref = head_gradient(h.to(F64), y, head_weight=W, dtype=F64, chunk_tokens=700)
    got = head_gradient(h, y, head_weight=W.float(), chunk_tokens=700)
    assert got.grad.dtype == torch.float32
    rel = float((got.grad.double() - ref.grad).norm() / ref.grad.norm())
    assert 1e-5 < rel < 1e-2  # bf16 products (so not float32), and close: measured 1.9e-3
    assert got.loss == pytest.approx(ref.loss, rel=1e-2)


def test_segment_sums_one_hot_path_equals_index_add():
    """The accelerator path (a product with the one-hot matrix, reproducible where index_add_ is
    not) gives the CPU path's sums; absent ids get 0."""
    from fastmix_data.search.hypergrad import _onehot_segment_sums, segment_sums

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 5, (1000,), generator=g)
    ids[ids == 3] = 4
    for values in (torch.randn(1000, generator=g, dtype=F64), torch.ones(1000)):
        ref = segment_sums(values, ids, 6)
        got = _onehot_segment_sums(values, ids, 6)
        assert got.dtype == values.dtype and got.shape == (6,)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        assert got[3] == 0 and got[5] == 0
    assert torch.equal(_onehot_segment_sums(torch.ones(1000), ids, 6), torch.bincount(ids, minlength=6).float())


def test_scores_accept_batched_shapes_and_add_up():
    K = 3
    g = torch.Generator().manual_seed(3)
    B, L, d, V = 4, 5, 6, 9
    h = torch.randn(B, L, d, generator=g, dtype=F64)
    W = torch.randn(V, d, generator=g, dtype=F64)
    y = torch.randint(0, V, (B, L), generator=g)
    source = torch.tensor([0, 2, 2, 0])
    G = torch.randn(V, d, generator=g, dtype=F64)
    whole = source_head_scores(h, y, per_token_source(source, L), G, K, head_weight=W)
    parts = source_head_scores(h[:2], y[:2], per_token_source(source[:2], L), G, K, head_weight=W) + source_head_scores(
        h[2:], y[2:], per_token_source(source[2:], L), G, K, head_weight=W
    )
    torch.testing.assert_close(whole.means(), parts.means(), equal_nan=True)
    ref = _autograd_scores(h.reshape(-1, d), W, y.reshape(-1), per_token_source(source, L).reshape(-1), G, K)
    torch.testing.assert_close(whole.means(), ref, equal_nan=True, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="source ids"):
        source_head_scores(h, y, per_token_source(source, L), G, 2, head_weight=W)


@pytest.mark.parametrize("loss", [None, _label_smoothed])
def test_closed_form_target_head_gradient_matches_autograd(loss):
    h, W, y, _, _ = _problem(N=40)
    mask = torch.rand(40, generator=torch.Generator().manual_seed(1)) < 0.6
    Wv = W.clone().requires_grad_(True)
    logits = h[mask] @ Wv.T
    lt = (F.cross_entropy(logits, y[mask], reduction="none") if loss is None else loss(logits, y[mask])).mean()
    (ref,) = torch.autograd.grad(lt, Wv)
    hg = head_gradient(h, y, logits=h @ W.T, mask=mask, loss_fn=loss, dtype=F64, chunk_tokens=9)
    torch.testing.assert_close(hg.grad, ref, rtol=1e-10, atol=1e-12)
    assert hg.tokens == int(mask.sum())
    assert hg.loss == pytest.approx(float(lt.detach()), rel=1e-12)


def test_logit_residuals_closed_form_equals_autograd():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 10, generator=g, dtype=F64)
    y = torch.randint(0, 10, (7,), generator=g)
    r, loss = logit_residuals(z, y)
    r2, loss2 = logit_residuals(z, y, loss_fn=lambda a, b: F.cross_entropy(a, b, reduction="none"))
    torch.testing.assert_close(r, r2)
    torch.testing.assert_close(loss, loss2)


def test_softmax_chain_rule_matches_autograd():
    g = torch.Generator().manual_seed(2)
    for K in (1, 2, 5):
        z = torch.randn(K, generator=g, dtype=F64, requires_grad=True)
        gv = torch.randn(K, generator=g, dtype=F64)
        (ref,) = torch.autograd.grad((torch.softmax(z, 0) * gv).sum(), z)
        got = softmax_chain_rule(torch.softmax(z.detach(), 0), gv)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_softmax_chain_rule_present_only_is_renormalised_objective():
    """Centring over present sources == gradient of the objective of the mixture renormalised over
    the present sources (scaled by their total mass); absent sources get exactly 0."""
    g = torch.Generator().manual_seed(4)
    K = 5
    present = torch.tensor([True, False, True, True, False])
    z = torch.randn(K, generator=g, dtype=F64, requires_grad=True)
    gv = torch.randn(K, generator=g, dtype=F64)
    s = torch.softmax(z, 0)
    sp = s[present]
    f = (sp * gv[present]).sum() / sp.sum()
    (ref,) = torch.autograd.grad(f, z)
    sd = s.detach()
    got = softmax_chain_rule(sd, torch.where(present, gv, torch.nan), present)
    torch.testing.assert_close(got, sd[present].sum() * ref, rtol=1e-12, atol=1e-14)
    assert (got[~present] == 0).all()


def test_gradient_ema():
    e = GradientEMA(0.5)
    e.update(torch.tensor([2.0]))
    e.update(torch.tensor([4.0]))
    assert e.value.item() == 3.0
    e0 = GradientEMA(0.0)
    e0.update([torch.tensor([1.0])])
    e0.update([torch.tensor([5.0])])
    assert e0.value[0].item() == 5.0
    with pytest.raises(ValueError):
        GradientEMA(1.0)


def _tiny_model(vocab=13):
    return build_proxy(proxy_config("tiny", vocab_size=vocab), seed=0).double()


def test_full_variant_on_head_only_equals_one_pass():
    """The full-parameter variant restricted to the head weight gives the one-pass numbers."""
    torch.manual_seed(0)
    m = _tiny_model()
    V = m.head.out_features
    g = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, V, (6, 9), generator=g)
    source = torch.tensor([0, 1, 0, 1, 3, 3])  # source 2 absent
    target = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.rand(3, 8, generator=g) < 0.7
    K = 4
    (Gf,), lt, n = full_target_gradient(m, target, [m.head.weight], loss_mask=mask)
    full = full_source_scores(m, tokens, source, [Gf.double()], K, [m.head.weight])
    with torch.no_grad():
        ht = m.final_hidden(target[:, :-1])
        hg = head_gradient(ht, target[:, 1:], head_weight=m.head.weight, mask=mask, dtype=F64)
        torch.testing.assert_close(hg.grad.float(), Gf, rtol=1e-5, atol=1e-7)
        h = m.final_hidden(tokens[:, :-1])
        one = source_head_scores(h, tokens[:, 1:], per_token_source(source, 8), hg.grad, K, head_weight=m.head.weight)
    torch.testing.assert_close(full.means(), one.means(), equal_nan=True, rtol=1e-5, atol=1e-9)
    assert torch.isnan(full.means()[2])
    assert all(p.grad is None for p in m.parameters())  # autograd.grad never touches .grad


def test_full_variant_matches_per_source_autograd_all_params():
    m = _tiny_model()
    params = list(m.parameters())
    V = m.head.out_features
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, V, (4, 7), generator=g)
    source = torch.tensor([1, 0, 1, 1])
    target = torch.randint(0, V, (2, 7), generator=g)
    G, _, _ = full_target_gradient(m, target, params)
    got = full_source_scores(m, tokens, source, G, 2, params).means()
    for k in (0, 1):
        sel = source == k
        lk = F.cross_entropy(m(tokens[sel, :-1]).reshape(-1, V), tokens[sel, 1:].reshape(-1))
        gk = torch.autograd.grad(lk, params)
        ref = sum((a.double() * b.double()).sum() for a, b in zip(gk, G))
        assert float(got[k]) == pytest.approx(float(ref), rel=1e-6)
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("serve", [None, (0.5, 0.3, 0.2)])
def test_alpha_sampling_equals_weighted_uniform_sampling_exactly(serve):
    """E[grad] of training on an alpha-sampled stream == E[grad] of training on a stream that serves
    sources with probabilities `serve` (uniform by default) with loss weights alpha/serve, computed
    as exact expectations over every one-sequence batch."""
    m = _tiny_model(vocab=11)
    params = list(m.parameters())
    K = 3
    g = torch.Generator().manual_seed(11)
    data = [torch.randint(0, 11, (n, 6), generator=g) for n in (2, 3, 1)]  # source k's sequences
    alpha = torch.tensor([0.6, 0.1, 0.3], dtype=F64)
    pi = torch.full((K,), 1 / K, dtype=F64) if serve is None else torch.tensor(serve, dtype=F64)
    w = loss_weights(alpha, pi, dtype=F64)

    def grad_of(seq, weight):
        loss = weight * F.cross_entropy(m(seq[None, :-1])[0], seq[1:])
        return torch.autograd.grad(loss, params)

    def expect(prob_of_source, weight_of_source):
        acc = [torch.zeros_like(p) for p in params]
        for k, seqs in enumerate(data):
            for seq in seqs:
                p = prob_of_source[k] / len(seqs)
                for a, gr in zip(acc, grad_of(seq, weight_of_source[k])):
                    a += p * gr
        return acc

    sampled = expect(alpha, torch.ones(K, dtype=F64))
    weighted = expect(pi, w)
    for a, b in zip(sampled, weighted):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_stratified_batch_weighted_loss_is_alpha_mixture_of_source_losses():
    """On a stratified batch (one sequence per source) the trainer's loss (K*alpha weights, batch
    mean) is exactly sum_k alpha_k L_k."""
    m = _tiny_model(vocab=11)
    g = torch.Generator().manual_seed(12)
    tokens = torch.randint(0, 11, (3, 6), generator=g)
    source = torch.tensor([0, 1, 2])
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    w = loss_weights(alpha, torch.full((3,), 1 / 3, dtype=F64), dtype=F64)
    per_seq = F.cross_entropy(m(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)
    trainer_loss = (w[source] * per_seq).mean()
    torch.testing.assert_close(trainer_loss, (alpha * per_seq).sum())


def test_no_trunk_grad_needed():
    """The one-pass scores run under no_grad on detached inputs."""
    h, W, y, src, G = _problem()
    h.requires_grad_(True)
    sc = source_head_scores(h, y, src, G, 4, head_weight=W)
    assert not sc.sums.requires_grad



# ---------------------------------------------------------------------------- tied head


def _tied(vocab=13, seed=0):
    return build_proxy(proxy_config("tiny", vocab_size=vocab, tie_embeddings=True), seed=seed).double()


def _full_tied_grad(m, tokens, mask=None, loss=None, weights=None):
    V = m.head.out_features
    logits = m(tokens[:, :-1]).reshape(-1, V)
    y = tokens[:, 1:].reshape(-1)
    tl = F.cross_entropy(logits, y, reduction="none") if loss is None else loss(logits, y)
    if weights is not None:
        tl = tl * weights.expand(tokens[:, 1:].shape).reshape(-1)
    if mask is not None:
        tl = tl[mask.reshape(-1)]
    (g,) = torch.autograd.grad(tl.mean(), m.embed.weight)
    return g


def test_weighted_head_gradients_equal_autograd():
    """Per-sequence loss weights (the alpha-weighted training loss): untied closed form and tied
    head + embedding parts against autograd."""
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 13, (4, 7), generator=g)
    seq_w = torch.tensor([[0.5], [2.0], [1.0], [0.25]], dtype=F64)
    mask = torch.rand(4, 6, generator=g) < 0.8
    m = _tied()
    got = tied_head_gradient(m, tokens, loss_mask=mask, weights=seq_w, dtype=F64, chunk_tokens=5)
    torch.testing.assert_close(got.grad, _full_tied_grad(m, tokens, mask, weights=seq_w), rtol=1e-11, atol=1e-14)
    u = _tiny_model()
    with torch.no_grad():
        h = u.final_hidden(tokens[:, :-1])
    got = head_gradient(h, tokens[:, 1:], head_weight=u.head.weight, mask=mask, weights=seq_w, dtype=F64, chunk_tokens=4)
    W = u.head.weight.detach().clone().requires_grad_(True)
    tl = F.cross_entropy(h.reshape(-1, 32) @ W.T, tokens[:, 1:].reshape(-1), reduction="none")
    lw = (tl * seq_w.expand(4, 6).reshape(-1))[mask.reshape(-1)].mean()
    (ref,) = torch.autograd.grad(lw, W)
    torch.testing.assert_close(got.grad, ref, rtol=1e-11, atol=1e-14)
    assert got.loss == pytest.approx(float(lw.detach()), rel=1e-12)


@pytest.mark.parametrize("loss", [None, _label_smoothed])
def test_tied_head_gradient_is_the_full_gradient_of_the_shared_matrix(loss):
    """Head part (closed form) + embedding part (one backward to the embedding output) == autograd's
    gradient of the tied matrix; the head part alone is not."""
    m = _tied()
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 13, (3, 9), generator=g)
    mask = torch.rand(3, 8, generator=g) < 0.7
    ref = _full_tied_grad(m, target, mask, loss)
    hg = tied_head_gradient(m, target, loss_mask=mask, loss_fn=loss, dtype=F64, chunk_tokens=5)
    torch.testing.assert_close(hg.grad, ref, rtol=1e-11, atol=1e-14)
    assert hg.tokens == int(mask.sum())
    with torch.no_grad():
        head_only = head_gradient(m.final_hidden(target[:, :-1]), target[:, 1:], head_weight=m.head.weight, mask=mask, dtype=F64)
    assert float((head_only.grad - ref).norm()) > 0.1 * float(ref.norm())  # the embedding part matters
    assert all(p.grad is None for p in m.parameters())


def test_tied_source_scores_equal_per_source_autograd_inner_products():
    m = _tied()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 13, (6, 9), generator=g)
    source = torch.tensor([0, 1, 0, 1, 3, 3])  # source 2 absent
    G = tied_head_gradient(m, torch.randint(0, 13, (3, 9), generator=g), dtype=F64).grad
    sc = tied_source_scores(m, tokens, source, G, 4, chunk_tokens=7)
    for k in (0, 1, 3):
        ref = (_full_tied_grad(m, tokens[source == k]) * G).sum()
        torch.testing.assert_close(sc.means()[k], ref, rtol=1e-11, atol=1e-14)
    assert torch.isnan(sc.means()[2]) and sc.counts.tolist() == [16, 16, 0, 16]
    assert all(p.grad is None for p in m.parameters())


def test_tied_scores_from_a_training_backward():
    """What the trainer does: the gradient at the embedding output of a weighted training loss,
    divided by each sequence's weight, gives the embedding part; plus the fused head's scores it
    equals tied_source_scores."""
    from fastmix_data.search.fused_head import fused_head_loss

    m = _tied()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 13, (4, 7), generator=g)
    source = torch.tensor([2, 0, 2, 1])
    G = torch.randn(13, 32, generator=g, dtype=F64)
    x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    seq_w = torch.tensor([0.5, 2.0, 0.25, 1.0], dtype=F64) / 24  # alpha/serve / (B L)
    captured = []
    e = m.embed(x)
    e.register_hook(captured.append)
    h = m.trunk(e).reshape(-1, 32)
    out = fused_head_loss(h, m.head.weight, y, per_token_source(seq_w, 6).reshape(-1), G=G, chunk_tokens=5)
    out.loss.backward()
    per_seq = out.scores.view(4, 6).sum(1) + embedding_scores(x, captured[0], G) / seq_w
    got = torch.zeros(3, dtype=F64).index_add_(0, source, per_seq)
    ref = tied_source_scores(m, tokens, source, G, 3)
    torch.testing.assert_close(got, ref.sums, rtol=1e-11, atol=1e-13)


def test_embedding_gradient_equals_index_add_and_is_reproducible():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 50, (3, 40), generator=g)
    ge = torch.randn(3, 40, 8, generator=g)
    ref = torch.zeros(50, 8, dtype=F64).index_add_(0, ids.reshape(-1), ge.reshape(-1, 8).double())
    got = embedding_gradient(ids, ge, 50, dtype=F64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(embedding_gradient(ids, ge, 50), embedding_gradient(ids, ge, 50))
    assert embedding_gradient(ids[:, :0], ge[:, :0], 50).abs().sum() == 0
