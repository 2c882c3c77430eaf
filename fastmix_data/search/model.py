"""The proxy language model the mixture search trains: a decoder-only transformer and its presets.

Llama-flavoured and deliberately direct: token embedding, ``n_layer`` pre-norm blocks (RMSNorm,
causal self-attention with rotary position embeddings through
:func:`torch.nn.functional.scaled_dot_product_attention` -- flash / memory-efficient kernels on a
GPU --, SwiGLU MLP), a final RMSNorm and an LM head without bias, untied by default
(``tie_embeddings=True`` shares the input embedding's matrix). Optional activation checkpointing
per block (``activation_checkpointing=True``) trades a second trunk forward for activation memory.

Presets (:data:`PRESETS`) name shapes: ``tiny``/``cpu``/``gpu`` for tests and small searches and a
ladder ``p20m``/``p60m``/``p150m`` for searches at scale, named by their parameter count without
the vocabulary matrices (so the name does not depend on the tokenizer). Define your own with
:func:`register_preset` or override fields per run (``proxy_config("p60m", n_layer=10)``).

The search relies on one small protocol (:class:`HeadedLM`), which any user model may implement
instead of this one:

* ``final_hidden(x: LongTensor[B, L]) -> Tensor[B, L, d]`` -- the hidden states *after* the final
  norm, i.e. exactly what the LM head multiplies;
* ``head: nn.Linear(d, V)`` -- the output layer, ``logits = head(final_hidden(x))``. The FastMix
  hypergradient is taken with respect to ``head.weight`` (V x d); a bias, if present, is trained
  but not part of the hypergradient.
* a model whose head shares its matrix with the input embedding (tied) must also expose
  ``embed: nn.Embedding`` (with ``embed.weight is head.weight``) and ``trunk(e: Tensor[B, L, d])
  -> Tensor[B, L, d]`` with ``final_hidden(x) == trunk(embed(x))``: the hypergradient of a tied
  matrix has a second part, through the embedding lookup, that the search computes from the
  gradient at ``embed``'s output (see :func:`head_is_tied` and docs/search.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fastmix_data.stream.tokenize import BYTE_VOCAB_SIZE


class HeadedLM(Protocol):
    """What the search needs from a proxy model (see module docstring); check with :func:`is_headed_lm`."""

    head: nn.Linear

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor: ...


def is_headed_lm(model: object) -> bool:
    """Whether ``model`` implements :class:`HeadedLM`: a callable ``final_hidden`` and an ``nn.Linear`` ``head``.

    Not ``isinstance(model, HeadedLM)``: from Python 3.12 a runtime protocol check looks attributes
    up statically and misses an ``nn.Module``'s submodules, so every proxy would fail it.
    """
    return callable(getattr(model, "final_hidden", None)) and isinstance(getattr(model, "head", None), nn.Linear)


def head_is_tied(model: nn.Module) -> bool:
    """Whether ``model.head`` shares its weight with an input embedding ``model.embed``.

    Raises:
        TypeError: the head's weight is one of the model's embedding matrices but the model does not
            expose it as ``embed`` with a ``trunk(e)`` method, which the tied hypergradient needs.
    """
    embed = getattr(model, "embed", None)
    if isinstance(embed, nn.Embedding) and embed.weight is model.head.weight:
        if not callable(getattr(model, "trunk", None)):
            raise TypeError(
                "the proxy's head is tied to model.embed but the model has no trunk(e) method: the tied "
                "hypergradient needs final_hidden(x) == trunk(embed(x)) (see HeadedLM)"
            )
        return True
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight is model.head.weight:
            raise TypeError(
                "the proxy's head shares its weight with an embedding that is not model.embed: expose it as "
                "model.embed and add trunk(e) (see HeadedLM), or untie the head"
            )
    return False


@dataclass(frozen=True)
class ProxyConfig:
    """Shape of a :class:`ProxyLM`.

    Attributes:
        vocab_size: size of the token vocabulary (257 for the byte-level tokenizer).
        n_layer: number of transformer blocks.
        d_model: hidden width.
        n_head: attention heads (``d_model`` must be divisible by it).
        mlp_hidden: SwiGLU hidden width; 0 means ``8/3 * d_model`` rounded up to a multiple of 32.
        rope_base: base of the rotary position embedding.
        norm_eps: RMSNorm epsilon.
        init_std: standard deviation of the weight initialisation.
        tie_embeddings: share one V x d matrix between the input embedding and the LM head.
        activation_checkpointing: recompute each block's activations in the backward pass instead of
            keeping them (less memory, one more trunk forward per step).
    """

    vocab_size: int = BYTE_VOCAB_SIZE
    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    mlp_hidden: int = 0
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    activation_checkpointing: bool = False

    def validate(self) -> ProxyConfig:
        problems = []
        for name in ("vocab_size", "n_layer", "d_model", "n_head"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if not problems and self.d_model % self.n_head:
            problems.append(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not problems and (self.d_model // self.n_head) % 2:
            problems.append(f"head dimension d_model/n_head={self.d_model // self.n_head} must be even (rotary)")
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 0:
            problems.append(f"mlp_hidden must be an integer >= 0, got {self.mlp_hidden!r}")
        for name in ("tie_embeddings", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("invalid proxy model config: " + "; ".join(problems))
        return self

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return int(math.ceil(8 * self.d_model / 3 / 32) * 32)


#: Named model shapes: :class:`ProxyConfig` fields. A preset without a ``vocab_size`` takes the
#: tokenizer's (``model_args={"vocab_size": ...}``, or the search stream's tokenizer). The ladder
#: ``p20m``/``p60m``/``p150m`` is named by the parameters outside the vocabulary matrices (19.3M,
#: 56.6M, 154.1M; the embedding and an untied head add 2 x V x d), with 128-wide attention heads and
#: SwiGLU widths that are multiples of 128, the shapes GPU matmul and flash-attention kernels run
#: fastest; docs/search.md has the table with totals for common vocabularies.
PRESETS: dict[str, dict] = {
    "cpu": dict(vocab_size=BYTE_VOCAB_SIZE, n_layer=2, d_model=128, n_head=4),
    "gpu": dict(vocab_size=None, n_layer=2, d_model=256, n_head=4),
    # a very small model for unit tests and smoke runs
    "tiny": dict(vocab_size=BYTE_VOCAB_SIZE, n_layer=1, d_model=32, n_head=2),
    # the ladder for searches at scale (vocabulary from the tokenizer)
    "p20m": dict(vocab_size=None, n_layer=6, d_model=512, n_head=4, mlp_hidden=1408),
    "p60m": dict(vocab_size=None, n_layer=8, d_model=768, n_head=6, mlp_hidden=2048),
    "p150m": dict(vocab_size=None, n_layer=12, d_model=1024, n_head=8, mlp_hidden=2816),
}


#: Default AdamW learning rate of each preset's proxy. The small CPU proxies run for few steps and
#: take a large one; the ladder follows GPT-3's table (125M: 6e-4) upwards for smaller models. Not
#: tuned here: override with the search's ``lr``.
PRESET_LR: dict[str, float] = {"cpu": 2e-3, "tiny": 3e-3, "gpu": 4e-4, "p20m": 1e-3, "p60m": 8e-4, "p150m": 6e-4}


def register_preset(
    name: str, *, replace: bool = False, lr: float | None = None, **fields_: object
) -> ProxyConfig | None:
    """Add a named model shape to :data:`PRESETS` (``fields_`` are :class:`ProxyConfig` fields;
    leave ``vocab_size`` out to take the tokenizer's) and optionally its default learning rate
    ``lr`` (:data:`PRESET_LR`). Returns the validated config when it has a vocabulary, else None.
    Registering an existing name needs ``replace=True``.

    Example: ``register_preset("p400m", n_layer=24, d_model=1024, n_head=8, mlp_hidden=2816)``, then
    ``SearchConfig(model="p400m", ...)``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a preset name must be a non-empty string, got {name!r}")
    if name in PRESETS and not replace:
        raise ValueError(f"model preset {name!r} exists already; pass replace=True to redefine it")
    _check_fields(fields_)
    # validate the shape now (with a stand-in vocabulary when it comes from the tokenizer)
    ProxyConfig(**{**fields_, "vocab_size": fields_.get("vocab_size") or 2}).validate()
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    PRESETS[name] = {"vocab_size": None, **fields_}
    if lr is not None:
        PRESET_LR[name] = float(lr)
    return proxy_config(name) if fields_.get("vocab_size") else None


def _check_fields(args: dict) -> None:
    known = {f.name for f in fields(ProxyConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; known fields: {sorted(known)}")


def proxy_config(preset: str = "cpu", **overrides) -> ProxyConfig:
    """A :class:`ProxyConfig` from a preset name plus field overrides (``vocab_size=32000``...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    _check_fields(overrides)
    args = {k: v for k, v in PRESETS[preset].items()}
    args.update({k: v for k, v in overrides.items() if v is not None})
    if args.get("vocab_size") is None:
        raise ValueError(
            f"model preset {preset!r} needs a vocab_size: pass the tokenizer's vocabulary size "
            "(e.g. model_args={'vocab_size': 50304})"
        )
    return ProxyConfig(**args).validate()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, L, hd]; rotate the two halves of the head dimension
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        hidden = cfg.ffn_hidden
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class ProxyLM(nn.Module):
    """Decoder-only LM implementing :class:`HeadedLM` (tied heads included)."""

    def __init__(self, cfg: ProxyConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # rotary tables as non-persistent buffers: they follow .to(device) and keep torch.compile happy
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._build_rotary(2048, torch.device("cpu"))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():  # a tied matrix is listed (and drawn) once
            if p.dim() < 2:
                continue  # norm gains stay at 1
            s = std / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("proj.weight", "down.weight")) else std
            nn.init.normal_(p, mean=0.0, std=s)

    def _build_rotary(self, n: int, device: torch.device) -> None:
        hd = self.cfg.d_model // self.cfg.n_head
        inv = 1.0 / (self.cfg.rope_base ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv)
        self.rope_cos, self.rope_sin = ang.cos(), ang.sin()

    def _rotary(self, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_cos.shape[0] < L or self.rope_cos.device != device:
            self._build_rotary(max(L, self.rope_cos.shape[0]), device)
        return self.rope_cos[:L], self.rope_sin[:L]

    def trunk(self, e: torch.Tensor) -> torch.Tensor:
        """Post-final-norm hidden states ``[B, L, d]`` of token embeddings ``e`` (``[B, L, d]``)."""
        cos, sin = self._rotary(e.shape[1], e.device)
        h = e
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        ckpt = self.cfg.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, use_reentrant=False)
            else:
                h = block(h, cos, sin)
        return self.norm(h)

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Post-final-norm hidden states ``[B, L, d]`` of token ids ``x`` (``[B, L]``)."""
        return self.trunk(self.embed(x))

    def forward(self, x: torch.Tensor, *, head: bool = True) -> torch.Tensor:
        """Logits ``[B, L, V]``, or with ``head=False`` the final hidden states ``[B, L, d]`` (what a
        fused loss wants, and what a DistributedDataParallel wrapper must return so that its hooks
        see the trunk's forward)."""
        h = self.final_hidden(x)
        return self.head(h) if head else h


def build_proxy(cfg: ProxyConfig, seed: int = 0) -> ProxyLM:
    """A freshly initialised :class:`ProxyLM`, deterministic in ``seed``; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProxyLM(cfg)


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total`` (a tied matrix once), ``embedding`` (input lookup tables) and
    ``flops`` (the count that enters the 6N / 2N FLOP estimate: every parameter that takes part in
    a matmul, i.e. all but the input embeddings; the LM head is included, tied or not)."""
    total = sum(p.numel() for p in model.parameters())
    emb = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head = getattr(model, "head", None)
    tied = isinstance(head, nn.Linear) and any(
        isinstance(m, nn.Embedding) and m.weight is head.weight for m in model.modules()
    )
    return {"total": total, "embedding": emb, "flops": total - emb + (head.weight.numel() if tied else 0)}


def config_dict(cfg: ProxyConfig) -> dict:
    return asdict(cfg)


__all__ = [
    "BYTE_VOCAB_SIZE",
    "HeadedLM",
    "is_headed_lm",
    "head_is_tied",
    "PRESETS",
    "PRESET_LR",
    "ProxyConfig",
    "ProxyLM",
    "build_proxy",
    "config_dict",
    "count_params",
    "proxy_config",
    "register_preset",
]
