"""The common outputs and result type of every mixture method.

:func:`write_outputs` writes ``weights.json``, ``trajectory.jsonl``, ``trajectory.png`` and
``compute.json`` in the format of :func:`fastmix_data.search.trainer.run_search` (using
:func:`_write_jsonl` and :func:`plot_weights`); :class:`MethodResult` is what every method returns,
and :func:`push_weights` sends weights to a sink. Moved out of
:mod:`fastmix_data.search.train_static`, which re-exports them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fastmix_data.io import write_text_atomic

from .trainer import TRAJECTORY_FILE, write_json

WEIGHTS_FILE = "weights.json"
COMPUTE_FILE = "compute.json"
PLOT_FILE = "trajectory.png"

# ============================================================================ outputs


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from .trainer import _clean, _json_default

    write_text_atomic(path, "".join(json.dumps(_clean(r), default=_json_default) + "\n" for r in records))


def plot_weights(records: list[dict], names: list[str], path: str | os.PathLike, *, title: str,
                 x: str = "tokens", xlabel: str = "proxy tokens") -> None:
    """Stacked weights against ``x`` (and the target loss when recorded), as
    :func:`trainer.plot_trajectory` draws them, with a method-specific title and x axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not records:
        return
    xs = [r.get(x, i) for i, r in enumerate(records)]
    W = [[r["weights"][n] for r in records] for n in names]
    tl = [r.get("target_loss") for r in records]
    has_target = any(v is not None for v in tl)
    fig, axes = plt.subplots(2 if has_target else 1, 1, figsize=(8, 6 if has_target else 3.5), sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    if len(xs) == 1:
        xs = [xs[0], xs[0] + 1]
        W = [w * 2 for w in W]
        tl = tl * 2
    ax.stackplot(xs, W, labels=names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixture weight")
    ax.set_title(title)
    if len(names) <= 16:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    if has_target:
        ax2 = axes[1][0]
        ax2.plot(xs, [math.nan if v is None else v for v in tl], color="k")
        ax2.set_ylabel("target loss")
    axes[-1][0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir: str | os.PathLike | None, method: str, names: list[str], weights: Mapping[str, float],
                  trajectory: list[dict], compute: Mapping, *, extra: Mapping | None = None, plot: bool = True,
                  x: str = "tokens", xlabel: str = "proxy tokens") -> None:
    """The common outputs of a method run, as :func:`run_search` writes them: ``weights.json``
    (``method``, ``final``, ``weights`` + method fields), ``trajectory.jsonl`` (one record per
    update: ``step``, ``tokens``, ``weights`` ...), ``trajectory.png`` and ``compute.json``."""
    if out_dir is None:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / WEIGHTS_FILE, {"method": method, "final": True, "weights": dict(weights), **dict(extra or {})})
    _write_jsonl(out / TRAJECTORY_FILE, trajectory)
    write_json(out / COMPUTE_FILE, dict(compute))
    if plot:
        try:
            plot_weights(trajectory, names, out / PLOT_FILE, title=f"{method} weight trajectory", x=x, xlabel=xlabel)
        except Exception as e:  # a plot must never lose a finished run
            import warnings

            warnings.warn(f"could not write {PLOT_FILE}: {e}", stacklevel=2)


# ============================================================================ method results


@dataclass
class MethodResult:
    """What every mixture method returns (see :func:`fastmix_data.search.methods.run_method`).

    Attributes:
        method: registry name.
        weights: the exported static mixture ``{source: weight}`` (token shares, summing to 1).
        source_names: the sources, in order.
        trajectory: the records written to ``trajectory.jsonl``.
        compute: the dict written to ``compute.json`` (tokens, FLOPs, wall time).
        extra: method-specific results (also in ``weights.json``).
        out_dir: where the outputs were written (None: nothing written).
        model: the method's trained proxy when it has one worth keeping (online methods).
    """

    method: str
    weights: dict[str, float]
    source_names: list[str]
    trajectory: list[dict]
    compute: dict
    extra: dict = field(default_factory=dict)
    out_dir: Path | None = None
    model: nn.Module | None = None


def push_weights(sink, weights: Mapping[str, float]) -> int | None:
    """Send ``weights`` to a sink (``sink.set_weights(w)`` or a callable); returns the effective batch."""
    if sink is None:
        return None
    r = sink.set_weights(dict(weights)) if hasattr(sink, "set_weights") else sink(dict(weights))
    return None if r is None else int(r)
