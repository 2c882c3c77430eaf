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
import logging
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
log = logging.getLogger(__name__)


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


def optional_import(name: str, fallback: str) -> types.ModuleType | None:
    """Import an optional dependency; on *any* failure return None and log why, once per module.

    A broken install fails in many ways besides ``ImportError``: a torchvision built for another
    torch raises ``RuntimeError`` ("operator torchvision::nms does not exist"), a bad binary
    ``OSError``, an old package ``AttributeError``. All of them mean "not available" here, and the
    caller takes its documented ``fallback`` (named in the log line).
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if getattr(exc, "name", None) not in (name, name.split(".")[0]):
            _log_once(name, f"{type(exc).__name__}: {exc}", fallback)
        return None  # plainly absent: the normal case, nothing to report
    except Exception as exc:  # noqa: BLE001 - any failure of an optional import degrades
        _log_once(name, f"{type(exc).__name__}: {exc}", fallback)
        return None


_REPORTED: set[str] = set()


def _log_once(name: str, reason: str, fallback: str) -> None:
    if name not in _REPORTED:
        _REPORTED.add(name)
        log.warning("optional dependency %s cannot be imported (%s); %s", name, reason, fallback)


def import_streaming() -> types.ModuleType:
    """Import and return the ``streaming`` package (mosaicml-streaming), with or without torchvision.

    A torchvision (or transformers) that is installed but fails to import, with any exception, is
    treated as absent: the stand-ins are used, and the reason is logged once.

    Raises:
        ImportError: mosaicml-streaming is not installed (``pip install 'fastmix_data[mds]'``), or it
            fails to import (the message says why).
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
        optional_import("transformers.feature_extraction_utils", "MDS support imports streaming without it")
        if optional_import("torchvision", "MDS support uses stand-ins for streaming's vision imports") is not None:
            return _import_streaming()
        mods = _stand_ins()
        saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "torchvision"}
        sys.modules.update(mods)
        try:
            return _import_streaming()
        finally:
            for name, mod in mods.items():
                if sys.modules.get(name) is mod:
                    del sys.modules[name]
            sys.modules.update(saved)  # what a failed torchvision import left behind, as it was


def _import_streaming() -> types.ModuleType:
    try:
        return importlib.import_module("streaming")
    except ImportError:
        raise
    except Exception as exc:  # a broken install: MDS is unavailable, the rest of fastmix_data works
        raise ImportError(
            f"mosaicml-streaming is installed but fails to import ({type(exc).__name__}: {exc}); MDS sources "
            "are unavailable until it is repaired (pip install --force-reinstall 'fastmix_data[mds]')"
        ) from exc
