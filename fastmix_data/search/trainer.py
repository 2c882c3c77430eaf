"""The embedded proxy trainer: trains a small LM on a stratified stream and runs FastMix on the way.

Search mode (see docs/search.md for the full story):

* the stream serves the K sources uniformly (or in known proportions ``serve_weights``); the proxy's
  per-sequence loss is weighted by ``alpha[source] / serve[source]`` (``K * alpha`` when uniform,
  alpha detached), which in expectation equals training on an alpha-sampled stream;
* every ``outer_every`` micro-batches an *outer step* turns per-source gradient inner products with
  the target's gradient into a hypergradient and an Adam update of the mixture logits
  (:class:`~fastmix_data.search.fastmix.FastMix`), and pushes alpha into ``sink.set_weights``;
* search gradients are computed in closed form from detached hidden states / logits (or with
  ``torch.autograd.grad`` in the full-parameter variant): the proxy's ``.grad`` buffers and its
  gradient accumulation are never touched;
* it stops on a step or token budget, checkpoints and resumes, and writes the weights found so far
  atomically at every outer step.

The public entry points are :class:`SearchConfig` and :func:`run_search`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import platform
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fastmix_data.io import atomic_path, write_bytes_atomic

from ..errors import ConfigError
from .config_types import type_problems
from .fastmix import SIGNALS, FastMix
from .hypergrad import (
    DEFAULT_CHUNK_TOKENS,
    GradientEMA,
    SourceScores,
    TokenLossFn,
    full_source_scores,
    full_target_gradient,
    head_gradient,
    per_token_source,
    segment_sums,
    source_head_scores,
    token_losses,
)
from .model import PRESETS, build_proxy, count_params, is_headed_lm, proxy_config

TRAJECTORY_FILE = "trajectory.jsonl"
WEIGHTS_FILE = "weights.json"
COMPUTE_FILE = "compute.json"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "search_config.json"
PLOT_FILE = "trajectory.png"

#: default proxy learning rate per model preset (the reference's 4e-4 for the GPU proxy; the
#: small CPU proxies are run for far fewer steps and take a larger one)
DEFAULT_LR = {"cpu": 2e-3, "tiny": 3e-3, "gpu": 4e-4}


@runtime_checkable
class WeightSink(Protocol):
    """Receives live mixture weights, e.g. a training job's ``MixtureStream``.

    ``set_weights`` returns the global batch index from which the new weights take effect."""

    def set_weights(self, weights: dict[str, float]) -> int: ...


# ============================================================================ configuration


@dataclass
class SearchConfig:
    """Everything a search run needs besides its data. Build with keywords or :meth:`from_dict`.

    Units: a *step* is one micro-batch taken from the stream; ``grad_accum`` micro-batches make one
    optimiser step of the proxy.
    """

    # proxy model
    model: str = "cpu"  #: preset name: "cpu", "gpu" (needs model_args.vocab_size), "tiny"
    model_args: dict = field(default_factory=dict)  #: overrides of ProxyConfig fields
    seed: int = 0
    device: str = "auto"  #: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  #: "auto" (bf16 autocast on CUDA, fp32 on CPU), "float32", "bfloat16"
    compile: bool = False  #: torch.compile the proxy trunk
    # proxy optimiser (AdamW)
    lr: float | None = None  #: None: per-preset default (DEFAULT_LR)
    lr_schedule: str = "constant"  #: "constant" or "cosine" (to min_lr_ratio * lr at the budget)
    lr_warmup_steps: int = 0  #: optimiser steps of linear lr warm-up
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    # budget (at least one; the run stops at the first optimiser step that reaches either)
    max_steps: int | None = None
    max_tokens: int | None = None
    # FastMix
    hypergrad: str = "head"  #: "head" (one pass), "full" (per-source autograd), "none" (plain training)
    search_batch: str = "window"  #: "window" (score every trained token) or "buffer" (m recent per source)
    search_seqs_per_source: int = 4  #: m, for search_batch="buffer"
    score_last: int | None = None  #: window mode: score only the last n micro-batches of each window (None: all)
    outer_every: int = 20  #: micro-batches per outer step
    warmup_steps: int = 100  #: micro-batches before the first update of z
    z_lr: float = 0.01
    z_betas: tuple[float, float] = (0.9, 0.95)
    z_eps: float = 1e-8
    signal: str = "normalized"  #: "normalized" or "literal"
    floor: float = 0.0  #: alpha = (1-floor) softmax(z) + floor/K
    kl_coef: float = 0.0  #: weight of KL(alpha || prior)
    prior: dict | None = None  #: {source: weight} for the KL term (default uniform)
    init_weights: dict | None = None  #: starting mixture (default uniform)
    serve_weights: dict | None = None  #: proportions the search stream serves (default uniform)
    final: str = "average"  #: "average" (trajectory average after warm-up) or "last"
    target_batches_per_step: int = 1  #: target batches per outer step (rotated)
    target_ema: float = 0.0  #: EMA beta of the target gradient across outer steps (0: latest only)
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  #: token chunk of the hypergradient matmuls (memory)
    # outputs
    checkpoint_every: int | None = 1000  #: micro-batches between checkpoints (None: only at the end)
    flush_every_s: float = 10.0  #: at most this long between trajectory rewrites (weights: every outer step)
    progress: bool = True
    plot: bool = True
    sources: list | None = None  #: source names, when the data object does not carry them

    # ------------------------------------------------------------------ validation
    def validate(self) -> SearchConfig:
        """Check every field; raise `ConfigError` (a ``ValueError``) listing every problem found."""
        p: list[str] = type_problems(self)
        if p:  # the range checks below assume the right types
            raise ConfigError("invalid search config:\n  - " + "\n  - ".join(p))

        def pos_int(name, allow_none=False, zero=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero else 1):
                p.append(f"{name} must be a {'non-negative' if zero else 'positive'} integer, got {v!r}")

        def num(name, lo=None, hi=None, lo_open=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                p.append(f"{name} must be a finite number, got {v!r}")
                return
            if lo is not None and (v <= lo if lo_open else v < lo):
                p.append(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
            if hi is not None and v >= hi:
                p.append(f"{name} must be < {hi}, got {v}")

        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                p.append(f"{name} must be one of {list(options)}, got {v!r}")

        if self.model not in PRESETS:
            p.append(f"model must be one of {sorted(PRESETS)}, got {self.model!r}")
        if not isinstance(self.model_args, dict):
            p.append(f"model_args must be a mapping of ProxyConfig fields, got {self.model_args!r}")
        elif self.model in PRESETS:
            try:
                proxy_config(self.model, **self.model_args)
            except (ValueError, TypeError) as e:
                p.append(str(e))
        pos_int("seed", zero=True)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            p.append(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        choice("dtype", ("auto", "float32", "bfloat16"))
        num("lr", lo=0, lo_open=True, allow_none=True)
        choice("lr_schedule", ("constant", "cosine"))
        pos_int("lr_warmup_steps", zero=True)
        num("min_lr_ratio", lo=0, hi=1.000001)
        num("weight_decay", lo=0)
        _betas(p, "betas", self.betas)
        num("grad_clip", lo=0, lo_open=True, allow_none=True)
        pos_int("grad_accum")
        pos_int("max_steps", allow_none=True)
        pos_int("max_tokens", allow_none=True)
        if self.max_steps is None and self.max_tokens is None:
            p.append("set a budget: max_steps and/or max_tokens (a search never runs unbounded)")
        choice("hypergrad", ("head", "full", "none"))
        choice("search_batch", ("window", "buffer"))
        if self.hypergrad == "full" and self.search_batch != "buffer":
            p.append("hypergrad='full' needs search_batch='buffer' (it differentiates a fresh forward pass)")
        pos_int("search_seqs_per_source")
        pos_int("outer_every")
        pos_int("score_last", allow_none=True)
        if isinstance(self.score_last, int) and isinstance(self.outer_every, int) and self.score_last > self.outer_every:
            p.append(f"score_last={self.score_last} cannot exceed outer_every={self.outer_every}")
        pos_int("warmup_steps", zero=True)
        num("z_lr", lo=0)
        _betas(p, "z_betas", self.z_betas)
        num("z_eps", lo=0, lo_open=True)
        choice("signal", SIGNALS)
        num("floor", lo=0, hi=1)
        num("kl_coef", lo=0)
        for name in ("prior", "init_weights", "serve_weights"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Mapping):
                p.append(f"{name} must be a mapping {{source: weight}}, got {v!r}")
        choice("final", ("average", "last"))
        pos_int("target_batches_per_step")
        num("target_ema", lo=0, hi=1)
        pos_int("chunk_tokens")
        pos_int("checkpoint_every", allow_none=True)
        if isinstance(self.checkpoint_every, int) and self.checkpoint_every % max(1, int(self.grad_accum or 1)):
            p.append(f"checkpoint_every={self.checkpoint_every} must be a multiple of grad_accum={self.grad_accum}")
        num("flush_every_s", lo=0)
        if self.sources is not None and (
            not isinstance(self.sources, (list, tuple)) or not all(isinstance(s, str) for s in self.sources)
        ):
            p.append(f"sources must be a list of source names, got {self.sources!r}")
        if p:
            raise ConfigError("invalid search config:\n  - " + "\n  - ".join(p))
        return self

    # ------------------------------------------------------------------ dict I/O
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SearchConfig:
        """Build from a (YAML/JSON) mapping. Unknown keys are an error (with suggestions); numbers
        given as strings (YAML reads ``1e-3`` as a string) and token counts like ``"20M"`` are
        accepted; lists become tuples where needed. The result is validated."""
        if d is not None and not isinstance(d, Mapping):
            raise ConfigError(f"a search config must be a mapping of its fields, got {d!r}"[:200])
        d = dict(d or {})
        if not all(isinstance(k, str) for k in d):
            raise ConfigError(f"search config keys must be field names (strings), got {sorted(map(repr, d))}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown search config key(s): {', '.join(hints)}; known keys: {sorted(names)}")
        kw = {}
        for k, v in d.items():
            try:
                kw[k] = _coerce(k, v, cls.__dataclass_fields__[k].default)
            except (TypeError, ValueError, OverflowError) as exc:
                raise ConfigError(f"invalid search config: {k} = {v!r}: {exc}"[:300]) from None
        return cls(**kw).validate()

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"], out["z_betas"] = list(self.betas), list(self.z_betas)
        return out

    # fields that may change between a checkpoint and its resumption
    _RESUMABLE_CHANGES = ("max_steps", "max_tokens", "checkpoint_every", "flush_every_s", "progress", "plot", "device", "compile")


def _betas(p, name, v):
    try:
        b1, b2 = v
        if not (0 <= float(b1) < 1 and 0 <= float(b2) < 1):
            raise ValueError
    except (TypeError, ValueError):
        p.append(f"{name} must be two numbers in [0, 1), got {v!r}")


_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12}


def _coerce(key: str, v, default):
    if key in ("max_steps", "max_tokens", "checkpoint_every") and isinstance(v, str):
        s = v.strip().lower().replace("_", "")
        try:
            if s and s[-1] in _SUFFIX:
                return int(float(s[:-1]) * _SUFFIX[s[-1]])
            return int(float(s))
        except (ValueError, OverflowError):
            raise ConfigError(f"{key} must be an integer or a count like '20M', got {v!r}") from None
    if isinstance(v, str) and (isinstance(default, float) or key in ("lr", "grad_clip")):
        try:
            return float(v)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {v!r}") from None
    if isinstance(v, float) and isinstance(default, int) and not isinstance(default, bool) and v.is_integer():
        return int(v)
    if key in ("betas", "z_betas") and isinstance(v, list):
        return tuple(float(x) for x in v)
    return v


# ============================================================================ results and outputs


@dataclass
class SearchResult:
    """What :func:`run_search` returns. Weights are ``{source: weight}`` summing to 1."""

    weights: dict[str, float]
    last_weights: dict[str, float]
    average_weights: dict[str, float]
    source_names: list[str]
    trajectory: list[dict]
    compute: dict
    steps: int
    tokens: int
    stopped_reason: str
    skipped_nonfinite: int
    model: nn.Module
    out_dir: Path | None = None
    final_effective_batch: int | None = None  #: where the sink switched to ``weights`` (final="average")


def _atomic_write(path: Path, data: str | bytes) -> None:
    write_bytes_atomic(path, data if isinstance(data, bytes) else data.encode("utf-8"))


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _clean(o):
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: Path, obj) -> None:
    """Atomically write strict JSON (NaN becomes null)."""
    _atomic_write(Path(path), json.dumps(_clean(obj), indent=2, default=_json_default) + "\n")


def read_trajectory(path: str | os.PathLike) -> list[dict]:
    """Records of a ``trajectory.jsonl`` (a directory or the file). Skips a torn last line."""
    p = Path(path)
    if p.is_dir():
        p = p / TRAJECTORY_FILE
    out = []
    with open(p) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def plot_trajectory(records: list[dict], source_names: list[str], path: str | os.PathLike) -> None:
    """Stacked mixture weights vs tokens, and the target loss, into a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not records:
        return
    x = [r["tokens"] for r in records]
    W = [[r["weights"][n] for r in records] for n in source_names]
    tl = [r.get("target_loss") for r in records]
    has_target = any(v is not None for v in tl)
    fig, axes = plt.subplots(2 if has_target else 1, 1, figsize=(8, 6 if has_target else 3.5), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.stackplot(x, W, labels=source_names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixture weight")
    ax.set_title("FastMix weight trajectory")
    if len(source_names) <= 16:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    if has_target:
        ax2 = axes[1][0]
        ax2.plot(x, [math.nan if v is None else v for v in tl], color="k")
        ax2.set_ylabel("target loss")
        ax2.set_xlabel("proxy tokens")
    else:
        ax.set_xlabel("proxy tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Outputs:
    """Files of one run directory; every write is atomic."""

    def __init__(self, out_dir: Path | None, flush_every_s: float):
        self.dir = out_dir
        self.flush_every_s = flush_every_s
        self.records: list[dict] = []
        self._lines: list[str] = []
        self._dirty = False
        self._last_flush = 0.0
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / name

    def append(self, rec: dict) -> None:
        rec = _clean(rec)
        self.records.append(rec)
        self._lines.append(json.dumps(rec, default=_json_default))
        self._dirty = True
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        if self.dir is None or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_every_s:
            return
        _atomic_write(self.dir / TRAJECTORY_FILE, "".join(s + "\n" for s in self._lines))
        self._dirty = False
        self._last_flush = now

    def restore(self, upto_step: int) -> None:
        p = self.path(TRAJECTORY_FILE)
        if p is None or not p.exists():
            return
        for rec in read_trajectory(p):
            if rec.get("step", 0) <= upto_step:
                self.records.append(rec)
                self._lines.append(json.dumps(rec))
        self._dirty = True
        self.flush()


# ============================================================================ helpers


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='auto' or 'cpu'")
    return dev


def loss_weights(alpha: torch.Tensor, serve: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-source loss weights ``alpha / serve`` (``K * alpha`` for a uniform stream): training on a
    stream that serves source k with probability ``serve_k``, each sequence's loss times this
    weight, has the expected loss and gradient of training on an alpha-sampled stream."""
    return (alpha.to(torch.float64) / serve.to(torch.float64)).to(dtype)


def _resolve_names(data, source_names, cfg: SearchConfig) -> list[str]:
    for cand in (
        source_names,
        getattr(data, "source_names", None),
        getattr(getattr(data, "dataset", None), "source_names", None),
        cfg.sources,
    ):
        if cand is not None:
            names = [str(n) for n in cand]
            break
    else:
        raise ValueError(
            "cannot tell the source names: pass source_names=[...], set config.sources, or give a stream "
            "with a .source_names attribute"
        )
    if not names:
        raise ValueError("there are no sources (source_names is empty)")
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    return names


def _weights_vector(d: Mapping | None, names: list[str], what: str) -> list[float] | None:
    if d is None:
        return None
    missing = [n for n in names if n not in d]
    extra = [k for k in d if k not in names]
    if missing or extra:
        raise ValueError(
            f"{what} must give one weight per source {names}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unknown {extra}" if extra else "")
        )
    vals = []
    for n in names:
        try:
            x = float(d[n])
        except (TypeError, ValueError):
            raise ValueError(f"{what}[{n!r}] is not a number: {d[n]!r}") from None
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"{what}[{n!r}] must be finite and >= 0, got {x}")
        vals.append(x)
    if sum(vals) <= 0:
        raise ValueError(f"{what} are all zero")
    s = sum(vals)
    return [v / s for v in vals]


def _unpack_train(batch, K: int, first: bool):
    if not isinstance(batch, Mapping) or "tokens" not in batch or "source" not in batch:
        raise ValueError(
            "search batches must be dicts with 'tokens' (LongTensor [B, L+1]) and 'source' (LongTensor [B]); "
            f"got {type(batch).__name__}" + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
        )
    tokens, source = torch.as_tensor(batch["tokens"]), torch.as_tensor(batch["source"])
    if first:
        if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"batch['tokens'] must be an integer tensor [B, L+1] with L >= 1, got {tuple(tokens.shape)} {tokens.dtype}")
        if source.shape != (tokens.shape[0],):
            raise ValueError(f"batch['source'] must have shape [B]=[{tokens.shape[0]}], got {tuple(source.shape)}")
    if source.numel() and (int(source.min()) < 0 or int(source.max()) >= K):
        raise ValueError(f"batch['source'] holds ids outside [0, {K}) (there are {K} sources): {source.unique().tolist()}")
    return tokens.long(), source.long()


def _unpack_target(batch):
    mask = None
    if isinstance(batch, Mapping):
        if "tokens" not in batch:
            raise ValueError(f"target batches must have a 'tokens' key (LongTensor [B, L+1]); got keys {sorted(batch)}")
        tokens = torch.as_tensor(batch["tokens"])
        if batch.get("loss_mask") is not None:
            mask = torch.as_tensor(batch["loss_mask"]).bool()
    else:
        tokens = torch.as_tensor(batch)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"target tokens must be [B, L+1] with L >= 1, got shape {tuple(tokens.shape)}")
    if mask is not None and mask.shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise ValueError(
            f"target loss_mask must be [B, L] = {[tokens.shape[0], tokens.shape[1] - 1]} (one flag per predicted token), got {tuple(mask.shape)}"
        )
    return tokens.long(), mask


class _TargetRotation:
    """Cycles through the target batches (restarting the iterable when it ends)."""

    def __init__(self, target):
        if isinstance(target, (Mapping, torch.Tensor)):
            target = [target]
        self.src = target
        self.it = None
        self.pos = 0

    def next(self):
        if self.it is None:
            self.it = iter(self.src)
        try:
            b = next(self.it)
        except StopIteration:
            self.it = iter(self.src)
            try:
                b = next(self.it)
            except StopIteration:
                raise ValueError(
                    "the target yielded no batch: pass a non-empty list of target batches or a re-iterable "
                    "(a one-shot iterator cannot be rotated once exhausted)"
                ) from None
        self.pos += 1
        return b

    def state_dict(self) -> dict:
        d = {"pos": self.pos}
        if hasattr(self.src, "state_dict") and callable(self.src.state_dict):
            d["source_state"] = self.src.state_dict()
        return d

    def load_state_dict(self, d: dict) -> None:
        self.pos = 0
        self.it = None
        if "source_state" in d and hasattr(self.src, "load_state_dict"):
            self.src.load_state_dict(d["source_state"])
            self.pos = d["pos"]
            return
        n = d["pos"]
        if hasattr(self.src, "__len__"):
            n = n % max(1, len(self.src))
        for _ in range(n):
            self.next()
        self.pos = d["pos"]


def _config_diff(saved: dict, cfg: SearchConfig) -> list[str]:
    now = cfg.to_dict()
    out = []
    for k in sorted(set(saved) | set(now)):
        if k in SearchConfig._RESUMABLE_CHANGES:
            continue
        if saved.get(k) != now.get(k):
            out.append(f"{k}: checkpoint {saved.get(k)!r} != now {now.get(k)!r}")
    return out


# ============================================================================ the loop


def run_search(
    data: Iterable[Mapping[str, Any]],
    target: Iterable[Any] | Mapping[str, Any] | torch.Tensor | None,
    config: SearchConfig | Mapping[str, Any] | None = None,
    *,
    sink: WeightSink | Callable[[dict[str, float]], int] | None = None,
    out_dir: str | os.PathLike | None = None,
    model: nn.Module | None = None,
    loss_fn: TokenLossFn | None = None,
    source_names: list[str] | None = None,
    resume: bool | str = False,
) -> SearchResult:
    """Train a proxy on ``data`` and search mixture weights for ``target`` with FastMix.

    Args:
        data: the search stream -- any iterable of batches ``{"tokens": [B, L+1], "source": [B]}``
            (a ``MixtureStream`` serving sources uniformly, a ``DataLoader`` over it, ...). If it
            has ``state_dict``/``load_state_dict`` they are checkpointed; otherwise a resumed run
            re-iterates it and skips the batches already used (the iterable must be deterministic).
        target: the target batches (rotated): ``{"tokens": [B, L+1], "loss_mask": [B, L] (optional,
            True = token counts)}`` or plain token tensors; a list, a re-iterable or a stream.
            May be None only with ``hypergrad="none"``.
        config: a :class:`SearchConfig` or a mapping for :meth:`SearchConfig.from_dict`.
        sink: receives every new alpha (``sink.set_weights({name: w}) -> batch index`` or a
            callable); online mode -- e.g. a training job's ``MixtureStream``. With
            ``final="average"`` a finished search also pushes the exported (average) weights last.
        out_dir: where ``weights.json``, ``trajectory.jsonl``, ``trajectory.png``,
            ``compute.json``, ``search_config.json`` and ``checkpoint.pt`` go; None writes nothing.
        model: a proxy implementing :class:`~fastmix_data.search.model.HeadedLM` (default: built
            from ``config.model``/``model_args``/``seed``).
        loss_fn: ``loss_fn(logits [N, V], targets [N]) -> per-token losses [N]`` (default
            cross-entropy). The head hypergradient differentiates it w.r.t. the logits only.
        source_names: names of the K sources (default: ``data.source_names`` or ``config.sources``).
        resume: ``True`` resumes from ``out_dir/checkpoint.pt`` (error if absent), ``"auto"`` resumes
            when it exists, ``False`` starts afresh.
    """
    cfg = config if isinstance(config, SearchConfig) else SearchConfig.from_dict(config)
    cfg.validate()
    names = _resolve_names(data, source_names, cfg)
    K = len(names)
    if target is None and cfg.hypergrad != "none":
        raise ValueError("a target is required (pass target batches) unless hypergrad='none'")
    init = _weights_vector(cfg.init_weights, names, "init_weights")
    prior = _weights_vector(cfg.prior, names, "prior")
    serve_l = _weights_vector(cfg.serve_weights, names, "serve_weights")
    if serve_l is not None and min(serve_l) <= 0:
        raise ValueError(f"serve_weights must be > 0 for every source (the stream must serve each one), got {serve_l}")
    device = resolve_device(cfg.device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    # ---------------------------------------------------------------- model and optimisers
    if model is None:
        model = build_proxy(proxy_config(cfg.model, **cfg.model_args), seed=cfg.seed)
    if not is_headed_lm(model):
        raise TypeError(
            "the proxy model must expose final_hidden(x) -> [B, L, d] and head: nn.Linear(d, V) "
            "(see fastmix_data.search.model.HeadedLM)"
        )
    model.to(device)
    model.train()
    V = model.head.out_features
    d_model = model.head.in_features
    hidden_fn = model.final_hidden
    if cfg.compile:
        hidden_fn = torch.compile(model.final_hidden)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.model, 1e-3)
    opt_kw: dict[str, Any] = {"lr": lr, "betas": tuple(cfg.betas)}
    if device.type == "cuda":
        opt_kw["fused"] = True
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], **opt_kw
    )
    fm = FastMix(
        K, lr=cfg.z_lr, betas=tuple(cfg.z_betas), eps=cfg.z_eps, signal=cfg.signal, floor=cfg.floor,
        kl_coef=cfg.kl_coef, prior=prior, init=init,
    )
    serve = torch.tensor(serve_l if serve_l is not None else [1.0 / K] * K, dtype=torch.float64)
    nparams = count_params(model)
    Nf = nparams["flops"]

    # ---------------------------------------------------------------- run state
    st: dict[str, Any] = {
        "step": 0, "opt_steps": 0, "tokens": 0, "outer": 0, "skipped_train": 0,
        "wall_prev": 0.0, "cpu_prev": 0.0, "total_opt_steps": None,
        "flops": {"train": 0.0, "eval": 0.0, "hypergrad": 0.0},
        "tok": {"train": 0, "target": 0, "search_forward": 0, "scored": 0},
        "time": {"data": 0.0, "train": 0.0, "score": 0.0, "outer": 0.0, "io": 0.0},
    }
    window = SourceScores.zeros(K, dtype=torch.float64, device=device)
    tele = SourceScores.zeros(K, dtype=torch.float64, device=device)
    ema = GradientEMA(cfg.target_ema)
    buffers: list[deque] = [deque(maxlen=cfg.search_seqs_per_source) for _ in range(K)]
    rot = _TargetRotation(target) if target is not None else None
    out_path = Path(out_dir) if out_dir is not None else None
    outs = _Outputs(out_path, cfg.flush_every_s)
    ckpt_path = outs.path(CHECKPOINT_FILE)
    loss_w = loss_weights(fm.alpha(), serve).to(device)
    last_target_loss: float | None = None
    last_eff: int | None = None

    def push_sink(weights: list[float] | None = None) -> int | None:
        if sink is None:
            return None
        w = dict(zip(names, fm.alpha().tolist() if weights is None else weights))
        r = sink.set_weights(w) if hasattr(sink, "set_weights") else sink(w)
        return None if r is None else int(r)

    # ---------------------------------------------------------------- resume
    resumed = False
    data_state = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        diff = _config_diff(ck["config"], cfg)
        if diff:
            raise ValueError(f"checkpoint {ckpt_path} was written with a different config:\n  " + "\n  ".join(diff))
        if ck["source_names"] != names:
            raise ValueError(f"checkpoint {ckpt_path} has sources {ck['source_names']}, this run has {names}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        fm.load_state_dict(ck["fastmix"])
        for k in ("step", "opt_steps", "tokens", "outer", "skipped_train", "total_opt_steps", "flops", "tok", "time"):
            st[k] = ck["state"][k]
        st["wall_prev"] = ck["state"]["wall"]
        st["cpu_prev"] = ck["state"].get("cpu", 0.0)
        window = SourceScores.from_state_dict(ck["window"], device)
        tele = SourceScores.from_state_dict(ck["tele"], device)
        ema.load_state_dict(ck["ema"], device)
        for k, rows in enumerate(ck["buffers"]):
            buffers[k].extend(r.to(device) for r in rows)
        if rot is not None and ck.get("target") is not None:
            rot.load_state_dict(ck["target"])
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        last_target_loss = ck["state"].get("last_target_loss")
        data_state = ck.get("data")
        outs.restore(st["step"])
        loss_w = loss_weights(fm.alpha(), serve).to(device)
        resumed = True
    elif resume is True:
        if ckpt_path is None:
            raise ValueError("resume=True needs out_dir (the directory holding checkpoint.pt)")
        raise FileNotFoundError(f"resume=True but there is no checkpoint at {ckpt_path}")
    elif resume not in (False, True, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")

    if out_path is not None:
        write_json(out_path / CONFIG_FILE, {"config": cfg.to_dict(), "source_names": names})

    # ---------------------------------------------------------------- pieces of the loop
    def current_lr() -> float:
        s = st["opt_steps"]
        if cfg.lr_warmup_steps and s < cfg.lr_warmup_steps:
            return lr * (s + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "cosine" and st["total_opt_steps"]:
            T = max(1, st["total_opt_steps"] - cfg.lr_warmup_steps)
            prog = min(1.0, (s - cfg.lr_warmup_steps) / T)
            lo = lr * cfg.min_lr_ratio
            return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * prog))
        return lr

    def target_pass() -> float:
        """Forward the next target batch(es) at the current parameters; update the target
        gradient (EMA) and return the target loss."""
        G_sum, loss_sum, n_sum = None, 0.0, 0
        for _ in range(cfg.target_batches_per_step):
            tokens, mask = _unpack_target(rot.next())
            tokens = tokens.to(device, non_blocking=True)
            mask = mask.to(device) if mask is not None else None
            if int(tokens.max()) >= V:
                raise ValueError(f"target token id {int(tokens.max())} is outside the proxy's vocabulary of {V}")
            st["tok"]["target"] += tokens.shape[0] * (tokens.shape[1] - 1)
            st["flops"]["eval"] += 2.0 * Nf * tokens.shape[0] * (tokens.shape[1] - 1)
            if cfg.hypergrad == "full":
                grads, loss, n = full_target_gradient(model, tokens, params, loss_mask=mask, loss_fn=loss_fn, autocast=autocast())
                st["flops"]["hypergrad"] += 4.0 * Nf * tokens.shape[0] * (tokens.shape[1] - 1)
                G = grads
            else:
                with torch.no_grad(), autocast():
                    h = hidden_fn(tokens[:, :-1])
                    logits = model.head(h)
                hg = head_gradient(h, tokens[:, 1:], logits=logits, mask=mask, loss_fn=loss_fn, chunk_tokens=cfg.chunk_tokens)
                st["flops"]["hypergrad"] += 2.0 * V * d_model * hg.tokens
                G, loss, n = hg.grad, hg.loss, hg.tokens
            if n == 0:
                continue
            if G_sum is None:
                G_sum = [g * n for g in G] if isinstance(G, list) else G * n
            elif isinstance(G, list):
                for a, b in zip(G_sum, G):
                    a.add_(b * n)
            else:
                G_sum += G * n
            loss_sum += loss * n
            n_sum += n
        if n_sum == 0:
            raise ValueError("the target batches have no scored token (is every loss_mask all False?)")
        G_mean = [g / n_sum for g in G_sum] if isinstance(G_sum, list) else G_sum / n_sum
        ema.update(G_mean)
        return loss_sum / n_sum

    def buffer_scores() -> SourceScores:
        rows, src = [], []
        for k, buf in enumerate(buffers):
            rows.extend(buf)
            src.extend([k] * len(buf))
        if not rows:
            return SourceScores.zeros(K, device=device)
        tokens = torch.stack(rows)
        source = torch.tensor(src, device=device)
        ntok = tokens.shape[0] * (tokens.shape[1] - 1)
        if cfg.hypergrad == "full":
            sc = full_source_scores(model, tokens, source, ema.value, K, params, loss_fn=loss_fn, autocast=autocast())
            st["flops"]["eval"] += 2.0 * Nf * ntok
            st["flops"]["hypergrad"] += 4.0 * Nf * ntok * int(sc.present.sum())
        else:
            with torch.no_grad(), autocast():
                h = hidden_fn(tokens[:, :-1])
                logits = model.head(h)
            L = tokens.shape[1] - 1
            sc = source_head_scores(
                h, tokens[:, 1:], per_token_source(source, L), ema.value, K,
                logits=logits, loss_fn=loss_fn, chunk_tokens=cfg.chunk_tokens,
            )
            st["flops"]["eval"] += 2.0 * Nf * ntok
            st["flops"]["hypergrad"] += 2.0 * V * d_model * ntok
        st["tok"]["search_forward"] += ntok
        st["tok"]["scored"] += ntok
        return sc

    def record(info, updated: bool) -> None:
        a = fm.alpha()
        losses = tele.losses().tolist()
        rec = {
            "outer_step": st["outer"],
            "step": st["step"],
            "tokens": st["tokens"],
            "weights": dict(zip(names, a.tolist())),
            "source_loss": dict(zip(names, losses)),
            "target_loss": last_target_loss,
            "entropy": fm.entropy(a),
            "min_weight": float(a.min()),
            "lr": current_lr(),
            "updated": updated,
            "reason": None if info is None else info.reason,
            "signal": None if info is None else dict(zip(names, info.g)),
            "skipped_nonfinite": fm.skipped_nonfinite,
            "effective_batch": last_eff,
            "wall_s": st["wall_prev"] + (time.perf_counter() - t_start),
        }
        outs.append(rec)

    def write_weights(final: bool, reason: str | None = None) -> None:
        if out_path is None:
            return
        last, avg = fm.alpha().tolist(), fm.average().tolist()
        chosen = avg if cfg.final == "average" else last
        write_json(
            out_path / WEIGHTS_FILE,
            {
                "method": "fastmix",
                "final": final,
                "stopped_reason": reason,
                "mode": cfg.final,
                "weights": dict(zip(names, chosen)),
                "last": dict(zip(names, last)),
                "average": dict(zip(names, avg)),
                "updates": fm.steps,
                "step": st["step"],
                "tokens": st["tokens"],
                "skipped_nonfinite": fm.skipped_nonfinite,
            },
        )

    def outer_step() -> None:
        nonlocal window, tele, loss_w, last_target_loss, last_eff
        t0 = time.perf_counter()
        update = st["step"] >= cfg.warmup_steps
        info = None
        if cfg.hypergrad != "none":
            if cfg.search_batch == "buffer":
                last_target_loss = target_pass()
                scores = buffer_scores()
            else:
                scores = window
            info = fm.step(scores.means(), present=scores.present, proxy_lr=current_lr(), update=update)
            if info.updated:
                loss_w = loss_weights(fm.alpha(), serve).to(device)
                last_eff = push_sink()
            if cfg.search_batch == "window":
                window = SourceScores.zeros(K, dtype=torch.float64, device=device)
                last_target_loss = target_pass()
        st["outer"] += 1
        record(info, bool(info and info.updated))
        tele = SourceScores.zeros(K, dtype=torch.float64, device=device)
        write_weights(final=False)
        st["time"]["outer"] += time.perf_counter() - t0

    def save_checkpoint() -> None:
        if ckpt_path is None:
            return
        t0 = time.perf_counter()
        ck = {
            "version": 1,
            "config": cfg.to_dict(),
            "source_names": names,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "fastmix": fm.state_dict(),
            "state": {
                **{k: st[k] for k in ("step", "opt_steps", "tokens", "outer", "skipped_train", "total_opt_steps", "flops", "tok", "time")},
                "wall": st["wall_prev"] + (time.perf_counter() - t_start),
                "cpu": st["cpu_prev"] + (time.process_time() - c_start),
                "last_target_loss": last_target_loss,
            },
            "window": window.state_dict(),
            "tele": tele.state_dict(),
            "ema": ema.state_dict(),
            "buffers": [[r.cpu() for r in buf] for buf in buffers],
            "target": rot.state_dict() if rot is not None else None,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "data": data.state_dict() if callable(getattr(data, "state_dict", None)) else None,
        }
        with atomic_path(ckpt_path) as tmp:
            torch.save(ck, tmp)
        outs.flush()
        st["time"]["io"] += time.perf_counter() - t0

    def budget_reached() -> str | None:
        if cfg.max_steps is not None and st["step"] >= cfg.max_steps:
            return "max_steps"
        if cfg.max_tokens is not None and st["tokens"] >= cfg.max_tokens:
            return "max_tokens"
        return None

    # ---------------------------------------------------------------- data iterator
    if data_state is not None and callable(getattr(data, "load_state_dict", None)):
        data.load_state_dict(data_state)
        data_iter = iter(data)
    else:
        data_iter = iter(data)
        if resumed and st["step"]:
            warnings.warn(
                f"the search stream has no state_dict(): skipping the {st['step']} batches already used "
                "(the stream must be deterministic for an identical resumption)",
                stacklevel=2,
            )
            for _ in range(st["step"]):
                next(data_iter)

    t_start = time.perf_counter()
    c_start = time.process_time()
    pbar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=cfg.max_tokens, initial=st["tokens"], unit="tok", unit_scale=True, desc="fastmix search", dynamic_ncols=True)

    stopped = budget_reached()
    first = True
    if not resumed:
        # initial record (uniform weights, initial target loss); the window's first target gradient
        if cfg.hypergrad != "none" and rot is not None:
            last_target_loss = target_pass()
        last_eff = push_sink()  # the job follows the search's mixture from the start
        record(None, False)
        write_weights(final=False)
    elif sink is not None:
        last_eff = push_sink()

    error: BaseException | None = None
    try:
        while stopped is None:
            t0 = time.perf_counter()
            try:
                batch = next(data_iter)
            except StopIteration:
                stopped = "data_exhausted"
                warnings.warn(f"the search stream ended after {st['step']} batches, before the budget", stacklevel=2)
                break
            tokens, source = _unpack_train(batch, K, first)
            tokens = tokens.to(device, non_blocking=True)
            source = source.to(device, non_blocking=True)
            B, L = tokens.shape[0], tokens.shape[1] - 1
            if first:
                if int(tokens.max()) >= V:
                    raise ValueError(f"token id {int(tokens.max())} is outside the proxy's vocabulary of {V}")
                if cfg.max_tokens is not None:
                    by_tok = math.ceil(cfg.max_tokens / (B * L * cfg.grad_accum))
                    st["total_opt_steps"] = by_tok
                if cfg.max_steps is not None:
                    by_steps = math.ceil(cfg.max_steps / cfg.grad_accum)
                    st["total_opt_steps"] = min(by_steps, st["total_opt_steps"] or by_steps)
                if pbar is not None and cfg.max_tokens is None:
                    pbar.total = cfg.max_steps * B * L
                    pbar.refresh()
                budget_steps = st["total_opt_steps"] * cfg.grad_accum  # micro-batches the budget allows
                if cfg.hypergrad != "none" and budget_steps and budget_steps <= cfg.warmup_steps + cfg.outer_every:
                    warnings.warn(
                        f"the budget allows {budget_steps} micro-batches but the mixture is first updated after "
                        f"warmup_steps={cfg.warmup_steps} + outer_every={cfg.outer_every}: this search will return "
                        "its starting weights; lower warmup_steps/outer_every or raise max_steps/max_tokens",
                        stacklevel=2,
                    )
                first = False
            t1 = time.perf_counter()
            st["time"]["data"] += t1 - t0

            # ------------------------------------------------ proxy training micro-step
            x, y = tokens[:, :-1], tokens[:, 1:]
            with autocast():
                h = hidden_fn(x)
                logits = model.head(h)
            tl = token_losses(logits.reshape(B * L, -1), y.reshape(-1), loss_fn).view(B, L)
            seq = tl.mean(1)
            loss = (loss_w[source] * seq).mean()
            if torch.isfinite(loss):
                (loss / cfg.grad_accum).backward()
            else:
                st["skipped_train"] += 1
            with torch.no_grad():
                sd = seq.detach().double()
                tele.counts += segment_sums(torch.full_like(sd, L), source, K)
                tele.loss_sums += segment_sums(sd * L, source, K)
            st["tokens"] += B * L
            st["step"] += 1
            st["tok"]["train"] += B * L
            st["flops"]["train"] += 6.0 * Nf * B * L
            t2 = time.perf_counter()
            st["time"]["train"] += t2 - t1

            # ------------------------------------------------ search batch
            if cfg.hypergrad != "none":
                pos = (st["step"] - 1) % cfg.outer_every + 1  # 1..outer_every within the window
                in_scope = cfg.score_last is None or pos > cfg.outer_every - cfg.score_last
                if cfg.search_batch == "window" and ema.value is not None and in_scope:
                    window = window + source_head_scores(
                        h.detach(), y, per_token_source(source, L), ema.value, K,
                        logits=logits.detach(), loss_fn=loss_fn, chunk_tokens=cfg.chunk_tokens,
                    )
                    st["tok"]["scored"] += B * L
                    st["flops"]["hypergrad"] += 2.0 * V * d_model * B * L
                elif cfg.search_batch == "buffer":
                    for i, k in enumerate(source.tolist()):
                        buffers[k].append(tokens[i].detach())
            del h, logits, tl
            t3 = time.perf_counter()
            st["time"]["score"] += t3 - t2

            # ------------------------------------------------ proxy optimiser step
            if st["step"] % cfg.grad_accum == 0:
                for g in opt.param_groups:
                    g["lr"] = current_lr()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                st["opt_steps"] += 1
            st["time"]["train"] += time.perf_counter() - t3

            if st["step"] % cfg.outer_every == 0:
                outer_step()
            if pbar is not None:
                pbar.update(B * L)
                if st["step"] % cfg.outer_every == 0:
                    top = sorted(zip(names, fm.alpha().tolist()), key=lambda t: -t[1])[:4]
                    pbar.set_postfix_str(
                        f"loss={float(seq.detach().mean()):.3f} target={last_target_loss if last_target_loss is None else round(last_target_loss, 3)} "
                        + " ".join(f"{n}={w:.2f}" for n, w in top),
                        refresh=False,
                    )
            if st["step"] % cfg.grad_accum == 0:
                if cfg.checkpoint_every and st["step"] % cfg.checkpoint_every == 0:
                    save_checkpoint()
                stopped = budget_reached()
    except BaseException as e:  # a crash keeps the weights and the trajectory found so far
        error = e
        raise
    finally:
        if pbar is not None:
            pbar.close()
        t_io = time.perf_counter()
        outs.flush()
        write_weights(final=error is None, reason=stopped if error is None else f"error: {type(error).__name__}")
        st["time"]["io"] += time.perf_counter() - t_io

    # ---------------------------------------------------------------- end of run
    final_eff = None
    if sink is not None and cfg.final == "average":
        final_eff = push_sink(fm.average().tolist())  # the job continues under the exported mixture
    save_checkpoint()
    wall = st["wall_prev"] + (time.perf_counter() - t_start)
    fl = st["flops"]
    compute = {
        "method": "fastmix",
        "hypergrad": cfg.hypergrad,
        "search_batch": cfg.search_batch,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": "bfloat16" if use_bf16 else "float32",
        "n_params": nparams["total"],
        "n_params_embedding": nparams["embedding"],
        "n_params_flops": Nf,
        "num_sources": K,
        "steps": st["step"],
        "optimizer_steps": st["opt_steps"],
        "outer_steps": st["outer"],
        "z_updates": fm.steps,
        "tokens": dict(st["tok"]),
        "flops": {**fl, "total": fl["train"] + fl["eval"] + fl["hypergrad"]},
        "flops_note": "6*N per trained token, 2*N per evaluated token (target and search-batch forwards), "
        "hypergradient matmuls 2*V*d per scored/target token (head) or 4*N per backward token (full); "
        "N excludes the input embedding; attention's L^2 term is not counted",
        "wall_s": wall,
        "cpu_s": st["cpu_prev"] + (time.process_time() - c_start),
        "wall_breakdown_s": dict(st["time"]),
        "gpu_hours": wall / 3600 if device.type == "cuda" else 0.0,
        "skipped_nonfinite_hypergrad": fm.skipped_nonfinite,
        "skipped_nonfinite_train": st["skipped_train"],
        "host": platform.node(),
        "torch": torch.__version__,
    }
    if out_path is not None:
        write_json(out_path / COMPUTE_FILE, compute)
        if cfg.plot:
            try:
                plot_trajectory(outs.records, names, out_path / PLOT_FILE)
            except Exception as e:  # plotting must never lose a finished search
                warnings.warn(f"could not write {PLOT_FILE}: {e}", stacklevel=2)
    last, avg = fm.alpha().tolist(), fm.average().tolist()
    return SearchResult(
        weights=dict(zip(names, avg if cfg.final == "average" else last)),
        last_weights=dict(zip(names, last)),
        average_weights=dict(zip(names, avg)),
        source_names=names,
        trajectory=list(outs.records),
        compute=compute,
        steps=st["step"],
        tokens=st["tokens"],
        stopped_reason=stopped or "unknown",
        skipped_nonfinite=fm.skipped_nonfinite,
        model=model,
        out_dir=out_path,
        final_effective_batch=final_eff,
    )


__all__ = [
    "DEFAULT_LR",
    "SearchConfig",
    "SearchResult",
    "WeightSink",
    "loss_weights",
    "plot_trajectory",
    "read_trajectory",
    "resolve_device",
    "run_search",
    "write_json",
]
