"""The run directory every method writes: one writer, one layout.

::

    out_dir/
      weights.json        the exported mixture as token, sample and byte shares (+ candidates)
      trajectory.jsonl    one record per mixture update (strict JSON Lines)
      trajectory.png      stacked weights over the run (and the target loss when measured)
      compute.json        tokens, FLOPs and time (same keys for every method; proxy/compute.py)
      search_config.json  the config as given and the schedule resolved from the budget
      checkpoint.pt       online searches only (FastMix), for resume

Every file is written atomically, through :mod:`fastmix_data.io` (temp file + fsync + rename). ``weights.json``, worked example
(a K=2 search; the source statistics come from the shard index)::

    {"format_version": 2, "method": "fastmix", "final": true, "stopped_reason": "max_tokens",
     "weight_units": "tokens", "exported": "average",
     "weights": {"code": 0.6, "web": 0.4},
     "shares": {"tokens":  {"code": 0.6,   "web": 0.4},
                "samples": {"code": 0.273, "web": 0.727},
                "bytes":   {"code": 0.599, "web": 0.401}},
     "candidates": {"last": {...}, "tail": {...}, "average": {...}},
     "source_stats": {"code": {"rows": 100, "tokens": 200000, "text_bytes": 199900},
                      "web":  {"rows": 400, "tokens": 50000,  "text_bytes": 49600}},
     "tokens": 20000000, "details": {...method fields...}}

``weights`` are *token* shares: a search trains on packed sequences, so a source's weight is its
share of the tokens (``MixtureStream(..., weight_units="tokens")``, ``fastmix-data manifest
--weight-units tokens``). ``shares.samples`` are the same mixture as shares of documents
(token share / mean tokens per document, renormalised) and ``shares.bytes`` as shares of UTF-8
text bytes (token share x text bytes per token); both come from the shard index's counts and are
exact for the byte tokenizer and pre-tokenized sources (null when a source has no index).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastmix_data.io import write_json_atomic, write_text_atomic

WEIGHTS_FILE = "weights.json"
TRAJECTORY_FILE = "trajectory.jsonl"
PLOT_FILE = "trajectory.png"
COMPUTE_FILE = "compute.json"
CONFIG_FILE = "search_config.json"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FORMAT_VERSION = 2


# ============================================================================ JSON


def clean_json(o: Any) -> Any:
    """NaN/inf -> None and tensors/tuples/paths -> lists/str, recursively (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, torch.Tensor):
        return clean_json(o.tolist())
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Mapping):
        return {str(k): clean_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean_json(v) for v in o]
    return o


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write strict JSON (NaN becomes null), through :mod:`fastmix_data.io`."""
    write_json_atomic(path, clean_json(obj), indent=2)


def read_trajectory(path: str | os.PathLike) -> list[dict]:
    """Records of a ``trajectory.jsonl`` (a run directory or the file); a torn last line is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / TRAJECTORY_FILE
    out = []
    with open(p) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


# ============================================================================ shares


@dataclass(frozen=True)
class SourceStats:
    """Per-source counts from the shard index: documents (``rows``), ``tokens`` as the stream counts
    them, and UTF-8 ``text_bytes`` (None for pre-tokenized sources)."""

    rows: int
    tokens: int
    text_bytes: int | None

    @classmethod
    def of_sources(cls, sources: Mapping[str, Any]) -> dict[str, SourceStats] | None:
        """Stats of every source (None when a source cannot tell its token count)."""
        from fastmix_data.sources import open_source
        from fastmix_data.sources.base import Source

        out = {}
        for name, spec in sources.items():
            src = spec if isinstance(spec, Source) and not isinstance(spec, (str, list, dict)) else open_source(name, spec)
            tokens = src.tokens
            if not tokens:
                return None
            has_text = getattr(getattr(src, "columns", None), "text", None) is not None
            rows = sum(s.rows for s in src.shards)
            out[name] = cls(rows, int(tokens), int(tokens - rows) if has_text else None)
        return out


def shares(weights: Mapping[str, float], stats: Mapping[str, SourceStats] | None) -> dict[str, dict | None]:
    """``{"tokens", "samples", "bytes"}`` shares of a mixture given as token shares."""
    w = {n: float(v) for n, v in weights.items()}
    out: dict[str, dict | None] = {"tokens": w, "samples": None, "bytes": None}
    if stats is None or any(n not in stats for n in w):
        return out
    out["samples"] = _norm({n: v * stats[n].rows / stats[n].tokens for n, v in w.items()})
    if all(stats[n].text_bytes is not None for n in w):
        out["bytes"] = _norm({n: v * stats[n].text_bytes / stats[n].tokens for n, v in w.items()})
    return out


def _norm(d: Mapping[str, float]) -> dict[str, float]:
    s = sum(d.values())
    return {k: (v / s if s > 0 else 0.0) for k, v in d.items()}


# ============================================================================ plot


def plot_weights(records: Sequence[Mapping], names: Sequence[str], path: str | os.PathLike, *, title: str,
                 x: str = "tokens", xlabel: str = "proxy tokens") -> None:
    """Stacked weights against ``x`` and, when recorded, the target loss, into a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not records:
        return
    xs = [r.get(x, i) for i, r in enumerate(records)]
    W = [[r["weights"][n] for r in records] for n in names]
    tl = [r.get("target_loss") for r in records]
    if len(xs) == 1:  # one point: draw it as a band
        xs, W, tl = [xs[0], xs[0] + 1], [w * 2 for w in W], tl * 2
    has_target = any(v is not None for v in tl)
    fig, axes = plt.subplots(2 if has_target else 1, 1, figsize=(8, 6 if has_target else 3.5), sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    ax.stackplot(xs, W, labels=list(names))
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixture weight (token share)")
    ax.set_title(title)
    if len(names) <= 16:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    if has_target:
        axes[1][0].plot(xs, [math.nan if v is None else v for v in tl], color="k")
        axes[1][0].set_ylabel("target loss")
    axes[-1][0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ the writer


class RunWriter:
    """Writes one run directory (see the module docstring); with ``out_dir=None`` it only keeps the
    trajectory in memory.

    Args:
        out_dir: the run directory (created).
        method: the method's registry name.
        names: the source names, in order.
        stats: per-source index counts for the sample/byte shares (None: token shares only).
        flush_every_s: at most this long between rewrites of ``trajectory.jsonl`` (it is always
            rewritten by :meth:`flush`, at checkpoints and at the end).
    """

    def __init__(self, out_dir: str | os.PathLike | None, method: str, names: Sequence[str], *,
                 stats: Mapping[str, SourceStats] | None = None, flush_every_s: float = 10.0):
        self.dir = Path(out_dir) if out_dir is not None else None
        self.method, self.names, self.stats = method, list(names), stats
        self.flush_every_s = flush_every_s
        self.records: list[dict] = []
        self._lines: list[str] = []
        self._dirty = False
        self._last_flush = 0.0
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / name

    # ------------------------------------------------------------------ trajectory
    def record(self, rec: Mapping) -> None:
        """Append one trajectory record (``step``, ``tokens``, ``weights`` + method fields)."""
        rec = clean_json(rec)
        self.records.append(rec)
        self._lines.append(json.dumps(rec))
        self._dirty = True
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Rewrite ``trajectory.jsonl`` (when ``force`` or ``flush_every_s`` has passed)."""
        if self.dir is None or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_every_s:
            return
        write_text_atomic(self.dir / TRAJECTORY_FILE, "".join(s + "\n" for s in self._lines))
        self._dirty, self._last_flush = False, now

    def restore(self, upto_step: int) -> None:
        """Resume: keep the records on disk up to micro-batch ``upto_step``."""
        p = self.path(TRAJECTORY_FILE)
        if p is None or not p.exists():
            return
        for rec in read_trajectory(p):
            if rec.get("step", 0) <= upto_step:
                self.records.append(rec)
                self._lines.append(json.dumps(rec))
        self._dirty = True
        self.flush()

    # ------------------------------------------------------------------ results
    def weights_payload(self, weights: Mapping[str, float], *, exported: str, candidates: Mapping[str, Mapping],
                        final: bool, stopped_reason: str | None, tokens: int, details: Mapping | None) -> dict:
        """The ``weights.json`` content (see the module docstring)."""
        return {
            "format_version": WEIGHTS_FORMAT_VERSION,
            "method": self.method,
            "final": final,
            "stopped_reason": stopped_reason,
            "weight_units": "tokens",
            "exported": exported,
            "weights": dict(weights),
            "shares": shares(weights, self.stats),
            "candidates": {k: dict(v) for k, v in candidates.items()},
            "source_stats": None if self.stats is None else {n: vars(s) for n, s in self.stats.items()},
            "tokens": int(tokens),
            "details": dict(details or {}),
        }

    def write_weights(self, weights: Mapping[str, float], **kw: Any) -> dict:
        """Write ``weights.json`` (arguments of :meth:`weights_payload`); returns its content."""
        payload = self.weights_payload(weights, **kw)
        if self.dir is not None:
            write_json(self.dir / WEIGHTS_FILE, payload)
        return payload

    def write_compute(self, compute: Mapping) -> None:
        if self.dir is not None:
            write_json(self.dir / COMPUTE_FILE, compute)

    def write_config(self, config: Mapping, resolved: Mapping) -> None:
        """``search_config.json``: the config as given and the values resolved from the budget."""
        if self.dir is not None:
            write_json(self.dir / CONFIG_FILE, {"config": config, "resolved": resolved, "source_names": self.names})

    def plot(self, *, x: str = "tokens", xlabel: str = "proxy tokens") -> None:
        """``trajectory.png``; a failure to plot is a warning, never a lost run."""
        if self.dir is None:
            return
        try:
            plot_weights(self.records, self.names, self.dir / PLOT_FILE, title=f"{self.method} weight trajectory",
                         x=x, xlabel=xlabel)
        except Exception as e:  # noqa: BLE001 - a plot must never lose a finished run
            warnings.warn(f"could not write {PLOT_FILE}: {e}", stacklevel=2)


__all__ = [
    "CHECKPOINT_FILE",
    "COMPUTE_FILE",
    "CONFIG_FILE",
    "PLOT_FILE",
    "TRAJECTORY_FILE",
    "WEIGHTS_FILE",
    "RunWriter",
    "SourceStats",
    "clean_json",
    "plot_weights",
    "read_trajectory",
    "shares",
    "write_json",
]
