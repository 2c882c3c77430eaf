"""The proxy layer every method shares: the trainer and evaluation (``trainer.py``), compute
accounting (``compute.py``), the on-disk proxy cache (``cache.py``) and the static-mixture final
run (``static.py``). The model itself is :mod:`fastmix_data.search.model`."""

from .cache import ProxyCache, cache_key, source_fingerprints
from .compute import ComputeMeter
from .static import StaticResult, train_static
from .trainer import EvalResult, ProxyTrainer, evaluate, make_stream, resolve_device

__all__ = [
    "ComputeMeter",
    "EvalResult",
    "ProxyCache",
    "ProxyTrainer",
    "StaticResult",
    "cache_key",
    "evaluate",
    "make_stream",
    "resolve_device",
    "source_fingerprints",
    "train_static",
]
