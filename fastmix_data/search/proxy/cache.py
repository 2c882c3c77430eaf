"""Trained proxies on disk, reused across runs: MixMin's per-source proxies, DoReMi's reference.

A proxy is keyed by a JSON description of what made it: the *content* fingerprint of its data
(format, columns and shard sha256s -- not paths or names, so a copy of the same data elsewhere
reuses it) and its training config. Layout: ``DIR/<key>/model.pt`` (a state dict, loaded with
``weights_only=True``) and ``DIR/<key>/meta.json`` (the description and the compute that training
cost, which every run that reuses the proxy is charged). Writes are atomic; an unreadable entry is
retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastmix_data.io import atomic_path

from ..config import TrainConfig
from ..model import build_proxy
from ..outputs import write_json
from .trainer import proxy_shape, resolve_device


def source_fingerprints(sources: Mapping[str, Any]) -> dict[str, str]:
    """Content fingerprint of each source: its format, columns and shard sha256s."""
    from fastmix_data.sources import open_source
    from fastmix_data.sources.base import Source

    out = {}
    for name, spec in sources.items():
        src = spec if isinstance(spec, Source) and not isinstance(spec, (str, list, dict)) else open_source(name, spec)
        cols = getattr(src, "columns", None)
        obj = {"format": src.format, "columns": [getattr(cols, "text", None), getattr(cols, "ids", None)],
               "shards": [s.sha256 for s in src.shards]}
        out[name] = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return out


def cache_key(description: Mapping) -> str:
    """The 24-hex-digit key of a JSON-able description."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ProxyCache:
    """Proxies on disk (see the module docstring); ``cache_dir=None`` disables caching."""

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.dir = Path(cache_dir) if cache_dir is not None else None

    def get_or_train(self, description: Mapping, train: TrainConfig,
                     fit: Callable[[], tuple[nn.Module, dict]]) -> tuple[nn.Module, dict, bool]:
        """``(model, compute, cached)``: the cached model for ``description``, or ``fit()``'s result
        (then stored)."""
        key = cache_key(description)
        if self.dir is not None:
            d = self.dir / key
            try:
                meta = json.loads((d / "meta.json").read_text())
                model = build_proxy(proxy_shape(train))
                model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
                return model.to(resolve_device(train.device)), meta["compute"], True
            except (OSError, KeyError, ValueError, RuntimeError):
                pass
        model, compute = fit()
        if self.dir is not None:
            d = self.dir / key
            with atomic_path(d / "model.pt") as tmp:
                torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
            write_json(d / "meta.json", {"description": dict(description), "compute": compute})
        return model, compute, False


__all__ = ["ProxyCache", "cache_key", "source_fingerprints"]
