"""The proxy LM: protocol, presets, causality."""

from __future__ import annotations

import pytest
import torch

from fastmix_data.search.model import (
    BYTE_VOCAB_SIZE,
    build_proxy,
    count_params,
    head_is_tied,
    is_headed_lm,
    proxy_config,
    register_preset,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning
    OpenMP threads make them many times slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cpu_preset_shape_and_size():
    cfg = proxy_config("cpu")
    assert cfg.vocab_size == BYTE_VOCAB_SIZE == 257
    m = build_proxy(cfg)
    n = count_params(m)
    assert 0.3e6 < n["total"] < 0.7e6
    assert is_headed_lm(m)
    assert not is_headed_lm(torch.nn.Linear(4, 4)) and not is_headed_lm(torch.nn.Sequential(m.embed, m.head))
    assert m.head.bias is None and m.head.weight.shape == (257, 128)
    assert m.head.weight.data_ptr() != m.embed.weight.data_ptr()  # untied


def test_gpu_preset_needs_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        proxy_config("gpu")
    cfg = proxy_config("gpu", vocab_size=32000)
    assert (cfg.n_layer, cfg.d_model) == (2, 256)
    with pytest.raises(ValueError, match="unknown model field"):
        proxy_config("cpu", width=3)
    with pytest.raises(ValueError, match="divisible"):
        proxy_config("cpu", n_head=3)


def test_forward_is_head_of_final_hidden_and_causal():
    m = build_proxy(proxy_config("tiny"), seed=1)
    x = torch.randint(0, 257, (2, 12))
    h = m.final_hidden(x)
    assert h.shape == (2, 12, 32)
    torch.testing.assert_close(m(x), m.head(h))
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % 257
    torch.testing.assert_close(m(x2)[:, :8], m(x)[:, :8])
    assert not torch.allclose(m(x2)[:, 8:], m(x)[:, 8:])


def test_build_is_deterministic_and_leaves_global_rng():
    state = torch.get_rng_state()
    a, b = build_proxy(proxy_config("tiny"), seed=3), build_proxy(proxy_config("tiny"), seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = build_proxy(proxy_config("tiny"), seed=4)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_longer_sequences_than_cache():
    m = build_proxy(proxy_config("tiny"))
    assert m.final_hidden(torch.randint(0, 257, (1, 2100))).shape == (1, 2100, 32)


# ---------------------------------------------------------------------------- the preset ladder


def _on_meta(cfg):
    with torch.device("meta"):  # shapes and counts without allocating 200M parameters
        return build_proxy(cfg)


@pytest.mark.parametrize(
    "preset, trunk_millions, heads_of_128",
    [("p20m", 19.3, 4), ("p60m", 56.6, 6), ("p150m", 154.1, 8)],
)
def test_ladder_presets_have_their_documented_size(preset, trunk_millions, heads_of_128):
    with pytest.raises(ValueError, match="vocab_size"):
        proxy_config(preset)  # the vocabulary comes from the tokenizer
    cfg = proxy_config(preset, vocab_size=32000)
    assert cfg.n_head == heads_of_128 and cfg.d_model // cfg.n_head == 128
    assert cfg.ffn_hidden % 128 == 0
    n = count_params(_on_meta(cfg))
    vocab_matrices = 2 * 32000 * cfg.d_model
    assert n["total"] - vocab_matrices == pytest.approx(trunk_millions * 1e6, rel=2e-3)
    assert n["embedding"] == 32000 * cfg.d_model
    assert n["flops"] == n["total"] - n["embedding"]  # untied: the head counts, the lookup does not


def test_tied_head_shares_the_matrix_and_counts_it_once():
    cfg = proxy_config("tiny", vocab_size=50, tie_embeddings=True)
    m = build_proxy(cfg, seed=0)
    assert m.head.weight is m.embed.weight and head_is_tied(m)
    untied = build_proxy(proxy_config("tiny", vocab_size=50), seed=0)
    assert not head_is_tied(untied)
    n, nu = count_params(m), count_params(untied)
    assert n["total"] == nu["total"] - 50 * 32
    assert n["flops"] == nu["flops"]  # the head's matmul costs the same, tied or not
    # both uses of the matrix get gradient
    x = torch.randint(0, 50, (2, 6))
    m(x).sum().backward()
    assert m.embed.weight.grad is not None and m.embed.weight.grad.abs().sum() > 0
    # a state dict round trip keeps the tie
    m2 = build_proxy(cfg, seed=5)
    m2.load_state_dict(m.state_dict())
    assert m2.head.weight is m2.embed.weight
    torch.testing.assert_close(m2(x), m(x))


def test_head_is_tied_refuses_a_tie_it_cannot_differentiate():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 4)
            self.head = torch.nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def final_hidden(self, x):
            return self.emb(x)

    with pytest.raises(TypeError, match="model.embed"):
        head_is_tied(Odd())


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = proxy_config("tiny", vocab_size=40, n_layer=2)
    a = build_proxy(cfg, seed=2).double()
    b = build_proxy(proxy_config("tiny", vocab_size=40, n_layer=2, activation_checkpointing=True), seed=2).double()
    x = torch.randint(0, 40, (3, 10))
    la, lb = a(x).square().mean(), b(x).square().mean()
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-14, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)


def test_forward_without_head_and_trunk_of_embedding():
    m = build_proxy(proxy_config("tiny"), seed=1)
    x = torch.randint(0, 257, (2, 5))
    torch.testing.assert_close(m(x, head=False), m.final_hidden(x))
    torch.testing.assert_close(m.trunk(m.embed(x)), m.final_hidden(x))


def test_register_preset_defines_a_named_shape(monkeypatch):
    from fastmix_data.search import model as model_mod

    monkeypatch.setattr(model_mod, "PRESETS", dict(model_mod.PRESETS))
    monkeypatch.setattr(model_mod, "PRESET_LR", dict(model_mod.PRESET_LR))
    assert {"tiny", "cpu", "gpu", "p20m", "p60m", "p150m"} <= set(model_mod.PRESET_LR)  # built-ins have an lr
    assert register_preset("my300m", n_layer=24, d_model=1024, n_head=8, mlp_hidden=2816, lr=3e-4) is None
    assert model_mod.PRESET_LR["my300m"] == 3e-4
    cfg = proxy_config("my300m", vocab_size=50304, tie_embeddings=True)
    assert (cfg.n_layer, cfg.d_model, cfg.tie_embeddings) == (24, 1024, True)
    with pytest.raises(ValueError, match="exists already"):
        register_preset("my300m", n_layer=2)
    with pytest.raises(ValueError, match="unknown model field"):
        register_preset("bad", layers=2)
    with pytest.raises(ValueError, match="divisible"):
        register_preset("bad", d_model=100, n_head=3)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        register_preset("bad", n_layer=2, lr=-1)
    assert register_preset("small", vocab_size=100, n_layer=1, d_model=16, n_head=2).vocab_size == 100
