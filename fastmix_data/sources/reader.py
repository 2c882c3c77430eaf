"""The per-format reader contract behind :class:`~fastmix_data.sources.source.ShardedSource`.

A reader is a small, picklable object holding only configuration. It answers two questions about a
shard path: what is in it (:meth:`ShardReader.inspect`, run once per shard at index time and cached)
and what are its rows (:meth:`ShardReader.read`, on the stream's hot path).

Column *kinds* are how shards of one source are compared: ``"text"`` (a UTF-8 string per row),
``"ids"`` (a 1-D integer sequence per row), or any other format-specific type name. Two shards
whose kinds differ for a column the source uses are a schema mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from fastmix_data.sources.base import ShardData
from fastmix_data.storage import ShardFiles

TEXT = "text"
IDS = "ids"
MISSING = "missing"


@dataclass(frozen=True)
class Candidate:
    """A column name the source may use for text or ids.

    Attributes:
        name: the column (Parquet/HF/MDS) or member suffix (WebDataset), e.g. ``"text"``, ``"txt"``.
        required: absent from every shard is an error (the user named a non-default field).
        lenient: present with the wrong kind is ignored rather than an error (conventional aliases
            such as WebDataset's ``json``, which often holds metadata instead of token ids).
    """

    name: str
    required: bool = False
    lenient: bool = False


@dataclass
class ShardStats:
    """What :meth:`ShardReader.inspect` learns about one shard (cached in the index).

    Attributes:
        rows: number of rows (samples).
        columns: every column name -> kind (``"text"``, ``"ids"`` or a type name).
        text_bytes: for each text-kind candidate column, the UTF-8 byte count summed over rows.
        ids_tokens: for each ids-kind candidate column, the sequence lengths summed over rows.
        layout: Parquet only: where the footer and each row group's column chunks lie in the file
            (see :func:`fastmix_data.sources.parquet.layout_of`); None for other formats.
    """

    rows: int
    columns: dict[str, str]
    text_bytes: dict[str, int] = field(default_factory=dict)
    ids_tokens: dict[str, int] = field(default_factory=dict)
    layout: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "rows": self.rows,
            "columns": self.columns,
            "text_bytes": self.text_bytes,
            "ids_tokens": self.ids_tokens,
        }
        if self.layout is not None:
            out["layout"] = self.layout
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardStats:
        return cls(
            rows=int(obj["rows"]),
            columns={str(k): str(v) for k, v in obj["columns"].items()},
            text_bytes={str(k): int(v) for k, v in obj["text_bytes"].items()},
            ids_tokens={str(k): int(v) for k, v in obj["ids_tokens"].items()},
            layout=obj.get("layout"),
        )


@dataclass(frozen=True)
class Columns:
    """The columns a source decided to read, after comparing all shards' stats.

    Attributes:
        text: text column name, or None.
        ids: ids column name, or None.
        extra: further columns decoded into :attr:`ShardData.extra`.
    """

    text: str | None
    ids: str | None
    extra: tuple[str, ...] = ()


class ShardReader(Protocol):
    """One format's reader. Implementations hold configuration only (picklable, no open files).

    Readers get a shard's bytes from ``files`` (a :class:`fastmix_data.storage.ShardFiles`), never
    from ``open`` or fsspec directly, so that local paths and URLs read alike (remote shards through
    the node-local cache, checked against their indexed identity).
    """

    format: str
    files: ShardFiles
    text_candidates: tuple[Candidate, ...]
    ids_candidates: tuple[Candidate, ...]

    def config(self) -> dict[str, Any]:
        """JSON-able reader settings that change what :meth:`inspect` returns (part of cache keys)."""
        ...

    def inspect(self, path: str) -> ShardStats:
        """Read one shard fully, validating it; raise on corruption (any exception)."""
        ...

    def read(self, path: str, columns: Columns) -> ShardData:
        """Decode the given columns of one shard."""
        ...

    def check_safe(self, path: str, stats: ShardStats) -> None:
        """Raise UnsafeInputError when reading the shard would need pickle and that is not allowed."""
        ...


def candidates(field_name: str | None, default: str, aliases: tuple[str, ...] = ()) -> tuple[Candidate, ...]:
    """Candidates for a user-given field: the field itself, then lenient aliases.

    A field other than its default must exist; the default may be absent (a text-only source has no
    ``input_ids``). Aliases are only tried for the default field. ``None`` disables the field.
    """
    if field_name is None:
        return ()
    if field_name != default:
        return (Candidate(field_name, required=True),)
    return (Candidate(field_name), *(Candidate(a, lenient=True) for a in aliases if a != field_name))


class NamedColumnsReader:
    """Configuration shared by readers of named columns (Parquet, HF Arrow): the text and ids
    column candidates. Holds configuration only, so readers stay picklable."""

    files = ShardFiles()  # set per source by open_source (remote shards); local reads need nothing

    def __init__(self, text_field: str | None = "text", ids_field: str | None = "input_ids", **_: Any):
        self.text_candidates: tuple[Candidate, ...] = candidates(text_field, "text")
        self.ids_candidates: tuple[Candidate, ...] = candidates(ids_field, "input_ids")

    def config(self) -> dict[str, Any]:
        return {
            "text": [c.name for c in self.text_candidates],
            "ids": [c.name for c in self.ids_candidates],
        }
