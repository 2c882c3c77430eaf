"""Small helpers shared by the exporters: budget parsing, path checks (atomic writes and hashing live
in :mod:`fastmix_data.io`, byte sizes in :func:`fastmix_data.storage.parse_size`)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from fastmix_data.errors import ManifestError
from fastmix_data.storage.cache import parse_size as storage_parse_size

_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_BUDGET = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([kmbgt]?)\s*[_ ]?\s*(tokens|samples|sequences|items)\s*$", re.I
)
BUDGET_UNITS = {"tokens": "tokens", "samples": "items", "sequences": "items", "items": "items"}


def parse_budget(budget: str | int) -> tuple[str, int]:
    """``"10B_tokens"`` -> ("tokens", 10**10); ``"1M_samples"`` / an int -> ("items", n).

    Suffixes k, M, B (or G), T scale by 10**3, 10**6, 10**9, 10**12. "samples", "sequences" and
    "items" all count items (rows in sample mode, packed sequences in packing mode).

    Raises:
        ManifestError: unparsable, zero or negative budget.
    """
    if isinstance(budget, bool):
        raise ManifestError(f"budget {budget!r} is not a number of items or a string like '10B_tokens'")
    if isinstance(budget, int):
        units, amount = "items", int(budget)
    else:
        match = _BUDGET.match(str(budget))
        if not match:
            raise ManifestError(
                f"cannot parse budget {budget!r}; use e.g. '10B_tokens', '1M_samples', '500k_sequences' or an int"
            )
        number, scale, unit = match.groups()
        amount = int(round(float(number) * _SCALE[scale.lower()]))
        units = BUDGET_UNITS[unit.lower()]
    if amount <= 0:
        raise ManifestError(f"budget {budget!r} must be positive")
    return units, amount


def parse_size(size: str | int) -> int:
    """``"256MB"`` -> 256_000_000, ``"1GiB"`` -> 2**30, an int -> bytes (ManifestError if invalid)."""
    try:
        return storage_parse_size(size)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces, no NaN) for fingerprints."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def relative_inside(root: str, path: str, what: str, resolved: dict[str, str] | None = None) -> str:
    """``path`` relative to ``root`` (POSIX separators), refusing anything that leaves ``root``.

    Both the lexical path and its symlink-resolved target must stay inside the root. ``resolved``: a
    dict the caller keeps across the shards of one call, so each directory is resolved once.

    Raises:
        ManifestError: naming the path, when it is outside root or a symlink pointing outside.
    """
    root = os.path.abspath(root)
    path = os.path.abspath(path)
    rel = os.path.relpath(path, root)
    if rel == os.curdir or rel.startswith(os.pardir) or os.path.isabs(rel):
        raise ManifestError(
            f"{what} {path} is outside the manifest root {root}; pass a root that contains it"
        )
    _check_real(root, path, what, resolved)
    return rel.replace(os.sep, "/")


def join_inside(root: str, rel: str, what: str, resolved: dict[str, str] | None = None) -> str:
    """``root/rel`` for a relative path read from a manifest, refusing escapes.

    Refused: absolute paths, ``..`` components, empty names, and symlinks resolving outside root.
    ``resolved``: as for :func:`relative_inside`.
    """
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{what} has an empty or non-string path {rel!r}")
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or os.path.isabs(rel) or re.match(r"^[A-Za-z]:", rel):
        raise ManifestError(f"{what} path {rel!r} is absolute; manifest paths must be relative to the root")
    if any(p in ("..",) for p in parts) or any(p == "" for p in parts):
        raise ManifestError(
            f"{what} path {rel!r} escapes the manifest root (it has '..' or empty components)"
        )
    path = os.path.join(os.path.abspath(root), *parts)
    _check_real(root, path, what, resolved)
    return path


def _resolved_dir(directory: str, resolved: dict[str, str] | None) -> str:
    """``os.path.realpath(directory)``, once per directory when the caller keeps ``resolved``."""
    if resolved is None:
        return os.path.realpath(directory)
    if directory not in resolved:
        resolved[directory] = os.path.realpath(directory)
    return resolved[directory]


def _realpath(path: str, resolved: dict[str, str] | None) -> str:
    """``os.path.realpath(path)``: a file that is not a symlink resolves to its resolved directory
    joined with its name (one lstat per file when ``resolved`` is kept across files)."""
    head, name = os.path.split(path)
    if resolved is None or name in ("", os.curdir, os.pardir) or os.path.islink(path):
        return os.path.realpath(path)
    return os.path.join(_resolved_dir(head, resolved), name)


def _check_real(root: str, path: str, what: str, resolved: dict[str, str] | None = None) -> None:
    real_root = _resolved_dir(root, resolved)
    real = _realpath(path, resolved)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ManifestError(
            f"{what} {path} resolves to {real}, outside the manifest root {real_root} (a symlink "
            "pointing out of the root); copy the file under the root or choose a root that contains it"
        )
