"""FLOP accounting per token and MFU."""

from __future__ import annotations

import pytest
import torch

from fastmix_data.search.flops import mfu, peak_tflops, proxy_token_flops, token_flops
from fastmix_data.search.model import build_proxy, count_params, proxy_config


@pytest.mark.parametrize("preset, tied", [("p20m", False), ("p150m", False), ("p60m", True)])
def test_token_flops_count_the_built_model(preset, tied):
    cfg = proxy_config(preset, vocab_size=32000, tie_embeddings=tied)
    with torch.device("meta"):
        n = count_params(build_proxy(cfg))
    f = proxy_token_flops(cfg, 1024)
    norms = (2 * cfg.n_layer + 1) * cfg.d_model  # RMSNorm gains: in the parameter count, not in a matmul
    assert f.n_matmul == n["flops"] - norms
    assert f.attention == 12 * cfg.n_layer * cfg.d_model * 1024
    assert f.train == 6 * f.n_matmul + f.attention and f.forward == pytest.approx(f.train / 3)
    assert f.score == f.head == 2 * 32000 * cfg.d_model
    assert f.target == f.forward + f.head


def test_the_documented_example_and_mfu():
    f = proxy_token_flops(proxy_config("p150m", vocab_size=32000), 2048)
    assert f.train == pytest.approx(1.42e9, rel=3e-3)
    assert mfu(280e3 * f.train, peak_tflops("NVIDIA H100 80GB HBM3")) == pytest.approx(0.403, abs=5e-4)
    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("some CPU") is None and mfu(1e12, None) is None
    assert token_flops(10, 1, 4, 7, 3).train == 60 + 144
