"""The proxy LM: protocol, presets, causality."""

from __future__ import annotations

import pytest
import torch

from fastmix_data.search.model import BYTE_VOCAB_SIZE, build_proxy, count_params, is_headed_lm, proxy_config


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
