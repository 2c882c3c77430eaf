"""Mixture search: the embedded proxy trainer and FastMix.

Entry points: :class:`SearchConfig` (``SearchConfig.from_dict`` for YAML/JSON) and
:func:`run_search`. See docs/search.md.
"""

from .fastmix import FastMix, StepInfo
from .hypergrad import (
    GradientEMA,
    HeadGradient,
    SourceScores,
    full_source_scores,
    full_target_gradient,
    head_gradient,
    logit_residuals,
    per_token_source,
    softmax_chain_rule,
    source_head_scores,
    token_losses,
)
from .model import (
    BYTE_VOCAB_SIZE,
    PRESETS,
    HeadedLM,
    ProxyConfig,
    ProxyLM,
    build_proxy,
    count_params,
    is_headed_lm,
    proxy_config,
)
from .trainer import (
    SearchConfig,
    SearchResult,
    WeightSink,
    loss_weights,
    plot_trajectory,
    read_trajectory,
    run_search,
)

__all__ = [
    "BYTE_VOCAB_SIZE",
    "PRESETS",
    "FastMix",
    "GradientEMA",
    "HeadGradient",
    "HeadedLM",
    "ProxyConfig",
    "ProxyLM",
    "SearchConfig",
    "SearchResult",
    "SourceScores",
    "StepInfo",
    "WeightSink",
    "build_proxy",
    "count_params",
    "full_source_scores",
    "full_target_gradient",
    "head_gradient",
    "is_headed_lm",
    "logit_residuals",
    "loss_weights",
    "per_token_source",
    "plot_trajectory",
    "proxy_config",
    "read_trajectory",
    "run_search",
    "softmax_chain_rule",
    "source_head_scores",
    "token_losses",
]
