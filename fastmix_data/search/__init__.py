"""Mixture search: find the mixture weights of a training job's sources for a target.

One stack for every method (see docs/search.md and docs/methods.md)::

    config.py     SearchConfig: ONE config tree (typed, documented fields; Python = YAML = CLI)
    schedule.py   warm-ups, intervals, step sizes, rounds derived from the token budget
    targets.py    TargetSet / load_target: one target type, sampled uniformly across files
    outputs.py    RunWriter: weights.json (token/sample/byte shares), trajectory, compute.json
    context.py    RunContext (with the publish hook every new mixture leaves through), MethodResult
    proxy/        the proxy trainer, evaluation, compute meter, proxy cache, the static final run
    fastmix/      the FastMix optimiser on z and the search loop (a class with findable phases)
    methods/      the registry and one file per method; run_method() is the entry point
    model.py      the proxy model and its presets;  hypergrad.py  the LM-head hypergradient maths

Entry point::

    from fastmix_data.search import SearchConfig, run_method
    cfg = SearchConfig(method="fastmix", max_tokens="20M")   # or SearchConfig.from_dict(yaml)
    result = run_method(cfg, sources={"code": "data/code", "web": "data/web/*.tar"},
                        target="data/val", out_dir="search_out")
    result.weights          # token shares; result.shares["samples"], result.shares["bytes"]
"""

from .config import (
    AioliConfig,
    DoReMiConfig,
    FastMixConfig,
    GridConfig,
    MixMinConfig,
    OutputConfig,
    ProxySpec,
    SearchConfig,
    TargetConfig,
    TrainConfig,
)
from .context import MethodResult, RunContext, WeightSink
from .fastmix import FastMix, FastMixLoop, StepInfo, loss_weights
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
from .methods import METHODS, run_method
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
from .outputs import read_trajectory
from .proxy import ComputeMeter, ProxyTrainer, evaluate, train_static
from .schedule import Budget, aioli_schedule, fastmix_schedule
from .targets import TargetSet, load_target

__all__ = [
    "BYTE_VOCAB_SIZE",
    "METHODS",
    "PRESETS",
    "AioliConfig",
    "Budget",
    "ComputeMeter",
    "DoReMiConfig",
    "FastMix",
    "FastMixConfig",
    "FastMixLoop",
    "GradientEMA",
    "GridConfig",
    "HeadGradient",
    "HeadedLM",
    "MethodResult",
    "MixMinConfig",
    "OutputConfig",
    "ProxyConfig",
    "ProxyLM",
    "ProxySpec",
    "ProxyTrainer",
    "RunContext",
    "SearchConfig",
    "SourceScores",
    "StepInfo",
    "TargetConfig",
    "TargetSet",
    "TrainConfig",
    "WeightSink",
    "aioli_schedule",
    "build_proxy",
    "count_params",
    "evaluate",
    "fastmix_schedule",
    "full_source_scores",
    "full_target_gradient",
    "head_gradient",
    "is_headed_lm",
    "load_target",
    "logit_residuals",
    "loss_weights",
    "per_token_source",
    "proxy_config",
    "read_trajectory",
    "run_method",
    "softmax_chain_rule",
    "source_head_scores",
    "token_losses",
    "train_static",
]
