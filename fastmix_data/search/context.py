"""What every method run shares: its context, its result, the publishing hook and the finish.

Design problem: seven methods must read the same target, count compute the same way, write the
same files and hand every new mixture to a running training job (and, later, to remote
publishers) through one door; a method should only hold its own algorithm.

Solution: :func:`~fastmix_data.search.methods.run_method` builds one :class:`RunContext` (config,
sources, the loaded target, the run writer, the compute meter, the sink) and passes it to the
method; a method calls :meth:`RunContext.publish` for every new mixture and :func:`finish` with its
exported weights.

**The publishing hook.** :meth:`RunContext.publish` is the single place through which every new
mixture leaves a search: the starting mixture, every update of an online method (FastMix, Aioli,
DoReMi), and the exported weights at the end. It calls ``sink.set_weights({source: weight})`` --
the :class:`WeightSink` protocol a ``MixtureStream`` implements; any object with that method (a
publisher to remote training jobs) or a plain callable plugs in there, and a list of sinks receives
every mixture in order. The return value (the global batch from which the stream uses the weights)
is recorded in the trajectory as ``effective_batch``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .config import SearchConfig
from .ddp import Ranks
from .hypergrad import TokenLossFn
from .outputs import RunWriter
from .proxy.compute import ComputeMeter
from .proxy.trainer import make_stream
from .schedule import Budget
from .targets import TargetSet
from .vocab import Vocabulary, byte_vocabulary


@runtime_checkable
class WeightSink(Protocol):
    """Receives live mixture weights (token shares), e.g. a training job's ``MixtureStream``.

    ``set_weights`` returns the global batch index from which the new weights take effect (or None)."""

    def set_weights(self, weights: dict[str, float]) -> int | None: ...


Sink = WeightSink | Callable[[dict[str, float]], Any] | Sequence[Any]


@dataclass
class RunContext:
    """Everything one method run needs (built by ``run_method``).

    Attributes:
        config: the validated config.
        names: source names, in order.
        sources: ``{name: spec}`` (None when the caller gave its own ``stream``).
        target: the loaded target (None for methods that do not use one).
        writer: the run directory's writer.
        meter: the run's compute meter.
        sink: where new mixtures go (:meth:`publish`).
        stream: a caller-supplied search stream (online methods), instead of one over ``sources``.
        model, loss_fn: a caller-supplied proxy / per-token loss (FastMix).
        resume: resume an online search from ``out_dir/checkpoint.pt`` (True, False, "auto").
        vocab: the proxy's vocabulary (:func:`~fastmix_data.search.vocab.search_vocabulary`).
        ranks: the data-parallel ranks under ``torchrun`` (rank 0 of 1 otherwise); only rank 0's
            writer writes.
    """

    config: SearchConfig
    names: list[str]
    sources: Mapping[str, Any] | None
    target: TargetSet | None
    writer: RunWriter
    meter: ComputeMeter
    sink: Sink | None = None
    stream: Iterable | None = None
    model: nn.Module | None = None
    loss_fn: TokenLossFn | None = None
    resume: bool | str = False
    vocab: Vocabulary = field(default_factory=byte_vocabulary)
    ranks: Ranks = field(default_factory=Ranks)
    published: list[dict[str, float]] = field(default_factory=list)

    @property
    def K(self) -> int:
        return len(self.names)

    @property
    def budget(self) -> Budget:
        """The budget in micro-batches of the global batch (``train.batch_size`` per rank)."""
        t = self.config.train
        return Budget(int(self.config.max_tokens), t.tokens_per_step * self.ranks.world, t.grad_accum)

    def publish(self, weights: Mapping[str, float]) -> int | None:
        """THE hook through which every new mixture leaves the search (see the module docstring).
        Returns the effective batch reported by the (first) sink."""
        w = {n: float(weights[n]) for n in self.names}
        self.published.append(w)
        sinks = self.sink if isinstance(self.sink, (list, tuple)) else [self.sink]
        eff = None
        for s in sinks:
            if s is None:
                continue
            r = s.set_weights(dict(w)) if hasattr(s, "set_weights") else s(dict(w))
            if eff is None and r is not None:
                eff = int(r)
        return eff

    def train_stream(self, weights: Mapping[str, float] | None = None, **kw):
        """The stream a method trains on: the caller's ``stream`` or a packing ``MixtureStream``
        over ``sources`` (uniform when ``weights`` is None) in the data order of ``train``."""
        if self.stream is not None:
            return self.stream
        if self.sources is None:
            raise ValueError("this method needs sources (or a stream)")
        return make_stream(self.sources, weights, self.config.train, **kw)

    def require_sources(self, method: str) -> Mapping[str, Any]:
        if self.sources is None:
            raise ValueError(f"method {method!r} trains one model per source: give sources, not a stream")
        return self.sources


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``run(ctx) -> MethodResult``, whether it reads the target
    (``uses_target``), whether it trains online and publishes as it goes (``online``), a summary."""

    name: str
    run: Callable[[RunContext], MethodResult]
    uses_target: bool
    online: bool
    summary: str


@dataclass
class MethodResult:
    """What every method returns.

    Attributes:
        method: registry name.
        weights: the exported mixture as token shares (sum 1), in source order.
        source_names: the sources.
        trajectory: the records of ``trajectory.jsonl``.
        compute: the ``compute.json`` content.
        shares: the exported mixture as ``tokens`` / ``samples`` / ``bytes`` shares.
        candidates: other mixtures the method can export (``last``, ``average``, ``tail``...).
        exported: which candidate ``weights`` is.
        details: method-specific results (also under ``details`` in ``weights.json``).
        stopped_reason: why the run ended (``max_tokens``, ``done``, ``data_exhausted``...).
        out_dir: where the outputs went (None: nothing written).
        model: the trained proxy of an online method.
    """

    method: str
    weights: dict[str, float]
    source_names: list[str]
    trajectory: list[dict]
    compute: dict
    shares: dict
    candidates: dict[str, dict[str, float]]
    exported: str
    details: dict
    stopped_reason: str
    out_dir: Path | None = None
    model: nn.Module | None = None


def finish(ctx: RunContext, method: str, weights: Mapping[str, float], *, exported: str = "weights",
           candidates: Mapping[str, Mapping[str, float]] | None = None, details: Mapping | None = None,
           stopped_reason: str = "done", optimizer_steps: int = 0, device: str = "cpu", dtype: str = "float32",
           model: nn.Module | None = None, x: str = "tokens", xlabel: str = "proxy tokens") -> MethodResult:
    """The end of every method: publish the exported weights (a live job ends on the mixture the
    method recommends), write ``weights.json``, ``compute.json``, the trajectory and its plot."""
    w = {n: float(weights[n]) for n in ctx.names}
    ctx.publish(w)
    cand = {k: {n: float(v[n]) for n in ctx.names} for k, v in (candidates or {}).items()}
    compute = ctx.meter.to_dict(method, optimizer_steps=optimizer_steps, device=device, dtype=dtype,
                                details=details)
    payload = ctx.writer.write_weights(w, exported=exported, candidates=cand, final=True,
                                       stopped_reason=stopped_reason, tokens=ctx.meter.tokens["train"],
                                       details=details)
    ctx.writer.write_compute(compute)
    ctx.writer.flush()
    if ctx.config.output.plot:
        ctx.writer.plot(x=x, xlabel=xlabel)
    return MethodResult(method, w, list(ctx.names), list(ctx.writer.records), compute, payload["shares"], cand,
                        exported, dict(details or {}), stopped_reason, ctx.writer.dir, model)


def uniform(names: Sequence[str]) -> dict[str, float]:
    return {n: 1.0 / len(names) for n in names}


__all__ = ["MethodResult", "MethodSpec", "RunContext", "Sink", "WeightSink", "finish", "uniform"]
