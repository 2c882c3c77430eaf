"""URL parsing and redaction: what is a URL, which scheme, and how to name one in a message.

A *location* is either a local path (``/data/x.parquet``, ``data/*.tar``, ``file:///data/x.tar``)
or a URL with a scheme of two or more letters (``s3://bucket/key``, ``gs://``, ``az://``,
``abfs://``, ``hf://datasets/org/name/...``, ``http(s)://``, ``memory://``). URLs are data: reading
one runs no code, so they need no opt-in. ``pipe:`` is not a URL here: it runs a shell command and
stays behind ``allow_unsafe`` (see :mod:`fastmix_data.sources.safety`).

Credentials never belong in a URL: a URL with a password (``s3://key:secret@bucket``) or a
credential-like query parameter (a presigned ``X-Amz-Signature``, an Azure SAS ``sig``, a
``token``) is refused by :func:`check_no_credentials`, because the URL would otherwise be copied into
index files, stream states, manifests and log lines. :func:`redact` is applied to every URL that goes
into a message anyway.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import parse_qsl, urlsplit

from fastmix_data.errors import UnsafeInputError

# Two or more letters before the colon, so that Windows drive letters ("C:\\") are not URLs.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
LOCAL_SCHEMES = frozenset({"file", "local"})
PIPE_SCHEME = "pipe"
CREDENTIAL_PARAMS = frozenset(
    {
        "x-amz-signature", "x-amz-credential", "x-amz-security-token", "signature", "sig", "token",
        "access_token", "googleaccessid", "x-goog-signature", "x-goog-credential", "sas", "password",
        "secret", "key", "apikey", "api_key",
    }
)  # fmt: skip
GLOB_CHARS = "*?["


def scheme_of(location: str) -> str | None:
    """The lower-cased scheme of ``location`` (``"s3"``, ``"file"``, ``"pipe"``), None for a path."""
    colon = location.find(":", 0, 40)
    if colon < 2:  # no scheme, or a drive letter (called per shard: skip the regex when we can)
        return None
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else None


def is_url(location: str) -> bool:
    """True for a remote URL (any scheme but ``file``/``local``/``pipe``)."""
    scheme = scheme_of(location)
    return scheme is not None and scheme not in LOCAL_SCHEMES and scheme != PIPE_SCHEME


def local_path(location: str) -> str:
    """The local path of ``file:///x`` / ``local:///x`` / ``/x`` (unchanged when not a file URL)."""
    scheme = scheme_of(location)
    if scheme in LOCAL_SCHEMES:
        rest = location[len(scheme) + 1 :]
        return rest[2:] if rest.startswith("//") else rest
    return location


def redact(location: str) -> str:
    """``location`` safe to log: userinfo replaced by ``***@``, every query value by ``***``."""
    if not is_url(location):
        return location
    parts = urlsplit(location)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{k}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    out = f"{parts.scheme}://{netloc}{parts.path}"
    return out + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def check_no_credentials(location: str) -> None:
    """Refuse a URL that carries a password or a credential-like query parameter.

    Raises:
        UnsafeInputError: naming the redacted URL and where credentials go instead.
    """
    if not is_url(location):
        return
    parts = urlsplit(location)
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    params = {k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if ":" in userinfo or params & CREDENTIAL_PARAMS:
        raise UnsafeInputError(
            f"{redact(location)} carries credentials in the URL; they would be copied into index files, "
            "states, manifests and logs. Give them through the environment (AWS_*, GOOGLE_APPLICATION_"
            "CREDENTIALS, AZURE_STORAGE_*, HF_TOKEN), a profile or an instance role, or storage_options="
        )


def has_glob(location: str) -> bool:
    """True when the path part of ``location`` has glob characters."""
    path = urlsplit(location).path if is_url(location) else location
    return any(c in path for c in GLOB_CHARS)


def split_url(url: str) -> tuple[str, str]:
    """``("s3://bucket", "/a/b.tar")`` for ``s3://bucket/a/b.tar`` (no query or fragment)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path


def join(base: str, relative: str) -> str:
    """``base/relative`` for a URL or a path, refusing ``..`` and absolute names that leave base.

    Raises:
        UnsafeInputError: ``relative`` is absolute or escapes ``base``.
    """
    if not is_url(base):
        return posixpath.join(base, relative)
    head, path = split_url(base)
    joined = posixpath.normpath(posixpath.join(path or "/", relative))
    root = posixpath.normpath(path or "/")
    if relative.startswith("/") or scheme_of(relative) or (joined != root and not joined.startswith(root.rstrip("/") + "/")):
        raise UnsafeInputError(
            f"name {relative!r} listed under {redact(base)} points outside it; fix the dataset's index file"
        )
    return head + joined


def joiner(base: str):
    """A fast ``lambda relative: join(base, relative)`` for many names under one base (index files
    of 100,000 shards): the same refusals, by string checks instead of URL parsing per name."""
    if not is_url(base):
        return lambda relative: join(base, relative)
    prefix = base.rstrip("/") + "/"

    def one(relative: str) -> str:
        parts = relative.split("/")
        if relative.startswith("/") or "" in parts or "." in parts or ".." in parts or scheme_of(relative):
            return join(base, relative)  # the general path refuses escapes with a clear message
        return prefix + relative

    return one


def dirname(location: str) -> str:
    """The parent of a URL (``s3://b/a/x.tar`` -> ``s3://b/a``) or of a path."""
    if not is_url(location):
        return posixpath.dirname(location)
    head, path = split_url(location)
    return head + posixpath.dirname(path.rstrip("/"))


def common_dir(locations: list[str]) -> str:
    """The longest common parent directory of URLs (same scheme and bucket) or of paths; ``""``
    when they share none (different buckets or schemes)."""
    if not locations:
        return ""
    if not all(is_url(x) for x in locations):
        if any(is_url(x) for x in locations):
            return ""
        return posixpath.commonpath([posixpath.dirname(x) for x in locations])
    heads = {split_url(x)[0] for x in locations}
    if len(heads) != 1:
        return ""
    dirs = [posixpath.dirname(split_url(x)[1]) or "/" for x in locations]
    return heads.pop() + posixpath.commonpath(dirs)


def relative_name(location: str, root: str) -> str:
    """``location`` relative to ``root`` (POSIX separators; query strings dropped), or the
    location's base name when it is not under root."""
    loc = split_url(location)[1] if is_url(location) else location
    base = split_url(root)[1] if is_url(root) else root
    if base and (loc == base or loc.startswith(base.rstrip("/") + "/")):
        return posixpath.relpath(loc, base)
    return posixpath.basename(loc)
