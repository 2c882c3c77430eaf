"""One entry point for every mixture method: a registry and :func:`run_method`.

=============  ===================================================================  =========
name           what it does                                                         uses target
=============  ===================================================================  =========
``fastmix``    online hypergradient search (:func:`trainer.run_search`)              yes
``mixmin``     per-source proxies + convex mixture fit (:mod:`.mixmin`)              yes
``aioli``      online mixing-law estimation with probe mixtures (:mod:`.aioli`)      yes
``doremi``     group DRO on excess loss vs a reference model (:mod:`.doremi`)        no
``stratified`` uniform weights                                                       no
``natural``    size-proportional weights, optional temperature                      no
``grid``       oracle: every simplex point (step 0.1, K <= 3) trained and scored     yes
=============  ===================================================================  =========

Every method takes the same arguments, writes the same files into ``out_dir`` (``weights.json``,
``trajectory.jsonl``, ``trajectory.png``, ``compute.json``), can push its weights into a live
``MixtureStream`` (``sink.set_weights``), and counts its compute in FLOPs (validation passes
included) and wall time.

Config layout (a mapping; every key optional)::

    {
      "train": {TrainConfig fields},          # shared by all methods: model, seeds, batch, budget...
      "cache_dir": "...", "progress": false,   # shared MethodConfig fields
      "target_max_seqs": 512, "plot": true,
      "<method>": {method fields, and "train": {overrides of the shared train fields}}
    }

``train.max_tokens`` is the method's own training budget: the search proxy's (fastmix, aioli --
probe steps included --, doremi's proxy and by default its reference), all K proxies together
(mixmin), each grid point's run (grid).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .aioli import AioliConfig, run_aioli
from .baselines import GridConfig, NaturalConfig, StratifiedConfig, run_grid, run_natural, run_stratified
from .doremi import DoReMiConfig, run_doremi
from .mixmin import MixMinConfig, run_mixmin
from .train_static import MethodConfig, MethodResult, TrainConfig, as_target, make_stream, push_weights

__all__ = ["METHODS", "FastMixConfig", "MethodSpec", "build_config", "run_fastmix", "run_method"]


# ============================================================================ fastmix adapter


@dataclass
class FastMixConfig(MethodConfig):
    """FastMix through :func:`trainer.run_search` (plus the common fields).

    Attributes:
        search: overrides of :class:`~fastmix_data.search.trainer.SearchConfig` fields (``z_lr``,
            ``outer_every``, ``hypergrad``, ``floor``...). Proxy, optimiser and budget come from
            ``train``. Unless given, ``warmup_steps`` and ``outer_every`` are the reference's (100,
            20) capped at a fifth and a twentieth of the budget's steps, so short searches update.
        target_batch_size: sequences per target batch (rotated through the target set).
    """

    search: dict = field(default_factory=dict)
    target_batch_size: int = 8

    def problems(self) -> list[str]:
        p = []
        if not isinstance(self.search, Mapping):
            p.append(f"search must be a mapping of SearchConfig fields, got {self.search!r}")
        if not isinstance(self.target_batch_size, int) or self.target_batch_size < 1:
            p.append(f"target_batch_size must be a positive integer, got {self.target_batch_size!r}")
        return p

    def search_config(self, names: list[str]):
        from .trainer import SearchConfig

        t = self.train
        steps = t.total_steps
        d = {
            "model": t.model, "model_args": dict(t.model_args), "seed": t.seed, "device": t.device,
            "lr": t.learning_rate, "lr_schedule": t.lr_schedule, "lr_warmup_steps": t.warmup_steps,
            "min_lr_ratio": t.min_lr_ratio, "weight_decay": t.weight_decay, "betas": tuple(t.betas),
            "grad_clip": t.grad_clip, "max_tokens": t.max_tokens,
            "warmup_steps": min(100, steps // 5), "outer_every": max(1, min(20, steps // 20)),
            "progress": self.progress, "plot": self.plot, "sources": names, "checkpoint_every": None,
        }
        d.update(self.search)
        return SearchConfig.from_dict(d)


def run_fastmix(train_sources: Mapping[str, Any], target: Any, config: FastMixConfig | None = None,
                out_dir=None, sink=None) -> MethodResult:
    """FastMix: a stratified packing stream over the sources, the target as rotated batches, and
    :func:`trainer.run_search` (which writes the outputs and pushes alpha to ``sink``)."""
    from .trainer import run_search

    cfg = config or FastMixConfig()
    cfg.validate()
    names = list(train_sources)
    tset = as_target(target, cfg.train.seq_len, max_seqs=cfg.target_max_seqs)
    stream = make_stream(train_sources, None, cfg.train)
    batches = tset.batches(cfg.target_batch_size, seed=cfg.train.seed)
    r = run_search(stream, batches, cfg.search_config(names), sink=sink, out_dir=out_dir, source_names=names)
    # run_search pushes every new alpha; the exported weights (by default the trajectory average)
    # go last, so a live stream ends on the mixture the method recommends
    push_weights(sink, r.weights)
    extra = {"last": r.last_weights, "average": r.average_weights, "stopped_reason": r.stopped_reason,
             "target": tset.describe()}
    return MethodResult("fastmix", dict(r.weights), names, list(r.trajectory), dict(r.compute), extra,
                        None if out_dir is None else Path(out_dir), r.model)


# ============================================================================ registry


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its runner, its config class and whether it reads the target."""

    run: Callable[..., MethodResult]
    config: type
    uses_target: bool
    online: bool


METHODS: dict[str, MethodSpec] = {
    "fastmix": MethodSpec(run_fastmix, FastMixConfig, True, True),
    "mixmin": MethodSpec(run_mixmin, MixMinConfig, True, False),
    "aioli": MethodSpec(run_aioli, AioliConfig, True, True),
    "doremi": MethodSpec(run_doremi, DoReMiConfig, False, True),
    "stratified": MethodSpec(run_stratified, StratifiedConfig, False, False),
    "natural": MethodSpec(run_natural, NaturalConfig, False, False),
    "grid": MethodSpec(run_grid, GridConfig, True, False),
}

_SHARED = {"cache_dir", "progress", "target_max_seqs", "plot"}


def build_config(name: str, config: Mapping[str, Any] | MethodConfig | None) -> MethodConfig:
    """The method's config from the shared layout (see module docstring), or the config itself."""
    spec = _spec(name)
    if isinstance(config, MethodConfig):
        if not isinstance(config, spec.config):
            raise ConfigError(f"method {name!r} takes a {spec.config.__name__}, got {type(config).__name__}")
        return config.validate()
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(f"a method config must be a mapping, got {config!r}"[:200])
    config = dict(config or {})
    unknown = sorted((k for k in config if k not in _SHARED and k != "train" and k not in METHODS), key=repr)
    if unknown:
        raise ConfigError(f"unknown method config key(s) {unknown}: use 'train', {sorted(_SHARED)} or a method "
                         f"section {sorted(METHODS)}")
    if not isinstance(config.get(name) or {}, Mapping):
        raise ConfigError(f"the {name!r} section of the method config must be a mapping, got {config[name]!r}"[:200])
    section = dict(config.get(name) or {})
    train = {**_train_dict(config.get("train")), **_train_dict(section.pop("train", None))}
    d = {k: config[k] for k in _SHARED if k in config}
    d.update(section)
    d["train"] = TrainConfig.from_dict(train)
    return spec.config.from_dict(d)


def _train_dict(t) -> dict:
    if t is None:
        return {}
    if isinstance(t, TrainConfig):
        return t.to_dict()
    if isinstance(t, Mapping):
        return dict(t)
    raise ConfigError(f"'train' must be a mapping of TrainConfig fields, got {type(t).__name__}")


def _spec(name: str) -> MethodSpec:
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"unknown mixture method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def run_method(name: str, train_sources: Mapping[str, Any], target: Any = None,
               config: Mapping[str, Any] | MethodConfig | None = None, out_dir: str | os.PathLike | None = None,
               sink=None) -> MethodResult:
    """Run mixture method ``name`` and return its :class:`MethodResult`.

    Args:
        name: one of :data:`METHODS` (fastmix, mixmin, aioli, doremi, stratified, natural, grid).
        train_sources: ``{source name: Parquet/WebDataset path or spec}`` (as for ``MixtureStream``).
        target: what to optimise for (methods that use one): a Parquet path (token-averaged),
            ``{group: Parquet path}`` (group-averaged, e.g. the training domains' validation
            splits), a list of texts, or a :class:`~fastmix_data.search.train_static.TargetSet`.
        config: the shared config layout (module docstring) or the method's config object.
        out_dir: where the outputs go (None: nothing is written).
        sink: receives weight updates (``sink.set_weights({name: w})``, e.g. a live ``MixtureStream``).
    """
    spec = _spec(name)
    if not train_sources:
        raise ValueError("train_sources is empty: give {name: path} for at least one source")
    if spec.uses_target and target is None:
        raise ValueError(f"method {name!r} needs a target")
    cfg = build_config(name, config)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return spec.run(dict(train_sources), target, cfg, out_dir, sink)
