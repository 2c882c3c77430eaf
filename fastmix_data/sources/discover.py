"""Turn a source spec (directory, glob, file, or list of those) into a format and sorted shard paths.

Detection: ``*.parquet`` files -> parquet; ``*.tar`` -> webdataset; a directory with ``index.json``
(or ``*.mds`` files next to one) -> mds; a directory written by ``Dataset.save_to_disk`` (with
``state.json``/``dataset_info.json``) -> hf. A plain directory is searched recursively for shard
files. Nothing is read beyond directory listings and the two index files.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastmix_data.errors import SourceError
from fastmix_data.sources.hf import hf_shard_paths, is_hf_dir
from fastmix_data.sources.mds import INDEX, mds_shard_locations
from fastmix_data.sources.safety import check_location, is_pipe
from fastmix_data.storage import ObjectInfo, RemoteError, RemoteFS, is_url, redact, urls
from fastmix_data.storage.urls import has_glob, scheme_of

FORMATS = ("parquet", "webdataset", "mds", "hf")
EXTENSIONS = {".parquet": "parquet", ".tar": "webdataset", ".arrow": "hf"}
Spec = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass
class Discovered:
    """The result of discovery: the format, sorted absolute shard paths (or URLs), MDS shard
    locations, and for URLs their size and version from the listing."""

    format: str
    paths: list[str]
    mds_locations: dict[str, tuple[str, int]] = field(default_factory=dict)
    objects: dict[str, ObjectInfo] = field(default_factory=dict)


_MDS_NAME = re.compile(r"\.mds(\.[a-z0-9]+)?$")  # shard.00000.mds, shard.00000.mds.zstd


def _file_format(path: str) -> str | None:
    name = os.path.basename(path).lower()
    if _MDS_NAME.search(name):
        return "mds"
    return EXTENSIONS.get(os.path.splitext(name)[1])


def _mds_root_of(path: str) -> str:
    directory = os.path.dirname(path)
    while True:
        if os.path.isfile(os.path.join(directory, INDEX)):
            return directory
        parent = os.path.dirname(directory)
        if parent == directory:
            raise SourceError(f"MDS shard {path} has no index.json in its directory or above it")
        directory = parent


def _is_mds_index(path: str) -> bool:
    """True for an MDS ``index.json`` (version 2 with a shard list), not any file of that name."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return True  # let the MDS reader report the broken index, naming the file
    return isinstance(doc, dict) and "shards" in doc and doc.get("version") == 2


class _Collector:
    def __init__(self, format: str | None, remote: RemoteFS | None = None):
        self.format = format
        self.found: list[tuple[str, str]] = []  # (format, path)
        self.mds: dict[str, tuple[str, int]] = {}
        self.objects: dict[str, ObjectInfo] = {}
        self.remote = remote or RemoteFS()

    def add_dir(self, path: str) -> None:
        if self.format == "mds" or (self.format is None and _is_mds_index(os.path.join(path, INDEX))):
            locations = mds_shard_locations(path)
            self.mds.update(locations)
            self.found += [("mds", p) for p in locations]
            return
        if self.format in (None, "hf") and (
            is_hf_dir(path) or os.path.isfile(os.path.join(path, "dataset_dict.json"))
        ):
            self.found += [("hf", p) for p in hf_shard_paths(path)]
            return
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, n) for n in filenames if not n.startswith(".")]
        shards = [f for f in files if _file_format(f) in ("parquet", "webdataset")]
        if self.format is not None:
            shards = [f for f in files if _file_format(f) == self.format]
        if not shards:
            raise SourceError(
                f"directory {path} holds no shards: no .parquet or .tar files, no MDS index.json and "
                "no Dataset.save_to_disk files (state.json)"
                + (f" for format {self.format!r}" if self.format else "")
            )
        for f in shards:
            self.add_file(f)

    def add_file(self, path: str) -> None:
        fmt = self.format or _file_format(path)
        if fmt is None:
            raise SourceError(
                f"cannot tell the format of {redact(path)} from its name; pass format= (one of {', '.join(FORMATS)})"
            )
        if fmt == "mds" and is_url(path):
            root = urls.dirname(path)
            locations = mds_shard_locations(root, self.remote, set(self.objects))
            if path not in locations:
                raise SourceError(f"MDS shard {redact(path)} is not listed in {redact(urls.join(root, INDEX))}")
            self.mds[path] = locations[path]
        elif fmt == "mds":
            root = _mds_root_of(path)
            locations = mds_shard_locations(root)
            if path not in locations:
                raise SourceError(f"MDS shard {path} is not listed in {os.path.join(root, INDEX)}")
            self.mds[path] = locations[path]
        self.found.append((fmt, path))

    def add(self, item: str, allow_unsafe: bool) -> None:
        location = check_location(item, allow_unsafe)
        if is_url(location):
            self.add_url(location)
            return
        if is_pipe(location):
            if self.format not in (None, "webdataset"):
                raise SourceError(
                    f"pipe: URLs are only supported for webdataset sources, not {self.format!r}"
                )
            self.found.append(("webdataset", location))
            return
        location = os.path.expanduser(location)
        if glob.has_magic(location) and not os.path.exists(location):
            matches = sorted(glob.glob(location, recursive=True))
            if not matches:
                raise SourceError(f"glob {location!r} matches no files; check the pattern and the directory")
        elif not os.path.exists(location):
            raise SourceError(f"path {location!r} does not exist")
        else:
            matches = [location]
        for match in matches:
            match = os.path.abspath(match)
            self.add_dir(match) if os.path.isdir(match) else self.add_file(match)


    # ------------------------------------------------------------------ URLs
    def add_url(self, url: str) -> None:
        """A glob, a prefix (listed recursively) or one object."""
        if has_glob(url):
            listed = self.remote.list(url)
            if not listed:
                raise SourceError(f"glob {redact(url)} matches no objects; check the pattern and the prefix")
            for obj in listed:
                self.objects[obj.url] = obj
                self.add_file(obj.url)
            return
        # An http(s) "directory" answers a GET with a listing page, so a name without a shard
        # extension is listed as a prefix there; object stores say "no such object" for a prefix.
        web_dir = scheme_of(url) in ("http", "https") and _file_format(url) is None and self.format is None
        if not url.endswith("/") and not web_dir:
            try:
                obj = self.remote.stat(url)
            except (RemoteError, SourceError) as exc:
                if isinstance(exc, RemoteError) and exc.status not in (None, 404):
                    raise
            else:
                self.objects[obj.url] = obj
                self.add_file(obj.url)
                return
        self.add_prefix(url.rstrip("/"))

    def add_prefix(self, prefix: str) -> None:
        listed = [o for o in self.remote.list(prefix) if not _hidden(o.url, prefix)]
        if not listed:
            raise SourceError(f"{redact(prefix)} does not exist or holds no objects; check the URL")
        present = {o.url for o in listed}
        index, state = urls.join(prefix, INDEX), urls.join(prefix, "state.json")
        if self.format == "mds" or (self.format is None and index in present and self._is_mds_url(index)):
            locations = mds_shard_locations(prefix, self.remote, present)
            self._add_listed(listed, locations, "mds")
            self.mds.update(locations)
            return
        if self.format in (None, "hf") and state in present:
            self._add_listed(listed, hf_shard_paths(prefix, self.remote), "hf")
            return
        shards = [o for o in listed if _file_format(o.url) in ("parquet", "webdataset")]
        if self.format is not None:
            shards = [o for o in listed if _file_format(o.url) == self.format]
        if not shards:
            raise SourceError(
                f"{redact(prefix)} holds no shards: no .parquet or .tar objects, no MDS index.json and no "
                "Dataset.save_to_disk state.json" + (f" for format {self.format!r}" if self.format else "")
            )
        for obj in shards:
            self.objects[obj.url] = obj
            self.add_file(obj.url)

    def _add_listed(self, listed: list[ObjectInfo], paths, fmt: str) -> None:
        by_url = {o.url: o for o in listed}
        for path in paths:
            if path not in by_url:
                raise SourceError(f"{redact(path)} is listed in the dataset's index but is not in the store")
            self.objects[path] = by_url[path]
            self.found.append((fmt, path))

    def _is_mds_url(self, url: str) -> bool:
        try:
            doc = json.loads(self.remote.read(url))
        except ValueError:
            return True  # let the MDS reader report the broken index, naming it
        return isinstance(doc, dict) and "shards" in doc and doc.get("version") == 2


def _hidden(url: str, prefix: str) -> bool:
    rest = url[len(prefix):].strip("/") if url.startswith(prefix) else url
    return any(part.startswith(".") for part in rest.split("/"))


def discover(
    spec: Spec, format: str | None = None, allow_unsafe: bool = False, remote: RemoteFS | None = None
) -> Discovered:
    """Resolve ``spec`` to a format and its shard paths (absolute, deduplicated, sorted).

    URLs (``s3://``, ``gs://``, ``hf://``, ``http(s)://`` ...) are listed through ``remote``: a glob
    lists matching objects, a prefix (or a URL ending in ``/``) everything under it, recursively;
    several URLs are listed in parallel threads.

    Raises:
        SourceError: missing path, glob with no match, no shards, unknown or mixed formats.
        UnsafeInputError: ``pipe:`` without allow_unsafe; credentials inside a URL.
    """
    if format is not None and format not in FORMATS:
        raise SourceError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not items:
        raise SourceError("the source spec is an empty list; give a directory, a glob or shard paths")
    collector = _Collector(format, remote)
    names = [os.fspath(item) for item in items]
    remote_items = [n for n in names if is_url(n)]
    if len(remote_items) > 1:  # list several prefixes at once; each collector merges in order
        with ThreadPoolExecutor(max_workers=min(16, len(remote_items))) as pool:
            parts = list(pool.map(lambda n: _collect_one(n, format, remote, allow_unsafe), remote_items))
        for part in parts:
            collector.found += part.found
            collector.mds.update(part.mds)
            collector.objects.update(part.objects)
        names = [n for n in names if not is_url(n)]
    for item in names:
        collector.add(item, allow_unsafe)
    formats = sorted({f for f, _ in collector.found})
    if len(formats) > 1:
        examples = {f: next(p for g, p in collector.found if g == f) for f in formats}
        raise SourceError(
            "a source mixes formats: "
            + ", ".join(f"{f} ({p})" for f, p in examples.items())
            + "; make one source per format"
        )
    if not formats:
        raise SourceError(f"source spec {spec!r} names no shards")
    paths = sorted({p for _, p in collector.found})
    return Discovered(format=formats[0], paths=paths, mds_locations=collector.mds, objects=collector.objects)


def _collect_one(item: str, format: str | None, remote: RemoteFS | None, allow_unsafe: bool) -> _Collector:
    collector = _Collector(format, remote)
    collector.add(item, allow_unsafe)
    return collector
