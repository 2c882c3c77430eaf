"""Every mixture method behind one entry point: a registry and :func:`run_method`.

==================  ===================================================================  ======
name                what it does                                                         target
==================  ===================================================================  ======
``fastmix``         online LM-head hypergradient search (``fastmix/loop.py``)             yes
``mixmin``          per-source proxies + convex mixture fit (``mixmin.py``)               yes
``aioli``           online mixing-law estimation with probe mixtures (``aioli.py``)      yes
``doremi``          group DRO on excess loss vs a reference model (``doremi.py``)        no
``stratified``      uniform weights (``stratified.py``)                                  no
``natural``         size-proportional weights, optional temperature (``natural.py``)     no
``grid``            oracle: every simplex point (step 0.1, K <= 3) trained and scored    yes
``mixmin_fastmix``  MixMin's estimate as FastMix's start, refined online                 yes
==================  ===================================================================  ======

Every method takes the same :class:`~fastmix_data.search.config.SearchConfig`, reads the same
target (:func:`~fastmix_data.search.targets.load_target`), spends ``max_tokens`` proxy training
tokens, publishes every new mixture through one hook (:meth:`RunContext.publish`), and writes the
same run directory (:mod:`fastmix_data.search.outputs`). Adding a method: a module with
``run(ctx) -> MethodResult`` and a ``SPEC``, an entry below, and its section in the config.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from fastmix_data.errors import ConfigError

from ..config import METHOD_NAMES, SearchConfig
from ..context import MethodResult, MethodSpec, RunContext, Sink, WeightSink, finish
from ..ddp import Ranks, init_distributed
from ..hypergrad import TokenLossFn
from ..model import PRESETS
from ..outputs import RunWriter, SourceStats
from ..proxy.compute import ComputeMeter
from ..targets import TargetSet, load_target
from ..vocab import Vocabulary, search_vocabulary
from . import aioli, doremi, fastmix, grid, mixmin, mixmin_fastmix, natural, stratified

METHODS: dict[str, MethodSpec] = {
    m.SPEC.name: m.SPEC for m in (fastmix, mixmin, aioli, doremi, stratified, natural, grid, mixmin_fastmix)
}
assert tuple(METHODS) == METHOD_NAMES, "the registry and config.METHOD_NAMES must list the same methods"


def run_method(
    config: SearchConfig | Mapping[str, Any],
    *,
    sources: Mapping[str, Any] | None = None,
    target: Any = None,
    out_dir: str | os.PathLike | None = None,
    sink: Sink | None = None,
    stream: Iterable | None = None,
    model: nn.Module | None = None,
    loss_fn: TokenLossFn | None = None,
    resume: bool | str = False,
) -> MethodResult:
    """Run the search ``config`` describes (its ``method`` on its budget) and return the result.

    Args:
        config: a :class:`SearchConfig` or a YAML-like mapping of one (validated here).
        sources: ``{name: path/glob/folder}`` (overrides ``config.sources``).
        target: a target spec or :class:`TargetSet` (overrides ``config.target.path``).
        out_dir: the run directory (None: nothing is written).
        sink: receives every new mixture (``sink.set_weights({name: w})``, e.g. a live
            ``MixtureStream``, a callable, or a list of those); see :meth:`RunContext.publish`.
        stream: online methods: the search stream to train on instead of one over ``sources``
            (batches ``{"tokens": [B, L+1], "source": [B]}``; it must carry ``source_names``
            when no sources are given).
        model, loss_fn: FastMix: your own proxy (:class:`~fastmix_data.search.model.HeadedLM`) and
            per-token loss.
        resume: FastMix: continue from ``out_dir/checkpoint.pt`` (True, or "auto" when it exists).
    """
    cfg = config if isinstance(config, SearchConfig) else SearchConfig.from_dict(config)
    if sources is not None:
        cfg = cfg.replace(sources={str(k): v for k, v in sources.items()}) if _plain(sources) else cfg
    cfg.validate()
    spec = METHODS[cfg.method]
    srcs = dict(sources) if sources is not None else (dict(cfg.sources) if cfg.sources else None)
    names = _names(srcs, stream)
    if (model is not None or loss_fn is not None or resume) and cfg.method not in ("fastmix", "mixmin_fastmix"):
        raise ConfigError(f"model=, loss_fn= and resume= are FastMix options; method {cfg.method!r} takes none")
    ranks = _ranks(cfg, resume)
    vocab = search_vocabulary(cfg.train, srcs if model is None else None)
    cfg = with_vocabulary(cfg, vocab.size) if model is None else cfg
    tset = _target(cfg, spec, target, vocab)
    stats = SourceStats.of_sources(srcs) if srcs else None
    writer = RunWriter(out_dir if ranks.is_main else None, spec.name, names, stats=stats,
                       flush_every_s=cfg.output.flush_every_s)
    ctx = RunContext(cfg, names, srcs, tset, writer, ComputeMeter(), sink=sink, stream=stream, model=model,
                     loss_fn=loss_fn, resume=resume, vocab=vocab, ranks=ranks)
    return spec.run(ctx)


def _ranks(cfg: SearchConfig, resume: bool | str) -> Ranks:
    """torchrun's ranks with ``train.ddp`` (FastMix only; no resumption yet), else one process."""
    if not cfg.train.ddp:
        return Ranks()
    if cfg.method != "fastmix":
        raise ConfigError(f"train.ddp (--ddp): only method 'fastmix' trains data-parallel so far, not {cfg.method!r}")
    if resume:
        raise ConfigError("train.ddp (--ddp): resume= is not supported with DDP yet: resume in one process, or start "
                          "afresh")
    return init_distributed()


def with_vocabulary(cfg: SearchConfig, vocab_size: int) -> SearchConfig:
    """``cfg`` with the run's vocabulary size as the proxy's ``vocab_size`` where its preset has
    another (or none) and no size was given: every proxy the method builds from ``cfg.train``
    (and every cache key) then has it. The byte vocabulary with the byte presets changes nothing."""
    spec = cfg.train.proxy
    if spec.overrides.get("vocab_size") is not None or PRESETS.get(spec.preset, {}).get("vocab_size") == vocab_size:
        return cfg
    return cfg.replace(**{"train.proxy": {**spec.to_value(), "vocab_size": int(vocab_size)}})


def _plain(sources: Mapping) -> bool:
    return all(isinstance(v, (str, os.PathLike, list)) for v in sources.values())


def _names(sources: Mapping | None, stream: Iterable | None) -> list[str]:
    if sources:
        names = [str(n) for n in sources]
    elif stream is not None and getattr(stream, "source_names", None) is not None:
        names = [str(n) for n in stream.source_names]
    else:
        raise ConfigError("no sources: give sources={name: path} (--source NAME=PATH), or a stream with source_names")
    if len(set(names)) != len(names):
        raise ConfigError(f"source names must be unique, got {names}")
    return names


def _target(cfg: SearchConfig, spec: MethodSpec, target: Any, vocab: Vocabulary) -> TargetSet | None:
    t = cfg.target
    given = target if target is not None else t.path
    if given is None:
        if spec.uses_target and not (spec.name == "fastmix" and cfg.fastmix.hypergrad == "none"):
            raise ConfigError(f"method {spec.name!r} needs a target: --target PATH (or GROUP=PATH pairs), "
                              "YAML target.path, or target= in Python")
        return None
    return load_target(given, cfg.train.seq_len, max_seqs=t.max_seqs, seed=t.seed, average=t.average,
                       text_field=t.text_field, answer_field=t.answer_field, question_field=t.question_field,
                       tokenizer=vocab.tokenizer)


__all__ = ["METHODS", "MethodResult", "MethodSpec", "RunContext", "WeightSink", "finish", "run_method",
           "with_vocabulary"]
