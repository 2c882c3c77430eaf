"""Load a script of ``benchmarks/quality/`` as a module, for tests (its folder on ``sys.path`` while
it is in use: the scripts import each other by name)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

QUALITY = Path(__file__).resolve().parent.parent / "benchmarks" / "quality"


@contextlib.contextmanager
def quality_module(script: str) -> Iterator[ModuleType]:
    sys.path.insert(0, str(QUALITY))
    try:
        spec = importlib.util.spec_from_file_location(f"{Path(script).stem}_under_test", QUALITY / script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(QUALITY))
