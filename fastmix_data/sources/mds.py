"""MosaicML Streaming (MDS) shards, read with mosaicml-streaming's own MDS reader.

An MDS dataset is a directory with ``index.json`` listing shard files (``shard.00000.mds``, or
``shard.00000.mds.zstd`` etc. when compressed) and their column names and encodings. Each shard file
is one shard. The text column must have encoding ``str``; the ids column ``ndarray:<int type>``,
``ndarray`` or ``json`` (a list of ints). Columns with encoding ``pkl`` are refused unless
``allow_unsafe``.

A shard file is read whole into memory and its samples are decoded by
``streaming.base.format.mds.MDSReader.decode_sample`` (the library's per-sample opening and seeking
would cost one ``open`` per sample on the hot path).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.sources.base import ShardData
from fastmix_data.sources.mds_compat import import_streaming
from fastmix_data.sources.reader import IDS, TEXT, Candidate, Columns, ShardStats, candidates
from fastmix_data.sources.safety import inside_root
from fastmix_data.storage import ShardFiles, is_url, redact, urls

INDEX = "index.json"


_REMOTE_INDEXES: dict[str, list[dict[str, Any]]] = {}


def load_index(root: str, remote=None) -> list[dict[str, Any]]:
    """The shard entries of ``root/index.json`` (parsed once per process while the file is unchanged;
    for a URL root, once per process, read with ``remote``, a :class:`fastmix_data.storage.RemoteFS`)."""
    if is_url(root):
        return _load_remote_index(root, remote)
    path = os.path.join(root, INDEX)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SourceError(
            f"cannot read MDS index {path} ({exc}); re-create it with streaming.MDSWriter"
        ) from exc
    return _load_index(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _load_index(path: str, mtime_ns: int, size: int) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        shards = obj["shards"]
        if obj.get("version") != 2 or not isinstance(shards, list):
            raise ValueError(f"unsupported index version {obj.get('version')!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(
            f"cannot read MDS index {path} ({exc}); re-create it with streaming.MDSWriter"
        ) from exc
    return shards


def _load_remote_index(root: str, remote) -> list[dict[str, Any]]:
    url = urls.join(root, INDEX)
    hit = _REMOTE_INDEXES.get(url)
    if hit is not None:
        return hit
    from fastmix_data.storage import RemoteFS

    try:
        obj = json.loads((remote or RemoteFS()).read(url))
        shards = obj["shards"]
        if obj.get("version") != 2 or not isinstance(shards, list):
            raise ValueError(f"unsupported index version {obj.get('version')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"cannot read MDS index {redact(url)} ({exc}); re-create it with streaming.MDSWriter") from exc
    _REMOTE_INDEXES[url] = shards
    return shards


def _shard_basename(root: str, entry: dict[str, Any], present=None) -> str:
    raw = entry.get("raw_data") or {}
    zipped = entry.get("zip_data") or {}
    exists = (lambda name: urls.join(root, name) in present) if present is not None else (
        lambda name: os.path.exists(os.path.join(root, name)))
    if raw.get("basename") and (exists(raw["basename"]) or not zipped):
        return raw["basename"]
    if zipped.get("basename"):
        return zipped["basename"]
    raise SourceError(f"an entry of {os.path.join(root, INDEX)} names no shard file; re-create the index")


def mds_shard_locations(root: str, remote=None, present=None) -> dict[str, tuple[str, int]]:
    """Absolute shard path (or URL) -> (dataset root, position in index.json), for one MDS directory
    or URL prefix (``present``: the URLs listed under it, to tell raw from compressed shard files)."""
    if is_url(root):
        return _remote_locations(root.rstrip("/"), remote, present or set())
    root = os.path.abspath(root)
    entries = load_index(root)
    out: dict[str, tuple[str, int]] = {}
    for i, entry in enumerate(entries):
        if entry.get("format") != "mds":
            raise SourceError(
                f"shard {i} of {os.path.join(root, INDEX)} has format {entry.get('format')!r}; only 'mds' is supported"
            )
        out[inside_root(root, _shard_basename(root, entry))] = (root, i)
    return out


def _remote_locations(root: str, remote, present) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for i, entry in enumerate(load_index(root, remote)):
        if entry.get("format") != "mds":
            raise SourceError(
                f"shard {i} of {redact(urls.join(root, INDEX))} has format {entry.get('format')!r}; only 'mds' is supported"
            )
        out[urls.join(root, _shard_basename(root, entry, present))] = (root, i)
    return out


def _kind(encoding: str) -> str:
    if encoding == "str":
        return TEXT
    if encoding.startswith("ndarray:") and np.issubdtype(np.dtype(encoding.split(":")[1]), np.integer):
        return IDS
    return encoding


def _as_ids(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        if value.ndim == 1 and np.issubdtype(value.dtype, np.integer):
            return value.astype(np.int64, copy=False)
        return None
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return np.asarray(value, dtype=np.int64).reshape(-1)
    return None


class MDSReader:
    """Reads MDS shard files. Holds configuration and shard locations only (picklable).

    Args:
        text_field: text column (default ``"text"``; may be absent unless renamed).
        ids_field: token-ids column (default ``"input_ids"``; may be absent unless renamed).
        allow_unsafe: decode ``pkl`` columns.
        locations: shard path -> (dataset root, position in its index.json).
    """

    format = "mds"
    extensions = (".mds",)
    files = ShardFiles()  # set per source by open_source

    def __init__(
        self,
        text_field: str | None = "text",
        ids_field: str | None = "input_ids",
        allow_unsafe: bool = False,
        locations: dict[str, tuple[str, int]] | None = None,
        **_: Any,
    ):
        self.text_candidates: tuple[Candidate, ...] = candidates(text_field, "text")
        self.ids_candidates: tuple[Candidate, ...] = candidates(ids_field, "input_ids")
        self.allow_unsafe = allow_unsafe
        self.locations = dict(locations or {})

    def config(self) -> dict[str, Any]:
        return {
            "text": [c.name for c in self.text_candidates],
            "ids": [c.name for c in self.ids_candidates],
        }

    def _entry(self, path: str) -> tuple[str, dict[str, Any]]:
        try:
            root, position = self.locations[path]
        except KeyError:
            raise SourceError(f"{path} is not listed in any MDS index.json of this source") from None
        return root, load_index(root, self.files.storage.remote if self.files.storage else None)[position]

    def _decoded(self, path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(index entry, decoded samples) of one shard file."""
        fmt = import_streaming().base.format
        root, entry = self._entry(path)
        reader = fmt.reader_from_json(root, None, entry)
        self._check_encodings(path, dict(zip(reader.column_names, reader.column_encodings)))
        data = self.files.read_bytes(path)
        raw_info = entry.get("raw_data") or {}
        if os.path.basename(path) != os.path.basename(raw_info.get("basename", "")):
            data = import_streaming().base.compression.decompress(entry["compression"], data)
        if raw_info.get("bytes") is not None and len(data) != raw_info["bytes"]:
            raise SourceError(
                f"{path} holds {len(data)} bytes but index.json says {raw_info['bytes']} (truncated or "
                "overwritten); re-create the shard"
            )
        count = int(np.frombuffer(data, np.uint32, count=1)[0]) if len(data) >= 4 else -1
        if count != entry["samples"]:
            raise SourceError(f"{path} holds {count} samples but index.json says {entry['samples']}")
        offsets = np.frombuffer(data, np.uint32, count=count + 1, offset=4).astype(np.int64)
        # Header: sample count, count + 1 offsets, then the writer's config JSON, then the samples.
        if offsets[0] < 4 * (count + 2) or offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
            raise SourceError(f"{path} has a corrupt sample offset table; re-create the shard")
        bounds = offsets.tolist()
        rows = [reader.decode_sample(data[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return entry, rows

    def _check_encodings(self, path: str, encodings: dict[str, str]) -> None:
        if self.allow_unsafe:
            return
        for name, enc in encodings.items():
            if enc == "pkl":
                raise UnsafeInputError(
                    f"MDS column {name!r} of {path} is pickled (encoding 'pkl', which can run code); "
                    "pass allow_unsafe=True if you trust the data"
                )

    def inspect(self, path: str) -> ShardStats:
        entry, rows = self._decoded(path)
        kinds = {n: _kind(e) for n, e in zip(entry["column_names"], entry["column_encodings"])}
        stats = ShardStats(rows=len(rows), columns=kinds)
        for cand in self.text_candidates:
            if kinds.get(cand.name) == TEXT:
                stats.text_bytes[cand.name] = sum(len(r[cand.name].encode("utf-8")) for r in rows)
        for cand in self.ids_candidates:
            if cand.name not in kinds:
                continue
            arrays = [_as_ids(r[cand.name]) for r in rows]
            if all(a is not None for a in arrays):
                kinds[cand.name] = IDS
                stats.ids_tokens[cand.name] = sum(len(a) for a in arrays)  # type: ignore[arg-type]
            elif kinds[cand.name] == IDS:
                kinds[cand.name] = "ndarray:not-1d"
        return stats

    def read(self, path: str, columns: Columns) -> ShardData:
        _, rows = self._decoded(path)
        texts = [r[columns.text] for r in rows] if columns.text else None
        ids = None
        if columns.ids:
            ids = []
            for i, r in enumerate(rows):
                arr = _as_ids(r[columns.ids])
                if arr is None:
                    raise SourceError(f"row {i} of {path}: column {columns.ids!r} is not a 1-D integer list")
                ids.append(arr)
        extra = {n: [r[n] for r in rows] for n in columns.extra}
        return ShardData(texts=texts, ids=ids, extra=extra)

    def check_safe(self, path: str, stats: ShardStats) -> None:
        """Refuse ``pkl`` columns unless ``allow_unsafe``."""
        self._check_encodings(path, stats.columns)
