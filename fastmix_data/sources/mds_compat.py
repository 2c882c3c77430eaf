"""Import mosaicml-streaming without torchvision.

``import streaming`` imports ``streaming.vision``, which needs ``torchvision`` at import time (for a
base class and one helper). We read and write MDS text shards only, and installing torchvision would
pull a CUDA build of torch, so when torchvision is absent we register tiny stand-in modules for the
duration of the import and remove them again afterwards. Only the vision datasets of streaming use
them, and calling into them raises a clear error. See docs/dependencies.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_STAND_IN_NAMES = (
    "torchvision",
    "torchvision.datasets",
    "torchvision.transforms",
    "torchvision.transforms.functional",
)
_LOCK = threading.Lock()


class _VisionDataset:
    """Stand-in base class for streaming's vision datasets, which fastmix_data never uses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError("torchvision is not installed; streaming's vision datasets are unavailable")


def _to_tensor(*args: Any, **kwargs: Any) -> Any:
    raise ImportError(
        "torchvision is not installed: streaming's image helpers are unavailable in fastmix_data "
        "(install torchvision yourself if you need them)"
    )


def _stand_ins() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in _STAND_IN_NAMES}
    mods["torchvision.datasets"].VisionDataset = _VisionDataset  # type: ignore[attr-defined]
    mods["torchvision.transforms.functional"].to_tensor = _to_tensor  # type: ignore[attr-defined]
    mods["torchvision"].datasets = mods["torchvision.datasets"]  # type: ignore[attr-defined]
    mods["torchvision"].transforms = mods["torchvision.transforms"]  # type: ignore[attr-defined]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]  # type: ignore[attr-defined]
    return mods


def _torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision")
    except ImportError:
        return False
    return True


def import_streaming() -> types.ModuleType:
    """Import and return the ``streaming`` package (mosaicml-streaming), with or without torchvision.

    Raises:
        ImportError: mosaicml-streaming is not installed (``pip install 'fastmix_data[mds]'``).
    """
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    with _LOCK:
        if "streaming" in sys.modules:
            return sys.modules["streaming"]
        if importlib.util.find_spec("streaming") is None:
            raise ImportError(
                "reading or writing MDS shards needs mosaicml-streaming: pip install 'fastmix_data[mds]'"
            )
        # transformers probes for torchvision with find_spec, which fails on a spec-less stand-in;
        # importing it first lets it cache the honest answer (absent).
        importlib.import_module("transformers.feature_extraction_utils")
        if _torchvision_importable():
            return importlib.import_module("streaming")
        mods = _stand_ins()
        sys.modules.update(mods)
        try:
            return importlib.import_module("streaming")
        finally:
            for name, mod in mods.items():
                if sys.modules.get(name) is mod:
                    del sys.modules[name]
