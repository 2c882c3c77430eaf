"""FLOPs of the proxy per token, and model FLOP utilisation (MFU) against a stated peak.

The convention is the one MFU figures are usually quoted in (PaLM, Appendix B; torchtitan,
nanoGPT): a trained token costs ``6 N + 12 n_layer d L`` FLOPs, an evaluated (forward-only) token a
third of it, where N counts the parameters that take part in matmuls (all but the input embedding;
the LM head included, tied or not) and ``12 n_layer d L`` is the attention score and value
products over a context of L tokens, counted in full although a causal kernel skips about half of
them. Recomputation (activation checkpointing) is *not* counted: MFU measures useful work.

FastMix's own work is counted on top: the one-pass scores cost ``2 V d`` per scored token (the
``[c, V] x [V, d]`` product ``r G``), the target gradient ``2 N + 12 n_layer d L / 3`` (its forward)
plus ``2 V d`` (``r^T h``) per target token. A tied head adds the target's backward to the
embedding, ``4 N + 8 n_layer d L``, per target token.

Peak throughputs are dense (no sparsity) per-chip datasheet figures; MFU = achieved FLOP/s / peak.

Example: ``p150m`` at vocabulary 32000 (N = 186.9M with the head), L = 2048: a trained token costs
``6 * 186.9e6 + 12 * 12 * 1024 * 2048 = 1.42e9`` FLOPs; 280k tokens/s on one H100 SXM is
``3.99e14`` FLOP/s, 40.3 % of 989 TFLOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass

#: dense bf16 tensor-core peaks in TFLOP/s (datasheets, without sparsity), matched against
#: ``torch.cuda.get_device_name()`` by substring, first match wins (so "H100 PCIe" before "H100")
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named ``device_name`` (TFLOP/s), or None when unknown."""
    for key, v in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return v
    return None


@dataclass(frozen=True)
class TokenFlops:
    """FLOPs per token of one proxy shape at one context length.

    Attributes:
        n_matmul: N, the parameters that take part in matmuls (head included, input embedding not).
        attention: ``12 n_layer d L``, the attention products of a trained token.
        head: ``2 V d``, one ``[1, V] x [V, d]`` product (a forward through the head).
    """

    n_matmul: int
    attention: float
    head: float

    @property
    def train(self) -> float:
        """A trained token: forward and backward (``6 N + 12 n_layer d L``)."""
        return 6.0 * self.n_matmul + self.attention

    @property
    def forward(self) -> float:
        """An evaluated token (forward only): a third of a trained token."""
        return self.train / 3.0

    @property
    def score(self) -> float:
        """FastMix's one-pass score of a trained token: ``2 V d``."""
        return self.head

    @property
    def target(self) -> float:
        """A target token of the head hypergradient: its forward plus ``r^T h`` (``2 V d``)."""
        return self.forward + self.head


def token_flops(n_matmul: int, n_layer: int, d_model: int, vocab_size: int, seq_len: int) -> TokenFlops:
    """:class:`TokenFlops` of a decoder with ``n_matmul`` matmul parameters (see the module docstring)."""
    return TokenFlops(int(n_matmul), 12.0 * n_layer * d_model * seq_len, 2.0 * vocab_size * d_model)


def proxy_token_flops(cfg, seq_len: int) -> TokenFlops:
    """:class:`TokenFlops` of a :class:`~fastmix_data.search.model.ProxyConfig` without building it."""
    d, f = cfg.d_model, cfg.ffn_hidden
    per_layer = 4 * d * d + 3 * d * f
    return token_flops(cfg.n_layer * per_layer + cfg.vocab_size * d, cfg.n_layer, d, cfg.vocab_size, seq_len)


def mfu(flops_per_s: float, peak_tflops_: float | None) -> float | None:
    """Model FLOP utilisation: ``flops_per_s / (peak * 1e12)``; None without a peak."""
    return None if not peak_tflops_ else flops_per_s / (peak_tflops_ * 1e12)


__all__ = ["PEAK_BF16_TFLOPS", "TokenFlops", "mfu", "peak_tflops", "proxy_token_flops", "token_flops"]
