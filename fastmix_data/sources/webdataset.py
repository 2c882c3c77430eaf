"""WebDataset tar shards.

One ``.tar`` file is one shard. Members are grouped into samples by key with webdataset's own
``group_by_keys`` (``doc0001.txt`` and ``doc0001.npy`` form sample ``doc0001``; the member *suffix*
is everything after the first dot of the base name). Text comes from a ``txt`` member (UTF-8), token
ids from an ``npy`` member (1-D integer array, loaded with ``allow_pickle=False``) or a ``json`` member
holding a list of ints. Pickled members (``.pkl``, ``.pickle``, ``.pyd``) are refused unless
``allow_unsafe``.

Tars are read whole into memory and scanned by :mod:`fastmix_data.sources.tarscan`, which is an
order of magnitude faster than :mod:`tarfile` and refuses damaged archives that :mod:`tarfile`
would silently cut short.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from webdataset.tariterators import group_by_keys

from fastmix_data.errors import SourceError, UnsafeInputError
from fastmix_data.sources.base import ShardData
from fastmix_data.sources.reader import IDS, TEXT, Candidate, Columns, ShardStats, candidates
from fastmix_data.sources.safety import is_pipe, unsafe_member
from fastmix_data.sources.tarscan import iter_members
from fastmix_data.storage import ShardFiles

# The header np.save writes for a 1-D integer array; anything else goes through np.load.
_NPY_1D_INT = re.compile(
    rb"\{'descr': '([<>|=]?[iu][1248])', 'fortran_order': (?:False|True), 'shape': \((\d+),\), \}\s*"
)
_META = ("__",)  # webdataset skips members whose names start with "__" (e.g. __index__)


def _ids_candidates(ids_field: str | None) -> tuple[Candidate, ...]:
    if ids_field is None:
        return ()
    if ids_field != "input_ids":
        if ids_field.endswith((".npy", ".json")):
            return (Candidate(ids_field, required=True),)
        return tuple(Candidate(f"{ids_field}.{ext}", required=True) for ext in ("npy", "json"))
    names = ("input_ids.npy", "input_ids.json", "npy", "json")
    return tuple(Candidate(n, lenient=True) for n in names)


def read_bytes(path: str, files: ShardFiles | None = None) -> bytes:
    """The raw bytes of a tar (local, or remote through ``files``), or of a ``pipe:`` command's
    stdout (already allowed)."""
    if is_pipe(path):
        from webdataset.gopen import gopen

        stream = gopen(path, "rb")
        try:
            return stream.read()
        finally:
            stream.close()  # checks the command's exit status
    if files is not None:
        return files.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


def _members(path: str, data: bytes) -> Iterator[dict[str, Any]]:
    for name, content in iter_members(data):
        if name.split("/")[-1].startswith(_META):
            continue
        yield {"fname": name, "data": content, "__url__": path}


def samples(path: str, data: bytes, suffixes: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of a tar (dicts suffix -> raw bytes, plus ``__key__``), grouped by webdataset."""
    return group_by_keys(_members(path, data), suffixes=suffixes)


def _fast_npy(raw: bytes) -> np.ndarray | None:
    """Decode a 1-D integer ``.npy`` without ``np.load``'s per-call header ``literal_eval``."""
    if raw[:6] != b"\x93NUMPY" or len(raw) < 12 or raw[6] not in (1, 2, 3):
        return None
    width = 2 if raw[6] == 1 else 4  # the header length field: uint16 in v1, uint32 after
    begin = 8 + width
    start = begin + int.from_bytes(raw[8:begin], "little")
    match = _NPY_1D_INT.fullmatch(raw[begin:start])
    if match is None:
        return None
    dtype = np.dtype(match.group(1).decode())
    count = int(match.group(2))
    if len(raw) != start + count * dtype.itemsize:
        return None  # let np.load report the damage
    return np.frombuffer(raw, dtype=dtype, count=count, offset=start).astype(np.int64)


def decode_ids(name: str, raw: bytes) -> np.ndarray | None:
    """Token ids from an ``npy``/``json`` member, or None when the member is not a 1-D int list."""
    if name.endswith("npy"):
        fast = _fast_npy(raw)
        if fast is not None:
            return fast
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            return None
        return arr.astype(np.int64)
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return np.asarray(value, dtype=np.int64).reshape(-1)


def _describe(name: str, raw: bytes) -> str:
    if name.endswith("npy"):
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
        return f"ndarray:{arr.dtype}:{arr.ndim}d"
    return f"json:{type(json.loads(raw)).__name__}"


def decode_extra(name: str, raw: bytes, allow_unsafe: bool) -> Any:
    """Decode a member by its suffix: txt/text -> str, json, npy, cls/id/index -> int, else bytes."""
    last = name.rsplit(".", 1)[-1]
    if last in ("txt", "text"):
        return raw.decode("utf-8")
    if last == "json":
        return json.loads(raw)
    if last == "npy":
        return np.load(io.BytesIO(raw), allow_pickle=False)
    if last in ("cls", "id", "index"):
        return int(raw.decode("ascii").strip())
    if unsafe_member(name):
        if not allow_unsafe:
            raise UnsafeInputError(f"member suffix {name!r} is pickled; pass allow_unsafe=True to decode it")
        return pickle.loads(raw)
    return raw


class WebDatasetReader:
    """Reads WebDataset tar shards. Holds configuration only (picklable).

    Args:
        text_field: text member suffix. The default ``"text"`` also accepts ``txt``.
        ids_field: ids member suffix. The default ``"input_ids"`` accepts ``input_ids.npy``,
            ``input_ids.json``, ``npy`` and ``json`` (the last two only when they hold int lists);
            another name ``x`` accepts ``x.npy`` and ``x.json``.
        allow_unsafe: decode pickled members and read ``pipe:`` URLs.
    """

    format = "webdataset"
    extensions = (".tar",)
    files = ShardFiles()  # set per source by open_source

    def __init__(
        self,
        text_field: str | None = "text",
        ids_field: str | None = "input_ids",
        allow_unsafe: bool = False,
        **_: Any,
    ):
        # webdataset lower-cases member suffixes when grouping, so the names we match must be too.
        text_field = text_field.lower() if text_field else text_field
        ids_field = ids_field.lower() if ids_field else ids_field
        self.text_candidates: tuple[Candidate, ...] = candidates(text_field, "text", aliases=("txt",))
        self.ids_candidates: tuple[Candidate, ...] = _ids_candidates(ids_field)
        self.allow_unsafe = allow_unsafe

    def config(self) -> dict[str, Any]:
        return {
            "text": [c.name for c in self.text_candidates],
            "ids": [c.name for c in self.ids_candidates],
        }

    def fetch(self, path: str) -> bytes:
        """The shard's raw bytes (used to index ``pipe:`` shards, which cannot be read twice cheaply)."""
        return read_bytes(path, self.files)

    def inspect(self, path: str) -> ShardStats:
        return self.inspect_data(path, read_bytes(path, self.files))

    def inspect_data(self, path: str, data: bytes) -> ShardStats:
        text_names = {c.name for c in self.text_candidates}
        ids_names = {c.name for c in self.ids_candidates}
        rows = 0
        seen: dict[str, int] = {}  # suffix -> samples that have it
        kinds: dict[str, str] = {}
        text_bytes: dict[str, int] = {}
        ids_tokens: dict[str, int] = {}
        for sample in samples(path, data):
            rows += 1
            for name, raw in sample.items():
                if name.startswith("__"):
                    continue
                seen[name] = seen.get(name, 0) + 1
                if name in text_names:
                    raw.decode("utf-8")  # invalid UTF-8 is corruption of a text member
                    kinds[name] = TEXT
                    text_bytes[name] = text_bytes.get(name, 0) + len(raw)
                elif name in ids_names and kinds.get(name, IDS) == IDS:
                    ids = decode_ids(name, raw)
                    if ids is None:
                        kinds[name] = _describe(name, raw)
                        ids_tokens.pop(name, None)
                    else:
                        kinds[name] = IDS
                        ids_tokens[name] = ids_tokens.get(name, 0) + len(ids)
                else:
                    kinds.setdefault(name, "bytes")
        for name, count in seen.items():
            if count != rows and (name in text_names or name in ids_names):
                raise SourceError(
                    f"member suffix {name!r} is present in only {count} of {rows} samples of {path}; "
                    "every sample needs it"
                )
        return ShardStats(rows=rows, columns=kinds, text_bytes=text_bytes, ids_tokens=ids_tokens)

    def read(self, path: str, columns: Columns) -> ShardData:
        wanted = [n for n in (columns.text, columns.ids, *columns.extra) if n is not None]
        texts: list[str] | None = [] if columns.text else None
        ids: list[np.ndarray] | None = [] if columns.ids else None
        extra: dict[str, list] = {n: [] for n in columns.extra}
        for sample in samples(path, read_bytes(path, self.files), suffixes=set(wanted)):
            missing = [n for n in wanted if n not in sample]
            if missing:
                raise SourceError(f"sample {sample['__key__']!r} of {path} has no member {missing[0]!r}")
            if texts is not None:
                texts.append(sample[columns.text].decode("utf-8"))
            if ids is not None:
                row = decode_ids(columns.ids, sample[columns.ids])
                if row is None:
                    raise SourceError(
                        f"member {sample['__key__']}.{columns.ids} of {path} is not a 1-D integer list"
                    )
                ids.append(row)
            for n in columns.extra:
                extra[n].append(decode_extra(n, sample[n], self.allow_unsafe))
        return ShardData(texts=texts, ids=ids, extra=extra)

    def check_safe(self, path: str, stats: ShardStats) -> None:
        """Refuse pickled members unless ``allow_unsafe``, naming the first one."""
        if self.allow_unsafe:
            return
        for name in sorted(stats.columns):
            if unsafe_member(name):
                raise UnsafeInputError(
                    f"shard {path} has pickled member suffix {name!r} (pickle can run code); "
                    "remove those members, or pass allow_unsafe=True if you trust the data"
                )
