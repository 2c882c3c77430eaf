"""Hugging Face ``datasets`` saved with ``Dataset.save_to_disk``.

The dataset directory holds ``state.json`` (listing ``data-XXXXX-of-NNNNN.arrow`` files),
``dataset_info.json`` and the Arrow files. Each Arrow file is one shard. We read the same files
``datasets.load_from_disk`` reads (and only those): never a loading script, never any code.
Arrow files are memory-mapped, so reading two columns of a wide shard touches only their pages.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa

from fastmix_data.errors import SourceError
from fastmix_data.sources.arrow import needed_columns, schema_kinds, shard_data_from_table, stats_from_table
from fastmix_data.sources.base import ShardData
from fastmix_data.sources.reader import Columns, NamedColumnsReader, ShardStats
from fastmix_data.sources.safety import inside_root
from fastmix_data.storage import ShardFiles, is_url, redact, urls

MARKERS = ("state.json", "dataset_info.json")


def is_hf_dir(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, m)) for m in MARKERS)


def hf_shard_paths(root: str, remote=None) -> list[str]:
    """The Arrow files of a ``save_to_disk`` directory (or URL prefix, read with ``remote``, a
    :class:`fastmix_data.storage.RemoteFS`), as ``load_from_disk`` would find them."""
    if is_url(root):
        return _remote_shard_paths(root, remote)
    if os.path.isfile(os.path.join(root, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(root) if is_hf_dir(os.path.join(root, d)))
        raise SourceError(
            f"{root} is a DatasetDict saved with save_to_disk; point the source at one split "
            f"directory instead (found: {', '.join(splits) or 'none'})"
        )
    state_path = os.path.join(root, "state.json")
    if os.path.isfile(state_path):
        try:
            with open(state_path, encoding="utf-8") as f:
                files = [entry["filename"] for entry in json.load(f)["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SourceError(
                f"cannot parse {state_path} ({exc}); re-save the dataset with Dataset.save_to_disk"
            ) from exc
        return sorted(inside_root(root, name) for name in files)
    return sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".arrow"))


EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the Arrow IPC stream's end-of-stream marker


def _remote_shard_paths(root: str, remote) -> list[str]:
    from fastmix_data.storage import RemoteFS

    state = urls.join(root, "state.json")
    try:
        files = [entry["filename"] for entry in json.loads((remote or RemoteFS()).read(state))["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"cannot parse {redact(state)} ({exc}); re-save the dataset with Dataset.save_to_disk") from exc
    return sorted(urls.join(root, name) for name in files)


def _read_table(path: str) -> pa.Table:
    """The whole Arrow stream; it must end with its end-of-stream marker: a stream cut at a record
    batch boundary otherwise reads as a shorter, valid stream (rows lost without an error)."""
    with pa.memory_map(path, "r") as source:
        size = source.size()
        if size < len(EOS) or source.read_at(len(EOS), size - len(EOS)) != EOS:
            raise SourceError(
                f"{path} does not end with the Arrow end-of-stream marker (truncated or still being written); "
                "re-save the dataset with Dataset.save_to_disk"
            )
        return pa.ipc.open_stream(source).read_all()


class HFReader(NamedColumnsReader):
    """Reads the Arrow shards of a ``save_to_disk`` dataset. Holds configuration only (picklable).

    Args:
        text_field: text column (default ``"text"``; may be absent unless renamed).
        ids_field: token-ids column (default ``"input_ids"``; may be absent unless renamed).
    """

    format = "hf"
    extensions = (".arrow",)
    files = ShardFiles()  # set per source by open_source

    def inspect(self, path: str) -> ShardStats:
        with self.files.local_file(path) as local:
            table = _read_table(local)
        kinds = schema_kinds(table.schema)
        return stats_from_table(path, table, kinds, self.text_candidates, self.ids_candidates)

    def read(self, path: str, columns: Columns) -> ShardData:
        return shard_data_from_table(self.read_table(path, columns), columns, path)

    def read_table(self, path: str, columns: Columns):
        """The needed columns as an Arrow table."""
        with self.files.local_file(path) as local:
            return _read_table(local).select(needed_columns(columns))

    def check_safe(self, path: str, stats: ShardStats) -> None:
        """Arrow files never need pickle."""
