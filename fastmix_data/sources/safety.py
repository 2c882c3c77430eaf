"""Safety checks on source specs: nothing that executes, no escaping the dataset root, no pickle.

URLs (``s3://``, ``gs://``, ``az://``, ``hf://``, ``http(s)://`` ...) are data: they are read through
:mod:`fastmix_data.storage` without any opt-in, but one carrying credentials is refused (they would
end up in states, manifests and logs). Opting in (``allow_unsafe=True``) enables only ``pipe:`` URLs
(a shell command whose stdout is a tar) and pickled members/columns.
"""

from __future__ import annotations

import os
import re

from fastmix_data.errors import UnsafeInputError
from fastmix_data.storage.urls import check_no_credentials

PIPE_PREFIX = "pipe:"
FILE_PREFIX = "file://"
UNSAFE_SUFFIXES = (".pkl", ".pickle", ".pyd")
# Two or more letters before the colon, so that Windows drive letters ("C:\\") are not URLs.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")


def is_pipe(path: str) -> bool:
    return path.startswith(PIPE_PREFIX)


def check_location(spec: str, allow_unsafe: bool) -> str:
    """Return the local path for ``spec`` (``file://`` stripped), the URL, or the ``pipe:`` URL when
    allowed.

    Raises:
        UnsafeInputError: a ``pipe:`` URL without ``allow_unsafe``; a URL with credentials in it.
    """
    if spec.startswith(FILE_PREFIX):
        return spec[len(FILE_PREFIX) :]
    if is_pipe(spec):
        if not allow_unsafe:
            raise UnsafeInputError(
                f"{spec!r} is a pipe: URL, which runs a shell command; pass allow_unsafe=True to "
                "open_source if you trust it (WebDataset sources only)"
            )
        return spec
    if _SCHEME.match(spec):
        check_no_credentials(spec)
    return spec


def inside_root(root: str, relative: str) -> str:
    """Join ``relative`` under ``root``, refusing paths that escape it (``..``, absolute paths).

    Raises:
        UnsafeInputError: the joined path resolves outside ``root``.
    """
    joined = os.path.abspath(os.path.join(root, relative))
    real_root = os.path.realpath(root)
    real = os.path.realpath(joined)
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafeInputError(
            f"shard name {relative!r} listed in {root} points outside that directory; "
            "fix the dataset's index file"
        )
    return joined


def unsafe_member(name: str) -> bool:
    """Whether a member/column name needs pickle to decode."""
    return name.lower().endswith(UNSAFE_SUFFIXES) or name.lower() in {s[1:] for s in UNSAFE_SUFFIXES}
