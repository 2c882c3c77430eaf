"""The one search config: every method, from Python, YAML and the command line.

Design problem: a mixture search needs a proxy model and its optimiser, a budget, a target, the
sources, output settings, and each method's own knobs. Two config systems translated field by field
(with different defaults from Python and the CLI) are how defaults drift apart; a field that means
one thing in one place and another elsewhere (``warmup_steps``) is how users get surprised.

Solution: ONE tree of typed, documented sections (:class:`SearchConfig` at the root), declared
once with :func:`~fastmix_data.search.config_fields.opt`, from which YAML parsing, validation,
error messages and the command line's flags and help are all generated. Fields whose good value
depends on the budget (warm-ups, outer-step interval, step sizes, sweeps, rounds) default to None
= "derived from ``max_tokens``" by the pure functions of :mod:`fastmix_data.search.schedule`, so the
same defaults hold at 100k and at 10B proxy tokens, whichever way the config was given.

Example (YAML; every key optional except ``max_tokens``)::

    method: fastmix            # fastmix | mixmin | aioli | doremi | stratified | natural | grid | mixmin_fastmix
    max_tokens: 20M            # the proxy token budget of the whole search
    sources: {code: data/code, web: "data/web/*.tar"}
    target: {path: data/val, max_seqs: 1024}
    train: {proxy: cpu, seq_len: 128, batch_size: 16}
    fastmix: {z_lr: null}      # null / "auto": derived from the budget
    output: {progress: true}

The command line spells the same fields as flags (``--max-tokens 20M``, ``--seq-len 128``,
``--fastmix-z-lr 0.05``; see ``fastmix-data search --help``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .config_fields import Section, opt, section
from .model import PRESET_LR, PRESETS, ProxyConfig, proxy_config

#: every registered method (the registry in :mod:`fastmix_data.search.methods` must match)
METHOD_NAMES = ("fastmix", "mixmin", "aioli", "doremi", "stratified", "natural", "grid", "mixmin_fastmix")

#: a stand-in vocabulary for checking a preset's shape before the run resolves the real one
_CHECK_VOCAB = 2


# ============================================================================ the proxy model


@dataclass(frozen=True)
class ProxySpec:
    """The proxy model: a preset name from :data:`fastmix_data.search.model.PRESETS` plus overrides
    of :class:`~fastmix_data.search.model.ProxyConfig` fields.

    Written ``cpu``, ``p20m`` or ``p60m,tie_embeddings=true,activation_checkpointing=true``
    (command line), or ``{preset: p20m, tie_embeddings: true}`` (YAML). New presets only need an
    entry in ``PRESETS`` (:func:`~fastmix_data.search.model.register_preset`).

    The vocabulary size is the run's (:func:`fastmix_data.search.vocab.search_vocabulary`: the
    tokenizer file's, the ids columns', or 257 bytes) unless ``vocab_size`` is given here, e.g.
    ``p20m,vocab_size=32768`` to pad a 32,000-id BPE to a multiple of 128 for the GPU's matmuls.
    """

    preset: str = "cpu"
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, v: Any) -> ProxySpec:
        """From a :class:`ProxySpec`, ``"preset[,field=value...]"`` or ``{"preset": ..., field: value}``."""
        if isinstance(v, ProxySpec):
            return v
        if isinstance(v, str):
            preset, *rest = [p.strip() for p in v.split(",")]
            over = {}
            for item in rest:
                if "=" not in item:
                    raise ValueError(f"proxy overrides are field=value, got {item!r} in {v!r}")
                k, x = item.split("=", 1)
                over[k.strip()] = _number(x.strip())
            return cls(preset, over)
        if isinstance(v, Mapping):
            d = dict(v)
            preset = d.pop("preset", "cpu")
            over = d.pop("overrides", {})
            return cls(str(preset), {**dict(over), **d})
        raise ValueError(f"proxy must be a preset name or a mapping with 'preset', got {v!r}")

    def shape(self, vocab_size: int | None = None) -> ProxyConfig:
        """The model shape for a run whose vocabulary has ``vocab_size`` ids (an explicit
        ``vocab_size`` override wins; None: the preset's own). Raises ``ValueError`` for an unknown
        preset or field, or a preset without a vocabulary and none given."""
        over = dict(self.overrides)
        if over.get("vocab_size") is None and vocab_size is not None:
            over["vocab_size"] = int(vocab_size)
        return proxy_config(self.preset, **over)

    def check(self) -> None:
        """Validate preset and overrides without a vocabulary (a stand-in one where the run's is missing)."""
        self.shape(None if self.preset in PRESETS and PRESETS[self.preset].get("vocab_size") else _CHECK_VOCAB)

    def to_value(self) -> dict:
        return {"preset": self.preset, **dict(self.overrides)}

    def __str__(self) -> str:
        return ",".join([self.preset] + [f"{k}={v}" for k, v in self.overrides.items()])


def _number(s: str) -> Any:
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for t in (int, float):
        try:
            return t(s)
        except ValueError:
            pass
    return s


# ============================================================================ shared sections


@dataclass
class TrainConfig(Section):
    """How a proxy is trained: shared by every method and by the final run (:func:`train_static`).

    Units: a *step* is one micro-batch of ``batch_size`` packed sequences of ``seq_len + 1`` tokens
    (``batch_size * seq_len`` trained tokens); ``grad_accum`` micro-batches make one optimiser step.
    """

    proxy: ProxySpec = opt(ProxySpec(), "proxy model: a preset (tiny, cpu, gpu; the ladder p20m, p60m, p150m; "
                           "or one added with register_preset) plus ProxyConfig overrides, e.g. "
                           "'p20m,tie_embeddings=true,activation_checkpointing=true'", "proxy", aliases=("model",))
    tokenizer: str | None = opt(None, "a tokenizers JSON file (tokenizer.json, e.g. a BPE): the sources' and the "
                                "target's text is encoded with it and the proxy's vocab_size is its size", "str",
                                auto="the sources' pre-tokenized ids columns when every source has one, else "
                                "UTF-8 bytes (257 ids)")
    eos_token: str | None = opt(None, "the tokenizer's end-of-document token, appended between packed documents",
                                "str", auto="the first of <|endoftext|>, </s>, <eos>... the tokenizer has")
    ddp: bool = opt(False, "train the proxy data-parallel across the ranks torchrun started (DDP; FastMix only): "
                    "train.batch_size is per rank, rank 0 writes the outputs; off: one process, whatever the "
                    "environment (a search started from a torchrun job's rank stays a single process)", "bool")
    fused_head: bool = opt(True, "the LM head's loss, its gradients and FastMix's scores from one chunked pass over "
                           "the logits (no [tokens, vocab] tensor kept); off: materialised logits and a "
                           "separate scoring pass", "bool")
    seed: int = opt(0, "seed of the proxy's initialisation", "int", lo=0, hi=2**63 - 1)
    data_seed: int | None = opt(None, "seed of the training stream's order", "int", lo=0, hi=2**63 - 1,
                                auto="the seed")
    batch_size: int = opt(16, "packed sequences per micro-batch", "int", lo=1)
    seq_len: int = opt(128, "tokens predicted per sequence (sequences hold seq_len + 1 tokens)", "int", lo=1)
    grad_accum: int = opt(1, "micro-batches per optimiser step", "int", lo=1)
    lr: float | None = opt(None, "AdamW learning rate of the proxy", "float", lo=0, lo_open=True,
                           auto="the preset's (model.PRESET_LR: tiny 3e-3, cpu 2e-3, gpu 4e-4, p20m 1e-3, "
                           "p60m 8e-4, p150m 6e-4; others 1e-3)")
    lr_schedule: str = opt("cosine", "learning-rate schedule after the warm-up", "str",
                           choices=("cosine", "constant"))
    lr_warmup_steps: int | None = opt(None, "optimiser steps of linear learning-rate warm-up", "int", lo=0,
                                      auto="derived from the budget")
    min_lr_ratio: float = opt(0.1, "cosine schedule ends at min_lr_ratio * lr", "float", lo=0, hi=1)
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only)", "float", lo=0)
    betas: tuple = opt((0.9, 0.95), "AdamW betas", "betas")
    grad_clip: float | None = opt(1.0, "gradient-norm clipping", "float", lo=0, lo_open=True, auto="no clipping")
    device: str = opt("auto", "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'", "str")
    dtype: str = opt("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'float32' or 'bfloat16'", "str",
                     choices=("auto", "float32", "bfloat16"))
    compile: bool = opt(False, "torch.compile the proxy's trunk (and the fused head's softmax pass)", "bool")
    eval_batch_size: int = opt(64, "sequences per evaluation forward pass", "int", lo=1)

    @classmethod
    def _decode_field(cls, name: str, value: Any) -> Any:
        return ProxySpec.parse(value) if name == "proxy" and value is not None else value

    def _encode_field(self, name: str, value: Any) -> Any:
        return value.to_value() if isinstance(value, ProxySpec) else super()._encode_field(name, value)

    def _check_field(self, name: str, value: Any) -> str | None:
        if name == "proxy":
            if not isinstance(value, ProxySpec):
                return f"must be a preset name or {{preset: ..., field: value}}, got {value!r}"
            try:
                value.check()
            except (ValueError, TypeError) as e:
                return str(e)
        if name in ("tokenizer", "eos_token") and value is not None and (not isinstance(value, str) or not value):
            return f"must be a non-empty string, got {value!r}"
        if name == "tokenizer" and value is not None and not Path(value).is_file():
            return f"no tokenizer file {value!r}: give the path of a tokenizers JSON file (tokenizer.json)"
        if name == "device" and not (value in ("auto", "cpu", "cuda") or str(value).startswith("cuda:")):
            return f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}"
        return None

    @property
    def stream_seed(self) -> int:
        """The data-order seed (``data_seed``, else ``seed``)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def tokens_per_step(self) -> int:
        """Trained tokens per micro-batch: ``batch_size * seq_len``."""
        return self.batch_size * self.seq_len

    @property
    def learning_rate(self) -> float:
        """``lr``, or the preset's default."""
        return self.lr if self.lr is not None else PRESET_LR.get(self.proxy.preset, 1e-3)


@dataclass
class TargetConfig(Section):
    """What the mixture should do well on, and how much of it is read.

    One target type serves every method (:func:`fastmix_data.search.targets.load_target`): documents
    are sampled uniformly and seeded across all target files, packed like the stream packs them,
    and the target loss is the token mean (one path) or the mean of per-group token means
    (``{group: path}``). Q/A targets (``answer_field``) score the answer tokens only.
    """

    path: Any = opt(None, "target shards: a path/glob (token-averaged; grouped by a 'domain' column if any) or "
                    "GROUP=PATH pairs (group-averaged); repeatable", "target", auto="given to run_method",
                    flag="target")
    max_seqs: int | None = opt(1024, "target sequences kept (a seeded uniform sample across all files and "
                               "documents)", "int", lo=1, auto="all of them")
    seed: int = opt(0, "seed of the target sample and of the order target batches are used in", "int", lo=0,
                    hi=2**31 - 1)
    average: str = opt("auto", "target loss: 'tokens' (token mean), 'groups' (mean of group means) or 'auto' "
                       "(groups for GROUP=PATH targets)", "str", choices=("auto", "tokens", "groups"))
    batch_size: int | None = opt(None, "sequences per target batch (FastMix's target passes)", "int", lo=1,
                                 auto="train.batch_size")
    text_field: str = opt("text", "text column of the target shards", "str")
    answer_field: str | None = opt(None, "Q/A target: the answer column (only answer tokens are scored)", "str",
                                   auto="not a Q/A target")
    question_field: str = opt("question", "Q/A target: the question column", "str")


@dataclass
class OutputConfig(Section):
    """What a run writes besides its results, and how it reports progress."""

    progress: bool = opt(True, "tqdm progress bars", "bool")
    plot: bool = opt(True, "write trajectory.png", "bool")
    checkpoint_every: int | None = opt(None, "micro-batches between checkpoints of online searches", "int", lo=1,
                                       auto="about every tenth of the budget")
    flush_every_s: float = opt(10.0, "at most this many seconds between rewrites of trajectory.jsonl", "float",
                               lo=0)


# ============================================================================ method sections


@dataclass
class FastMixConfig(Section):
    """FastMix: online hypergradient search on the LM head (docs/search.md).

    Steps here are micro-batches. ``warmup_steps``, ``outer_every`` and ``z_lr`` default to values
    derived from the budget (:func:`fastmix_data.search.schedule.fastmix_schedule`).
    """

    warmup_steps: int | None = opt(None, "micro-batches before the mixture first moves", "int", lo=0,
                                   auto="derived from the budget")
    outer_every: int | None = opt(None, "micro-batches per outer step (mixture update)", "int", lo=1,
                                  auto="derived from the budget")
    z_lr: float | None = opt(None, "Adam step size on the mixture logits z", "float", lo=0,
                             auto="derived from the number of updates")
    z_lr_schedule: str = opt("cosine", "z step over the updates: 'cosine' (decays to z_min_lr_ratio * z_lr at the "
                             "last update) or 'constant'", "str", choices=("cosine", "constant"))
    z_min_lr_ratio: float = opt(0.05, "the cosine z step ends at this share of z_lr", "float", lo=0, hi=1)
    z_betas: tuple = opt((0.9, 0.95), "Adam betas on z", "betas")
    z_eps: float = opt(1e-8, "Adam epsilon on z", "float", lo=0, lo_open=True)
    signal: str = opt("normalized", "hypergradient scale: 'normalized' (direction only) or 'literal' "
                      "(-proxy_lr * <grad L_T, grad L_k>)", "str", choices=("normalized", "literal"))
    residual: bool = opt(True, "score sources against the target gradient minus the alpha-weighted training "
                         "gradient <G_T - G_train, G_k>, G_train taken on held-out training sequences (the "
                         "gradient-matching form, unbiased for a proxy far from convergence); off: against G_T "
                         "as in the paper (head hypergradient only)", "bool")
    residual_weight: float = opt(1.0, "with residual: the reference is G_T - residual_weight * G_train (1: the "
                                 "gradient-matching form; 0: the paper's G_T, G_train not computed)", "float",
                                 lo=0, hi=1)
    precondition: bool = opt(False, "score sources against P * reference, P = 1 / (sqrt(v_hat) + eps) the proxy "
                             "AdamW's per-coordinate step scale for the LM-head weight (its bias-corrected second "
                             "moment and eps; 1 before its first step): the first-order effect of an Adam step, "
                             "not an SGD step, on the target loss (hypergrad='head' only)", "bool")
    floor: float = opt(0.0, "alpha = (1 - floor) softmax(z) + floor / K", "float", lo=0, hi=0.999)
    kl_coef: float = opt(0.0, "weight of KL(alpha || prior) in the objective", "float", lo=0)
    prior: dict | None = opt(None, "prior mixture of the KL term", "weights", auto="uniform")
    init_weights: dict | None = opt(None, "starting mixture", "weights", auto="uniform")
    serve_weights: dict | None = opt(None, "proportions the search stream serves", "weights", auto="uniform")
    hypergrad: str = opt("head", "'head' (LM head, one pass, cost independent of K), 'full' (every parameter, "
                         "one backward per source) or 'none' (plain proxy training)", "str",
                         choices=("head", "full", "none"))
    search_batch: str = opt("window", "'window' (score every trained token) or 'buffer' (re-forward the "
                            "last search_seqs_per_source sequences of each source)", "str",
                            choices=("window", "buffer"))
    search_seqs_per_source: int = opt(4, "sequences per source in the buffer search batch", "int", lo=1)
    score_last: int | None = opt(None, "window mode: score only the last n micro-batches of each window", "int",
                                 lo=1, auto="all of them")
    final: str = opt("average", "exported weights: 'average' (over all updates), 'tail' (over the last "
                     "tail_fraction of them) or 'last'", "str", choices=("average", "tail", "last"))
    tail_fraction: float = opt(0.5, "share of the updates the tail average covers", "float", lo=0,
                               lo_open=True, hi=1)
    target_batches_per_step: int | None = opt(None, "target batches per outer step (rotated through the target)",
                                              "int", lo=1, auto="about as many sequences as the window trains on")
    target_ema: float = opt(0.0, "EMA factor of the target gradient across outer steps (0: latest only)",
                            "float", lo=0, hi=0.999)
    chunk_tokens: int | None = opt(None, "tokens per chunk of the fused head and the scoring matmuls (bounds "
                                   "memory: chunk x vocabulary float32 logits at a time)", "int", lo=1,
                                   auto="2**26 / vocab_size (256 MiB of logits), at least 128")

    def checks(self) -> list[tuple[str, str]]:
        p = []
        if self.hypergrad == "full" and self.search_batch != "buffer":
            p.append(("hypergrad", "'full' needs search_batch='buffer' (it differentiates a fresh forward pass)"))
        if self.precondition and self.hypergrad != "head":
            p.append(("precondition", f"needs hypergrad='head' (the LM head's AdamW state), got "
                      f"hypergrad={self.hypergrad!r}"))
        if self.score_last is not None and self.outer_every is not None and self.score_last > self.outer_every:
            p.append(("score_last", f"{self.score_last} cannot exceed outer_every={self.outer_every}"))
        return p


@dataclass
class MixMinConfig(Section):
    """MixMin: one proxy per source, then a convex fit of the mixture (docs/methods.md)."""

    proxy_tokens: int | None = opt(None, "training tokens of each per-source proxy", "count", lo=1,
                                   auto="max_tokens / K (all proxies together cost the budget)")
    proxy_seed: int | None = opt(None, "seed of the proxies (a fixed one lets runs share cached proxies)", "int",
                                 lo=0, hi=2**63 - 1, auto="train.seed")
    eta: float = opt(1.0, "exponentiated-gradient step (see eta_scale)", "float", lo=0, lo_open=True)
    eta_scale: str = opt("length", "'length' (eta per unit of the objective's total log-term weight) or "
                         "'none' (the literal step)", "str", choices=("length", "none"))
    max_iters: int = opt(100, "at most this many exponentiated-gradient steps", "int", lo=0)
    tol: float = opt(1e-4, "stop when no weight moves by more than this in a step", "float", lo=0)
    fit_fraction: float = opt(0.8, "share of target sequences the mixture is fitted on (the rest is reported)",
                              "float", lo=0, lo_open=True, hi=1)
    split_seed: int = opt(0, "seed of the fit/report split", "int", lo=0, hi=2**63 - 1)
    per_token: bool = opt(False, "mix the proxies per token instead of per example (ablation)", "bool")
    example_tokens: int = opt(1024, "target tokens per example: a document's consecutive target sequences are "
                              "scored as one example of up to this many tokens (0 or seq_len: every sequence "
                              "is an example)", "int", lo=0)


@dataclass
class AioliConfig(Section):
    """Aioli: online mixing-law estimation with probe mixtures (docs/methods.md). The budget
    includes the probe steps; rounds, sweeps, probe steps, eta, rho and the initial steps default to
    values derived from the budget and K (:func:`fastmix_data.search.schedule.aioli_schedule`)."""

    rounds: int | None = opt(None, "rounds the run is divided into", "int", lo=1, auto="derived from the budget")
    sweeps: int | None = opt(None, "LearnParams sweeps per round (even: antithetic pairs)", "int", lo=1,
                             auto="derived from the budget")
    probe_steps: int | None = opt(None, "training steps per probe mixture", "int", lo=1,
                                  auto="derived from the budget")
    eta: float | None = opt(None, "step of the mixture update", "float", lo=0, auto="derived from K and rounds")
    rho: float | None = opt(None, "weight of the probed source in a probe mixture (must differ from 1/K)",
                            "float", lo=0, lo_open=True, hi=1, auto="derived from K")
    initial_steps: int | None = opt(None, "steps on the initial mixture before the first round", "int", lo=0,
                                    auto="derived from the budget")
    ema: float | None = opt(None, "EMA factor of the mixing matrix across rounds", "float", lo=0, hi=0.999,
                            auto="no smoothing")
    antithetic: bool = opt(True, "every second sweep probes the previous sweep's order reversed", "bool")
    val_seqs_per_group: int = opt(16, "validation sequences per target group in each loss measurement", "int",
                                  lo=1)
    final: str = opt("average", "exported weights: 'average' (over the steps trained on them) or 'last'", "str",
                     choices=("average", "last"))
    init_weights: dict | None = opt(None, "starting mixture", "weights", auto="uniform")
    seed: int = opt(0, "seed of the probe order", "int", lo=0, hi=2**31 - 1)


@dataclass
class DoReMiConfig(Section):
    """DoReMi: group DRO on excess loss against a reference model (docs/methods.md). The reference
    and the proxy share the budget."""

    reference_fraction: float = opt(0.5, "share of max_tokens spent on the reference model", "float", lo=0,
                                    lo_open=True, hi=0.95)
    reference_weights: dict | None = opt(None, "the reference model's mixture", "weights", auto="uniform")
    eta: float = opt(1.0, "step of the domain-weight update", "float", lo=0)
    smoothing: float = opt(1e-3, "mixing toward uniform after each update", "float", lo=0, hi=1)
    log_every: int | None = opt(None, "steps between trajectory records (and pushes to the sink)", "int", lo=1,
                                auto="about 100 records per run")
    evaluate_target: bool = opt(False, "evaluate the target at every record (counted in compute)", "bool")


@dataclass
class NaturalConfig(Section):
    """Natural: weights proportional to each source's tokens, temperature-scaled."""

    temperature: float = opt(1.0, "w ~ n ** (1 / temperature); 1 = size-proportional", "float", lo=0, lo_open=True)


@dataclass
class GridConfig(Section):
    """Grid oracle: every simplex point at a step, each trained at max_tokens and scored."""

    step: float = opt(0.1, "simplex grid step (1/step must be a whole number; 0.1 gives 66 points for K=3)",
                      "float", lo=0.001, hi=1)
    max_sources: int = opt(3, "refuse more sources than this (the grid grows as C(1/step + K - 1, K - 1))",
                           "int", lo=1)

    def checks(self) -> list[tuple[str, str]]:
        if not (isinstance(self.step, (int, float)) and self.step >= 0.001):
            return []  # out of range: the field's own check says so (1/step of 1e-320 overflows)
        inv = 1.0 / self.step
        return [] if abs(inv - round(inv)) < 1e-6 else [("step", f"1/step must be a whole number, got {self.step}")]


@dataclass
class MixMinFastMixConfig(Section):
    """MixMin's convex estimate as FastMix's starting point, refined online (a combination no paper
    ships): MixMin runs on ``mixmin_fraction`` of the budget, FastMix on the rest from MixMin's
    weights, with the ``mixmin`` and ``fastmix`` sections' settings."""

    mixmin_fraction: float = opt(0.5, "share of max_tokens spent on MixMin's proxies", "float", lo=0,
                                 lo_open=True, hi=0.95)
    floor: float = opt(0.05, "FastMix starts from (1 - floor) * MixMin + floor / K, so no source starts at 0",
                       "float", lo=0, lo_open=True, hi=0.5)


# ============================================================================ the root


@dataclass
class SearchConfig(Section):
    """Everything a search needs: method, budget, data, proxy training, target, method settings, outputs.

    Build with keywords (``SearchConfig(method="mixmin", max_tokens=2_000_000)``), from a YAML/JSON
    mapping (:meth:`from_dict`) or from the command line (``fastmix-data search``); all three share
    these defaults. Call :meth:`validate` (``run_method`` does) to get every problem on one line.

    ``max_tokens`` is the proxy *training* budget of the whole search, for every method: the search
    proxy's tokens (FastMix, Aioli with its probe steps), all K proxies together (MixMin), reference
    plus proxy (DoReMi), each grid point's run (grid). Evaluation and scoring passes come on top and
    are counted in ``compute.json``.
    """

    ROOT_LABEL: ClassVar[str] = "search config"

    method: str = opt("fastmix", "mixture method", "str", choices=METHOD_NAMES)
    max_tokens: int | None = opt(None, "the proxy training budget in tokens, e.g. 20M", "count", lo=1)
    sources: dict | None = opt(None, "training sources NAME=PATH (a path, glob or folder; any supported "
                               "format); repeatable", "sources", auto="given to run_method", flag="source",
                               aliases=("sources",))
    cache_dir: str | None = opt(None, "where reusable proxies are cached (MixMin's, DoReMi's reference, grid runs)",
                                "str", auto="no cache")
    train: TrainConfig = section(TrainConfig, "proxy training")
    target: TargetConfig = section(TargetConfig, "the target", prefix_flags=True)
    output: OutputConfig = section(OutputConfig, "outputs and progress")
    fastmix: FastMixConfig = section(FastMixConfig, "FastMix", prefix_flags=True)
    mixmin: MixMinConfig = section(MixMinConfig, "MixMin", prefix_flags=True)
    aioli: AioliConfig = section(AioliConfig, "Aioli", prefix_flags=True)
    doremi: DoReMiConfig = section(DoReMiConfig, "DoReMi", prefix_flags=True)
    natural: NaturalConfig = section(NaturalConfig, "natural weights", prefix_flags=True)
    grid: GridConfig = section(GridConfig, "grid oracle", prefix_flags=True)
    mixmin_fastmix: MixMinFastMixConfig = section(MixMinFastMixConfig, "MixMin then FastMix", prefix_flags=True)

    def replace(self, **changes) -> SearchConfig:
        """A copy with dotted-path changes: ``cfg.replace(**{"fastmix.z_lr": 0.1, "max_tokens": 10})``."""
        d = self.to_dict()
        for key, v in changes.items():
            node = d
            *head, last = key.split(".")
            for h in head:
                node = node[h]
            node[last] = v
        return SearchConfig.from_dict(d)


__all__ = [
    "METHOD_NAMES",
    "PRESETS",
    "AioliConfig",
    "DoReMiConfig",
    "FastMixConfig",
    "GridConfig",
    "MixMinConfig",
    "MixMinFastMixConfig",
    "NaturalConfig",
    "OutputConfig",
    "ProxySpec",
    "SearchConfig",
    "TargetConfig",
    "TrainConfig",
]
