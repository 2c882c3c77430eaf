"""ProxyStep: the fused micro-step against the unfused reference loop, its scores against the
one-pass and tied references (float64), scoring that never changes training, compile, the target
gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastmix_data.search.hypergrad import (
    head_gradient,
    per_token_source,
    source_head_scores,
    tied_head_gradient,
    tied_source_scores,
)
from fastmix_data.search.model import build_proxy, proxy_config
from fastmix_data.search.proxy_step import ProxyStep

F64 = torch.float64
V, B, L, K = 31, 6, 8, 3


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (B, L + 1), generator=g), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(n)]


def _model(tied=False, double=False, **kw):
    m = build_proxy(proxy_config("tiny", vocab_size=V, tie_embeddings=tied, **kw), seed=0)
    return m.double() if double else m


LOSS_W = torch.tensor([0.6, 1.5, 0.9])


def test_micro_steps_equal_the_unfused_training_loop():
    """Fused head, grad accumulation and clipping: the same parameters as the trainer's unfused
    loop (logits, cross-entropy, backward) up to float32 rounding of the two formulas."""
    ref, step_model = _model(), _model()
    ps = ProxyStep(step_model, K, lr=3e-3, grad_accum=2, grad_clip=0.5)
    opt = torch.optim.AdamW(
        [{"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95),
    )
    for i, (tokens, source) in enumerate(_batches(6), start=1):
        out = ps.micro_step(tokens, source, LOSS_W)
        logits = ref(tokens[:, :-1])
        seq = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none").view(B, L).mean(1)
        ((LOSS_W[source] * seq).mean() / 2).backward()
        torch.testing.assert_close(out.seq_losses, seq.detach(), rtol=1e-5, atol=1e-6)
        assert out.finite and out.scores is None
        assert out.losses.counts.tolist() == [2 * L] * 3
        if i % 2 == 0:
            ps.optimizer_step(3e-3)
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(ref.named_parameters(), step_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=2e-6, msg=n)


@pytest.mark.parametrize("tied", [False, True])
def test_scoring_never_changes_training_bitwise(tied):
    a, b = _model(tied), _model(tied)
    pa, pb = ProxyStep(a, K, grad_accum=2), ProxyStep(b, K, grad_accum=2)
    G = torch.randn(V, 32, generator=torch.Generator().manual_seed(1))
    for i, (tokens, source) in enumerate(_batches(4), start=1):
        pa.micro_step(tokens, source, LOSS_W)
        assert pb.micro_step(tokens, source, LOSS_W, G=G).scores is not None
        if i % 2 == 0:
            pa.optimizer_step(1e-2)
            pb.optimizer_step(1e-2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("tied", [False, True])
def test_micro_step_scores_equal_the_reference_scores(tied):
    """Float64: the fused per-source scores of a micro-step equal the one-pass scores (untied) or
    tied_source_scores (tied: head part + embedding part from the training backward) at the
    parameters the micro-step trained at; losses per source come along."""
    m = _model(tied, double=True)
    ps = ProxyStep(m, K, grad_accum=3)
    g = torch.Generator().manual_seed(2)
    G = torch.randn(V, 32, generator=g, dtype=F64)
    for tokens, source in _batches(2, seed=3):
        if tied:
            ref = tied_source_scores(m, tokens, source, G, K)
        else:
            with torch.no_grad():
                h = m.final_hidden(tokens[:, :-1])
            ref = source_head_scores(h, tokens[:, 1:], per_token_source(source, L), G, K, head_weight=m.head.weight)
        out = ps.micro_step(tokens, source, LOSS_W.double(), G=G)
        torch.testing.assert_close(out.scores.sums, ref.sums, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.scores.loss_sums, ref.loss_sums, rtol=1e-12, atol=1e-12)
        assert torch.equal(out.scores.counts, ref.counts)


def test_custom_loss_and_head_bias_take_the_unfused_path():
    def smoothed(z, y):
        return F.cross_entropy(z, y, reduction="none", label_smoothing=0.1)

    m = _model(double=True)
    ps = ProxyStep(m, K, loss_fn=smoothed)
    assert not ps.fused
    tokens, source = _batches(1)[0]
    G = torch.randn(V, 32, generator=torch.Generator().manual_seed(4), dtype=F64)
    with torch.no_grad():
        h = m.final_hidden(tokens[:, :-1])
    ref = source_head_scores(h, tokens[:, 1:], per_token_source(source, L), G, K, head_weight=m.head.weight, loss_fn=smoothed)
    out = ps.micro_step(tokens, source, LOSS_W.double(), G=G)
    torch.testing.assert_close(out.scores.sums, ref.sums, rtol=1e-10, atol=1e-12)
    biased = _model()
    biased.head = torch.nn.Linear(32, V)
    assert not ProxyStep(biased, K).fused


@pytest.mark.parametrize("tied", [False, True])
def test_head_gradient_is_the_head_or_tied_gradient(tied):
    m = _model(tied, double=True)
    ps = ProxyStep(m, K)
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, V, (3, L + 1), generator=g)
    mask = torch.rand(3, L, generator=g) < 0.6
    got = ps.head_gradient(target, mask)
    if tied:
        ref = tied_head_gradient(m, target, loss_mask=mask, dtype=F64)
    else:
        with torch.no_grad():
            ref = head_gradient(m.final_hidden(target[:, :-1]), target[:, 1:], head_weight=m.head.weight, mask=mask, dtype=F64)
    assert got.grad.dtype == F64  # a float64 model gets a float64 target gradient
    torch.testing.assert_close(got.grad, ref.grad, rtol=1e-12, atol=1e-15)
    assert got.tokens == int(mask.sum()) and got.loss == pytest.approx(ref.loss, rel=1e-12)
    assert all(p.grad is None for p in m.parameters())  # target passes never touch .grad


@pytest.mark.parametrize("tied", [False, True])
def test_compiled_trunk_and_checkpointing_train_the_same(tied):
    """torch.compile (dynamo tracing with the eager backend: fast enough for CI) and activation
    checkpointing go through the same micro-step and give the eager model's parameters."""
    plain, comp = _model(tied), _model(tied, activation_checkpointing=True)
    pp, pc = ProxyStep(plain, K), ProxyStep(comp, K, compile="eager")
    assert hasattr(comp.trunk, "_torchdynamo_orig_callable")
    G = torch.randn(V, 32, generator=torch.Generator().manual_seed(6))
    for tokens, source in _batches(2):
        a, b = pp.micro_step(tokens, source, LOSS_W, G=G), pc.micro_step(tokens, source, LOSS_W, G=G)
        torch.testing.assert_close(b.scores.sums, a.scores.sums, rtol=1e-5, atol=1e-7)
        pp.optimizer_step(1e-2)
        pc.optimizer_step(1e-2)
    for p, q in zip(plain.parameters(), comp.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_state_round_trip():
    m = _model()
    ps = ProxyStep(m, K)
    tokens, source = _batches(1)[0]
    ps.micro_step(tokens, source, LOSS_W)
    ps.optimizer_step(1e-2)
    state = ps.state_dict()
    other = ProxyStep(_model(), K)
    other.load_state_dict(state)
    assert ps.micro == other.micro == 1
    for p, q in zip(m.parameters(), other.model.parameters()):
        assert torch.equal(p, q)
    assert other.opt.state_dict()["state"].keys() == ps.opt.state_dict()["state"].keys()


def test_non_finite_loss_accumulates_nothing():
    m = _model()
    ps = ProxyStep(m, K)
    tokens, source = _batches(1)[0]
    out = ps.micro_step(tokens, source, torch.tensor([float("nan"), 1.0, 1.0]), G=torch.zeros(V, 32))
    assert not out.finite and all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_weighted_head_gradient_of_a_training_loss(tied):
    """seq_weights: the alpha-weighted training loss's head gradient (the residual signal's G_train)."""
    m = _model(tied, double=True)
    ps = ProxyStep(m, K)
    tokens, source = _batches(1, seed=7)[0]
    w = LOSS_W.double()[source]
    got = ps.head_gradient(tokens, seq_weights=w)
    W = m.embed.weight if tied else m.head.weight
    tl = F.cross_entropy(m(tokens[:, :-1]).reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none").view(B, L)
    (ref,) = torch.autograd.grad((w[:, None] * tl).mean(), W)
    torch.testing.assert_close(got.grad, ref, rtol=1e-11, atol=1e-14)


def test_token_mean_and_custom_reduce_micro_steps():
    """No source / weights: the plain token mean (what static methods train with); reduce=: any
    loss of the token losses, through the unfused head (e.g. DoReMi's group weights)."""
    tokens, source = _batches(1, seed=8)[0]
    a, b, c = _model(double=True), _model(double=True), _model(double=True)
    out = ProxyStep(a, K).micro_step(tokens)
    F.cross_entropy(b(tokens[:, :-1]).reshape(-1, V), tokens[:, 1:].reshape(-1)).backward()
    assert out.token_losses.shape == (B, L) and out.scores is None
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-11, atol=1e-14)
    seen = []

    def reduce(tl, src):
        seen.append(src)
        return (tl.mean(1) * torch.tensor([3.0, 1.0, 0.5], dtype=F64)[src]).sum()

    out = ProxyStep(c, K).micro_step(tokens, source, G=torch.zeros(V, 32, dtype=F64), reduce=reduce)
    assert out.scores is None and torch.equal(seen[0], source)  # a custom loss is not scored
    b.zero_grad()
    tl = F.cross_entropy(b(tokens[:, :-1]).reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none").view(B, L)
    (tl.mean(1) * torch.tensor([3.0, 1.0, 0.5], dtype=F64)[source]).sum().backward()
    for p, q in zip(c.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-11, atol=1e-14)



def _trained(tied: bool, steps: int = 3, **kw) -> ProxyStep:
    """A float64 proxy after ``steps`` AdamW steps (a real optimiser state)."""
    ps = ProxyStep(_model(tied, double=True), K, **kw)
    assert ps.head_preconditioner() is None  # no state yet: P = 1
    for tokens, source in _batches(steps, seed=11):
        ps.micro_step(tokens, source, LOSS_W.double())
        ps.optimizer_step(1e-2)
    return ps


@pytest.mark.parametrize("tied", [False, True])
def test_head_preconditioner_is_adamws_step_scale(tied):
    """With beta1 = 0, no weight decay and no clipping, an AdamW step moves the head weight by exactly
    -lr * P * grad, P read from the optimiser's state after that step (bias correction, eps); P is not
    a constant, so it changes the direction of what it multiplies."""
    ps = _trained(tied, betas=(0.0, 0.95), weight_decay=0.0, grad_clip=None)
    W = ps.model.head.weight
    tokens, source = _batches(1, seed=12)[0]
    ps.micro_step(tokens, source, LOSS_W.double())
    g, before = W.grad.clone(), W.detach().clone()
    ps.optimizer_step(1e-2)
    P = ps.head_preconditioner()
    assert P.dtype == F64 and P.shape == W.shape
    torch.testing.assert_close(W.detach() - before, -1e-2 * P * g, rtol=1e-9, atol=1e-15)
    assert float(P.max() / P.min()) > 10


@pytest.mark.parametrize("tied", [False, True])
def test_preconditioned_scores_equal_autograd_inner_products(tied):
    """Float64, P from a real AdamW state: a micro-step scored against ``P * G_ref`` gives per source k
    ``<P * G_ref, grad_W L_k>``, grad_W L_k the explicit autograd gradient of source k's summed token
    losses with respect to the head weight (a tied one's whole gradient)."""
    ps = _trained(tied)
    m, P = ps.model, ps.head_preconditioner()
    G_ref = torch.randn(V, 32, generator=torch.Generator().manual_seed(13), dtype=F64)
    tokens, source = _batches(1, seed=14)[0]
    tl = F.cross_entropy(m(tokens[:, :-1]).reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none").view(B, L)
    want = torch.stack([(P * G_ref * torch.autograd.grad(tl[source == k].sum(), m.head.weight, retain_graph=True)[0])
                        .sum() for k in range(K)])
    got = ps.micro_step(tokens, source, LOSS_W.double(), G=P * G_ref).scores.sums
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    plain = torch.stack([(G_ref * torch.autograd.grad(tl[source == k].sum(), m.head.weight, retain_graph=True)[0])
                         .sum() for k in range(K)])
    cos = torch.nn.functional.cosine_similarity(want, plain, dim=0)
    assert cos < 0.999  # the direction of the K scores changes, not only their scale
