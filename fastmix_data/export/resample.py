"""Materialise a manifest's plan as new shards (Parquet, WebDataset or MDS), resumably, in parallel.

Design problem: write the items at global positions 0..budget, in order, as shards another trainer
reads sequentially; use several processes and several machines (torchrun ranks); survive a crash
and resume; never show a half-written shard; and produce the same bytes whatever the parallelism.

Solution: the output layout is fixed before anything is written: ``items_per_shard`` is computed from
the manifest alone (``shard_size`` over the estimated bytes per item), so output shard i always
holds positions [i*M, min((i+1)*M, N)). Ranks take contiguous blocks of shards, worker processes
take shards from the rank's block, and each shard is planned with the pure plan, read through the
same item access as the stream, written to a temporary name, fsynced, hashed and renamed into place;
then a done-marker with its sha256 is written. A rerun skips shards whose file still hashes to their
marker. Whoever finds every marker present writes the index (same bytes whoever writes it). The
output directory records the run (manifest fingerprint, format, layout): another run is refused.
See docs/manifest.md ("Resampled shards").
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fastmix_data.engine import Job, LocalEngine, RayEngine, TaskOutcome, get_engine
from fastmix_data.errors import ManifestError, SourceError
from fastmix_data.export import outdir
from fastmix_data.export._util import canonical_json, parse_size
from fastmix_data.export.from_manifest import manifest_plan, manifest_sources
from fastmix_data.export.manifest import load_manifest
from fastmix_data.export.outdir import STATE_DIR
from fastmix_data.io import sha256_file
from fastmix_data.sources.arrow import integers, value_lengths
from fastmix_data.sources.source import check_unchanged

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("parquet", "webdataset", "mds")
INDEX_FORMAT = "fastmix_data/resampled"
INDEX_VERSION = 1
INDEX = "index.json"
CHUNK = 1 << 16  # positions planned and written at a time (one Parquet row group)
TAR_MTIME = 0  # fixed member mtime: tars are byte-identical across runs


class ResampleError(ManifestError):
    """Resampling cannot proceed (another run in the output directory, a composition mismatch...)."""


# ------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Layout:
    """Output shards: shard i holds global positions [i * per_shard, min((i + 1) * per_shard, items))."""

    format: str
    items: int
    per_shard: int

    @property
    def count(self) -> int:
        return -(-self.items // self.per_shard)

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.per_shard, min((i + 1) * self.per_shard, self.items)

    def name(self, i: int) -> str:
        width = max(5, len(str(max(self.count - 1, 0))))
        if self.format == "parquet":
            return f"part-{i:0{width}d}.parquet"
        if self.format == "webdataset":
            return f"shard-{i:0{width}d}.tar"
        return f"shard.{i:0{width}d}.mds"


def estimated_bytes_per_item(manifest: Mapping[str, Any]) -> float:
    """Bytes per output item, estimated from the manifest alone (input bytes per item, or token ids)."""
    mode = manifest["mode"]
    n = max(int(manifest["budget"]["items"]), 1)
    if mode["kind"] == "packing":
        return float((int(mode["seq_len"]) + 1) * 4 + 16)
    total = 0.0
    for s in manifest["sources"]:
        total += s["take"] * (s["bytes"] / max(s["items"], 1))
    return max(total / n, 1.0) + 16.0


def plan_layout(
    manifest: Mapping[str, Any], format: str, shard_size: str | int = "256MB", shard_items: int | None = None
) -> Layout:
    """The output layout: a pure function of the manifest, the format and the size (never of parallelism)."""
    if format not in OUTPUT_FORMATS:
        raise ResampleError(f"unknown output format {format!r}; use one of {OUTPUT_FORMATS}")
    items = int(manifest["budget"]["items"])
    if shard_items is None:
        shard_items = max(1, int(parse_size(shard_size) // estimated_bytes_per_item(manifest)))
    if shard_items < 1:
        raise ResampleError(f"shard_items must be >= 1, got {shard_items}")
    return Layout(format, items, int(shard_items))


def output_columns(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The columns every output shard has (see docs/manifest.md)."""
    if manifest["mode"]["kind"] == "packing":
        return {"input_ids": True, "doc_start": True, "text": False}
    text = all(s["columns"].get("text") for s in manifest["sources"])
    ids = all(s["columns"].get("ids") for s in manifest["sources"])
    if not (text or ids):
        raise ResampleError(
            "the sources share neither a text nor an ids column ("
            + ", ".join(
                f"{s['name']}: text={s['columns'].get('text')}, ids={s['columns'].get('ids')}"
                for s in manifest["sources"]
            )
            + "); resample them in packing mode (a manifest with seq_len) or separately"
        )
    return {"input_ids": ids, "doc_start": False, "text": text}


# ------------------------------------------------------------------------------------------ reading
class Materialiser:
    """Items at global positions of a manifest's plan, as column chunks (one per process)."""

    def __init__(
        self,
        manifest: Mapping[str, Any],
        tokenizer: Any = None,
        eos_id: int | None = None,
        allow_unsafe: bool = False,
    ):
        from fastmix_data.export.manifest_check import layouts_of
        from fastmix_data.stream.items import ItemSource
        from fastmix_data.stream.tokenize import ByteTokenizer, as_tokenizer

        self.manifest = manifest
        self.names = [s["name"] for s in manifest["sources"]]
        self.seq_len = manifest["mode"].get("seq_len") if manifest["mode"]["kind"] == "packing" else None
        self.tokenizer = as_tokenizer(tokenizer, eos_id)
        if self.seq_len is not None and self.tokenizer.fingerprint() != manifest["mode"].get("tokenizer"):
            raise ResampleError(
                f"the manifest was packed with tokenizer {manifest['mode'].get('tokenizer')!r}, not "
                f"{self.tokenizer.fingerprint()!r}; pass the same tokenizer"
            )
        self.columns = output_columns(manifest)
        self.plan = manifest_plan(manifest)
        self.plan.segments()
        sources = manifest_sources(manifest, allow_unsafe=allow_unsafe)
        seed, shuffle = int(manifest["seed"]), bool(manifest["shuffle"])
        partitions, _, layouts = layouts_of(manifest)
        ids_eos = manifest["mode"].get("ids_eos_id", eos_id if not isinstance(self.tokenizer, ByteTokenizer) else None)
        self.items = [
            ItemSource(s, seed, self.seq_len, self.tokenizer, 2, shuffle, partitions=partitions, ids_eos_id=ids_eos)
            for s in sources
        ]
        for k, (it, s) in enumerate(zip(self.items, manifest["sources"])):
            if list(it.items_per_shard) != [int(sh["items"]) for sh in s["shards"]] or (
                layouts is not None and it.layout != layouts[k]
            ):
                raise ResampleError(
                    f"source {s['name']!r}: items per shard differ from the manifest's; regenerate it"
                )
        self._tables: dict[int, dict[int, pa.Table]] = {}

    def chunks(self, a: int, b: int, counts: dict) -> Iterator[dict]:
        """Column chunks for positions [a, b); adds per-source items/tokens and per-shard takes to ``counts``."""
        for c0 in range(a, b, CHUNK):
            c1 = min(b, c0 + CHUNK)
            sl = self.plan.plan(c0, c1)
            if len(sl.position) != c1 - c0:
                raise ResampleError(
                    f"the plan ends at position {c0 + len(sl.position)}, before the budget {b}"
                )
            yield self._chunk(sl, counts)

    def _groups(self, sl) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(source, epoch, shard, chunk indices) of each input shard a chunk reads, in key order."""
        shards = int(sl.shard.max()) + 1 if len(sl.shard) else 1
        epochs = int(sl.epoch.max()) + 1 if len(sl.epoch) else 1
        key = (sl.source * epochs + sl.epoch) * shards + sl.shard  # one int64 key: a cheap 1-D sort
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        cuts = np.flatnonzero(np.diff(sorted_key)) + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(key)]])):
            idx = order[lo:hi]
            i = idx[0]
            yield int(sl.source[i]), int(sl.epoch[i]), int(sl.shard[i]), idx

    def _chunk(self, sl, counts: dict) -> dict:
        n = len(sl.position)
        out: dict[str, Any] = {"position": sl.position.astype(np.int64), "source": sl.source.astype(np.int64)}
        if self.seq_len is not None:
            ids = np.empty((n, self.seq_len + 1), dtype=np.int64)
            starts = np.empty((n, self.seq_len + 1), dtype=bool)
            for src, epoch, shard, idx in self._groups(sl):
                self.items[src].sequences(epoch, shard, sl.item[idx], out=(ids, starts, idx))
            if ids.size and (ids.max() > np.iinfo(np.int32).max or ids.min() < np.iinfo(np.int32).min):
                raise ResampleError("token ids do not fit int32; the resampled shards store int32 ids")
            out["input_ids"] = ids.astype(np.int32)
            out["doc_start"] = starts
            tokens = np.full(n, self.seq_len + 1, dtype=np.int64)
        else:
            parts: dict[str, list] = {"idx": [], "text": [], "input_ids": [], "tokens": []}
            for src, _epoch, shard, idx in self._groups(sl):
                text, ids, tok = self._rows(src, shard, sl.item[idx])
                parts["idx"].append(idx)
                parts["text"].append(text)
                parts["input_ids"].append(ids)
                parts["tokens"].append(tok)
            # rows arrive grouped by input shard; put them back in position order
            back = np.argsort(np.concatenate(parts["idx"]), kind="stable")
            for col in ("text", "input_ids"):
                if self.columns[col]:
                    out[col] = pa.concat_arrays(parts[col]).take(pa.array(back))
            tokens = np.concatenate(parts["tokens"])[back]
        counts["items"] += np.bincount(sl.source, minlength=len(self.names))
        counts["tokens"] += np.bincount(sl.source, weights=tokens, minlength=len(self.names)).astype(np.int64)
        for k in np.unique(sl.source):
            m = sl.source == k
            np.add.at(counts["shards"][int(k)], sl.shard[m], 1)
        return out

    def _rows(
        self, src: int, shard: int, items: np.ndarray
    ) -> tuple[pa.Array | None, pa.Array | None, np.ndarray]:
        """Rows ``items`` of one input shard as Arrow arrays (text: string, ids: list<int32>), and
        their tokens as the shard index counts them (ids, else text; plus EOS)."""
        item_source = self.items[src]
        table = self._arrow_table(src, shard)
        cols = item_source.source.columns
        want_text, want_ids = self.columns["text"], self.columns["input_ids"]
        if table is not None:
            picked = table.take(pa.array(items))
            text = picked.column(cols.text).combine_chunks().cast(pa.string()) if want_text else None
            ids = picked.column(cols.ids).combine_chunks().cast(pa.list_(pa.int32())) if want_ids else None
            if cols.ids is not None:
                return text, ids, value_lengths(picked.column(cols.ids)) + item_source.eos_extra
            texts = picked.column(cols.text).combine_chunks()
        else:
            rows = item_source.rows(shard, items)
            text = pa.array(rows.texts, pa.string()) if want_text else None
            ids = _list_array(rows.ids) if want_ids else None
            if item_source.has_ids and rows.ids is not None:
                lengths = np.fromiter((len(x) for x in rows.ids), dtype=np.int64, count=len(rows.ids))
                return text, ids, lengths + item_source.eos_extra
            texts = text if text is not None else pa.array(rows.texts, pa.string())
        from fastmix_data.stream.tokenize import ByteTokenizer

        if isinstance(self.tokenizer, ByteTokenizer):
            return text, ids, value_lengths(texts) + item_source.eos_extra
        tok = [len(self.tokenizer.encode(t)) + item_source.eos_extra for t in texts.to_pylist()]
        return text, ids, np.array(tok, dtype=np.int64)

    def _arrow_table(self, src: int, shard: int) -> pa.Table | None:
        """The needed columns of a Parquet or HF (Arrow) shard, checked like ``read_shard`` checks
        them (size, rows, no nulls); None for other formats. Two shards cached per source."""
        source = self.items[src].source
        if source.format not in ("parquet", "hf"):
            return None
        cache = self._tables.setdefault(src, {})
        if shard in cache:
            return cache[shard]
        info = source.shards[shard]
        cols = [c for c in (source.columns.text, source.columns.ids) if c is not None]
        where = f"shard {info.path} of source {source.name!r}"
        check_unchanged(info, where, "the manifest was made")
        try:
            if source.format == "parquet":
                table = pq.ParquetFile(info.path).read(columns=cols)
            else:
                with pa.memory_map(info.path, "r") as f:
                    table = pa.ipc.open_stream(f).read_all().select(cols)
        except Exception as exc:
            raise SourceError(
                f"{where} is unreadable ({type(exc).__name__}: {exc}); replace the file"
            ) from exc
        if table.num_rows != info.rows:
            raise SourceError(f"{where} has {table.num_rows} rows but the manifest says {info.rows}")
        for c in cols:
            if table.column(c).null_count:
                raise SourceError(f"column {c!r} of {where} has null rows; fill or drop them")
        if len(cache) >= 2:
            cache.pop(next(iter(cache)))
        cache[shard] = table
        return table

    def new_counts(self) -> dict:
        return {
            "items": np.zeros(len(self.names), dtype=np.int64),
            "tokens": np.zeros(len(self.names), dtype=np.int64),
            "shards": [np.zeros(len(s["shards"]), dtype=np.int64) for s in self.manifest["sources"]],
        }


def _list_array(rows: list) -> pa.Array:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(rows).astype(np.int32) if rows and lengths.sum() else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


# ------------------------------------------------------------------------------------------ writing
def _parquet_schema(columns: dict) -> pa.Schema:
    fields = [pa.field("position", pa.int64()), pa.field("source", pa.string())]
    if columns["text"]:
        fields.append(pa.field("text", pa.string()))
    if columns["input_ids"]:
        fields.append(pa.field("input_ids", pa.list_(pa.int32())))
    if columns["doc_start"]:
        fields.append(pa.field("doc_start", pa.list_(pa.bool_())))
    return pa.schema(fields)


def _write_parquet(path: str, chunks: Iterator[dict], names: list[str], columns: dict) -> None:
    schema = _parquet_schema(columns)
    with pq.ParquetWriter(path, schema) as writer:
        for ch in chunks:
            cols: dict[str, pa.Array] = {
                "position": pa.array(ch["position"], pa.int64()),
                "source": pa.array(np.asarray(names, dtype=object)[ch["source"]], pa.string()),
            }
            if columns["text"]:
                cols["text"] = ch["text"]
            if columns["input_ids"]:
                ids = ch["input_ids"]
                if isinstance(ids, np.ndarray):  # packing: a [n, L + 1] block
                    offsets = np.arange(0, ids.size + 1, ids.shape[1], dtype=np.int32)
                    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.reshape(-1), pa.int32()))
                cols["input_ids"] = ids
            if columns["doc_start"]:
                st = ch["doc_start"]
                offsets = np.arange(0, st.size + 1, st.shape[1], dtype=np.int32)
                cols["doc_start"] = pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(st.reshape(-1), pa.bool_())
                )
            writer.write_table(pa.table(cols, schema=schema))


def _rows(ch: dict, names: list[str]) -> Iterator[dict]:
    texts = ch["text"].to_pylist() if "text" in ch else None
    ids = ch.get("input_ids")
    if ids is not None and not isinstance(ids, np.ndarray):
        values = integers(ids.flatten()).astype(np.int32)  # flatten: only the rows' own values
        ids = np.split(values, np.cumsum(value_lengths(ids))[:-1])
    for i, (pos, src) in enumerate(zip(ch["position"].tolist(), ch["source"].tolist())):
        row: dict[str, Any] = {"position": pos, "source": names[src]}
        if texts is not None:
            row["text"] = texts[i]
        if ids is not None:
            row["input_ids"] = ids[i]
        if "doc_start" in ch:
            row["doc_start"] = ch["doc_start"][i]
        yield row


def _write_webdataset(path: str, chunks: Iterator[dict], names: list[str], columns: dict) -> None:
    import webdataset as wds

    with open(path, "wb") as f, wds.TarWriter(f, mtime=TAR_MTIME) as sink:
        for ch in chunks:
            for row in _rows(ch, names):
                sample: dict[str, Any] = {
                    "__key__": f"{row['position']:012d}",
                    "source.txt": row["source"],
                    "position.id": row["position"],
                }
                if "text" in row:
                    sample["txt"] = row["text"]
                if "input_ids" in row:
                    sample["input_ids.npy"] = np.ascontiguousarray(row["input_ids"], dtype=np.int32)
                if "doc_start" in row:
                    sample["doc_start.npy"] = np.ascontiguousarray(row["doc_start"], dtype=np.bool_)
                sink.write(sample)


def _mds_columns(columns: dict, packing: bool) -> dict[str, str]:
    cols = {"position": "int64", "source": "str"}
    if columns["text"]:
        cols["text"] = "str"
    if columns["input_ids"]:
        # MDS cannot encode an empty ndarray; sample-mode rows may be empty documents.
        cols["input_ids"] = "ndarray:int32" if packing else "json"
    if columns["doc_start"]:
        cols["doc_start"] = "ndarray:uint8"
    return cols


def _write_mds(tmp_dir: str, chunks: Iterator[dict], names: list[str], columns: dict, packing: bool) -> dict:
    """Write one MDS shard into ``tmp_dir`` (as shard.00000.mds); return its index.json entry."""
    from fastmix_data.sources.mds_compat import import_streaming

    try:
        streaming = import_streaming()
    except ImportError as exc:
        raise ResampleError(f"MDS output cannot be written: {exc}; choose format='parquet' or 'webdataset'") from exc
    with streaming.MDSWriter(out=tmp_dir, columns=_mds_columns(columns, packing), size_limit=None) as writer:
        for ch in chunks:
            for row in _rows(ch, names):
                if "input_ids" in row and not packing:
                    row["input_ids"] = [int(x) for x in row["input_ids"]]
                if "doc_start" in row:
                    row["doc_start"] = row["doc_start"].astype(np.uint8)
                writer.write(row)
    with open(os.path.join(tmp_dir, INDEX), encoding="utf-8") as f:
        shards = json.load(f)["shards"]
    if len(shards) != 1:
        raise ResampleError(f"MDSWriter wrote {len(shards)} shards for one output shard in {tmp_dir}")
    return shards[0]


# ------------------------------------------------------------------------------------------ the run
def _run_record(manifest: Mapping[str, Any], layout: Layout, columns: dict) -> dict:
    body = {
        "manifest_fingerprint": manifest["fingerprint"],
        "output_format": layout.format,
        "items": layout.items,
        "items_per_shard": layout.per_shard,
        "columns": columns,
        "index_version": INDEX_VERSION,
    }
    return {"run": hashlib.sha256(canonical_json(body)).hexdigest(), **body}


def _prepare(out_dir: str, run: dict, manifest: Mapping[str, Any]) -> None:
    run_file = outdir.join(out_dir, STATE_DIR, "run.json")
    try:
        old = outdir.read_json(run_file)
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as exc:
        raise ResampleError(
            f"{run_file} is unreadable ({exc}); delete {out_dir} or choose another out_dir"
        ) from None
    if old is not None and old.get("run") != run["run"]:
        diff = [
            f"{k}: {old.get(k)!r} there, {run[k]!r} now"
            for k in ("manifest_fingerprint", "output_format", "items", "items_per_shard", "columns")
            if old.get(k) != run[k]
        ]
        raise ResampleError(
            f"{out_dir} already holds another resample run ({'; '.join(diff) or 'different run'}); nothing was "
            "changed. Choose another out_dir, or delete that one to start over"
        )
    if old is None:
        others = sorted(outdir.names(out_dir) - {STATE_DIR})
        if others:
            raise ResampleError(
                f"{out_dir} is not empty ({', '.join(others[:5])}) and holds no fastmix_data resample run; "
                "nothing was changed. Choose an empty or new out_dir"
            )
        outdir.prepare(out_dir)
        outdir.write_json(run_file, run)
    outdir.prepare(out_dir)
    copy = outdir.join(out_dir, "manifest.json")
    if outdir.size(copy) is None:
        outdir.write_json(copy, dict(manifest, root=manifest["root"]))


@dataclass
class _TaskState:
    """Per worker process: what every output-shard task needs (the materialiser is built lazily:
    a rerun whose shards are all finished never plans or opens an input shard)."""

    manifest: Mapping[str, Any]
    out_dir: str
    layout: Layout
    run: dict
    opts: dict
    _mat: Materialiser | None = None

    @property
    def materialiser(self) -> Materialiser:
        if self._mat is None:
            self._mat = Materialiser(self.manifest, **self.opts)
        return self._mat


def _task_setup(context: dict) -> _TaskState:
    if context["arrow_threads"]:  # share the cores: Arrow's decode threads per worker process
        pa.set_cpu_count(context["arrow_threads"])
    return _TaskState(
        context["manifest"], context["out_dir"], context["layout"], context["run"], context["opts"]
    )


def _shard_task(state: _TaskState, i: int) -> TaskOutcome:
    """Output shard ``i``, idempotently: verified and skipped when finished, else written and published."""
    name = state.layout.name(i)
    marker = _finished(state.out_dir, name, state.run)
    if marker is not None:
        return TaskOutcome(marker, bytes_read=marker["bytes"], skipped=True)
    marker, read = _write_one(state, i)
    return TaskOutcome(marker, bytes_read=read, bytes_written=marker["bytes"])


def _marker_path(out_dir: str, name: str) -> str:
    return outdir.join(out_dir, STATE_DIR, "done", name + ".json")


def _finished(out_dir: str, name: str, run: dict) -> dict | None:
    """The done-marker of shard ``name`` when its file still hashes to the recorded sha256."""
    try:
        marker = outdir.read_json(_marker_path(out_dir, name))
    except (OSError, ValueError):
        return None
    path = outdir.join(out_dir, name)
    if not isinstance(marker, dict) or marker.get("run") != run["run"]:
        return None
    size = outdir.size(path)
    if size is None:
        return None
    if size != marker.get("bytes") or outdir.sha256(path) != marker.get("sha256"):
        log.warning("resample: %s does not match its progress record; rewriting it", path)
        return None
    return marker


def _publish(tmp: str, out_dir: str, name: str) -> tuple[int, str]:
    """Make a finished temporary file visible as ``out_dir/name`` in one atomic step.

    The one place an output shard becomes visible (:func:`outdir.publish`). Returns (bytes, sha256).
    """
    digest = sha256_file(tmp)
    size = os.path.getsize(tmp)
    outdir.publish(tmp, outdir.join(out_dir, name))
    return size, digest


def _clear_stale_temps(tmp_root: str, name: str) -> None:
    # ours: a shard has one writer at a time (a retried or rerun task replaces a dead attempt's file)
    for stale in glob.glob(os.path.join(tmp_root, glob.escape(name) + ".*")):
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.unlink(stale)


def _write_one(state: _TaskState, i: int) -> tuple[dict, int]:
    """Write output shard ``i`` to a temporary file, publish it, record its done-marker.

    Returns (the marker, bytes of the input shards it read from)."""
    mat = state.materialiser
    layout, out_dir = state.layout, state.out_dir
    name = layout.name(i)
    a, b = layout.bounds(i)
    tmp_root = outdir.temp_dir(out_dir)
    _clear_stale_temps(tmp_root, name)
    tmp = os.path.join(tmp_root, f"{name}.{socket.gethostname()}.{os.getpid()}.tmp")
    counts = mat.new_counts()
    chunks = mat.chunks(a, b, counts)
    entry = None
    try:
        if layout.format == "parquet":
            _write_parquet(tmp, chunks, mat.names, mat.columns)
        elif layout.format == "webdataset":
            _write_webdataset(tmp, chunks, mat.names, mat.columns)
        else:
            os.makedirs(tmp)
            entry = _write_mds(tmp, chunks, mat.names, mat.columns, mat.seq_len is not None)
            inner = os.path.join(tmp, entry["raw_data"]["basename"])
            entry["raw_data"]["basename"] = name
            tmp_dir, tmp = tmp, inner
        size, digest = _publish(tmp, out_dir, name)
    finally:
        if layout.format == "mds" and entry is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        elif os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    marker = {
        "run": state.run["run"],
        "index": i,
        "path": name,
        "start": a,
        "end": b,
        "rows": b - a,
        "bytes": size,
        "sha256": digest,
        "sources": {n: int(c) for n, c in zip(mat.names, counts["items"])},
        "tokens": {n: int(c) for n, c in zip(mat.names, counts["tokens"])},
        "shard_takes": {
            n: [[int(s), int(c[s])] for s in np.nonzero(c)[0]] for n, c in zip(mat.names, counts["shards"])
        },
    }
    if entry is not None:
        marker["mds"] = entry
    outdir.write_json(_marker_path(out_dir, name), marker, indent=None)
    read = sum(
        int(sh["bytes"])
        for s, c in zip(state.manifest["sources"], counts["shards"])
        for sh, n in zip(s["shards"], c)
        if n
    )
    return marker, read


def _assign(count: int, rank: int, world: int) -> range:
    return range(rank * count // world, (rank + 1) * count // world)


def resample(
    manifest: str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    format: str = "parquet",
    shard_size: str | int = "256MB",
    workers: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    shard_items: int | None = None,
    verify: str = "size",
    root: str | None = None,
    tokenizer: Any = None,
    eos_id: int | None = None,
    allow_unsafe: bool = False,
    progress: bool | None = None,
    engine: str | LocalEngine | RayEngine = "local",
    ray_address: str | None = None,
) -> dict:
    """Write the manifest's items (global positions 0..budget, in order) as new shards in ``out_dir``.

    Args:
        manifest: a manifest path or dict.
        out_dir: an empty or new directory, or one holding an unfinished run of the same manifest,
            format and layout (which is resumed: finished shards are verified and skipped).
        format: "parquet", "webdataset" or "mds".
        shard_size: target bytes per output shard ("256MB", "1GiB", int), estimated from the
            manifest, or ``shard_items`` items per shard exactly.
        workers: processes on this machine (local engine, default 1), or Ray tasks at once (ray
            engine, default: the cluster's CPUs).
        rank, world_size: this process's share of the output shards (default: torch.distributed,
            else the RANK / WORLD_SIZE environment, else 0 / 1). Ranks write disjoint shards.
            The ray engine runs every shard from one driver (world_size 1).
        verify: check of the input shards before reading ("none", "size", "sha256").
        tokenizer, eos_id: the manifest's packing tokenizer (default: bytes).
        progress: show a tqdm bar over the output shards (default: when attached to a terminal).
        engine: "local" (default), "ray" (one Ray task per output shard, retried when its worker
            dies), or an engine object (:class:`fastmix_data.engine.RayEngine`).
        ray_address: the Ray cluster for ``engine="ray"`` (see ``RayEngine``).

    Returns:
        The output index (also in ``out_dir/index.json``; see docs/manifest.md) with
        ``"complete": True`` once every shard of every rank exists (under torch.distributed, on
        every rank); without torch.distributed a rank that finishes before the others gets
        ``{"complete": False, "written": [its shards], "missing": n}``. ``"stats"`` holds this
        call's telemetry (tasks, skipped, retries, bytes read/written, seconds; not in index.json).

    Raises:
        ResampleError: ``out_dir`` holds another run or unrelated files; the written composition
            does not match the manifest.
        ManifestError / SourceError: an invalid manifest, changed or unreadable input shards.
    """
    from fastmix_data.stream.distributed import rank_and_world

    eng = get_engine(engine, workers, ray_address=ray_address)
    m = load_manifest(manifest, verify=verify, root=root)
    layout = plan_layout(m, format, shard_size, shard_items)
    columns = output_columns(m)
    run = _run_record(m, layout, columns)
    if rank is None or world_size is None:
        detected = (0, 1) if eng.name == "ray" else rank_and_world()
        rank = detected[0] if rank is None else int(rank)
        world_size = detected[1] if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ResampleError(f"rank {rank} is outside world_size {world_size}")
    if eng.name == "ray" and world_size != 1:
        raise ResampleError(
            f"engine='ray' runs every output shard from one driver; got world_size {world_size}. "
            "Run one resample command, not one per rank"
        )
    out_dir = outdir.location(out_dir)
    _prepare(out_dir, run, m)
    opts = {"tokenizer": tokenizer, "eos_id": eos_id, "allow_unsafe": allow_unsafe}
    parallel = eng.name == "ray" or (eng.workers > 1 and layout.count > 1)
    context = {
        "manifest": m, "out_dir": out_dir, "layout": layout, "run": run, "opts": opts,
        "arrow_threads": eng.threads_per_task() if parallel else None,
    }  # fmt: skip
    mine = list(_assign(layout.count, rank, world_size))
    markers, stats = eng.run(
        Job(_task_setup, _shard_task, context), mine, desc=f"resample {format}", progress=progress
    )
    log.info("%s", stats.summary("resample"))
    if _is_dist():  # torchrun: rank 0 writes the index once every rank has written its shards
        _barrier()
        if rank != 0:
            _barrier()
            return dict(read_index(out_dir), complete=True, stats=stats.to_json())
        try:
            return dict(finalize(out_dir, m, layout, run), stats=stats.to_json())
        finally:
            _barrier()
    result = finalize(out_dir, m, layout, run, markers if world_size == 1 else None)
    if not result.get("complete", True):
        result["written"] = sorted(mk["path"] for mk in markers if mk is not None)
    result["stats"] = stats.to_json()
    return result


def _is_dist() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _is_dist():
        import torch.distributed as dist

        dist.barrier()


def finalize(
    out_dir: str, manifest: Mapping[str, Any], layout: Layout, run: dict, markers: list[dict] | None = None
) -> dict:
    """Write ``out_dir/index.json`` when every output shard has its done-marker; check composition.

    ``markers``: every shard's marker in shard order, when the caller has them (else read from disk)."""
    if markers is not None and len(markers) == layout.count:
        return _write_index(out_dir, manifest, layout, run, markers)
    markers = []
    for i in range(layout.count):
        try:
            mk = outdir.read_json(_marker_path(out_dir, layout.name(i)))
        except (OSError, ValueError):
            return {"complete": False, "missing": layout.count - len(markers)}
        if mk.get("run") != run["run"]:
            return {"complete": False, "missing": layout.count - len(markers)}
        markers.append(mk)
    return _write_index(out_dir, manifest, layout, run, markers)


def _write_index(
    out_dir: str, manifest: Mapping[str, Any], layout: Layout, run: dict, markers: list[dict]
) -> dict:
    """The output's index (after checking the shards' counts against the manifest), written last."""
    names = [s["name"] for s in manifest["sources"]]
    items = {n: sum(mk["sources"][n] for mk in markers) for n in names}
    tokens = {n: sum(mk["tokens"][n] for mk in markers) for n in names}
    _check_counts(manifest, markers, items, tokens)
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "run": run["run"],
        "manifest_fingerprint": manifest["fingerprint"],
        "manifest": "manifest.json",
        "output_format": layout.format,
        "mode": manifest["mode"],
        "columns": [
            c
            for c in ("position", "source", "text", "input_ids", "doc_start")
            if c in ("position", "source") or run["columns"].get(c)
        ],
        "sources": names,
        "items": layout.items,
        "items_per_shard": layout.per_shard,
        "bytes": sum(mk["bytes"] for mk in markers),
        "shards": [
            {k: mk[k] for k in ("path", "start", "end", "rows", "bytes", "sha256", "sources", "tokens")}
            for mk in markers
        ],
        "composition": _composition(manifest, items, tokens),
    }
    if layout.format == "mds":
        outdir.write_json(
            outdir.join(out_dir, INDEX),
            {"version": 2, "shards": [mk["mds"] for mk in markers], "fastmix_data": index},
        )
    else:
        outdir.write_json(outdir.join(out_dir, INDEX), index)
    outdir.finish(out_dir)
    return dict(index, complete=True)


def _check_counts(manifest: Mapping[str, Any], markers: list[dict], items: dict, tokens: dict) -> None:
    """Raise `ResampleError` (naming the source and shard) unless the shards wrote exactly the
    manifest's takes: items per source and per input shard, and tokens per source when packing."""
    problems = []
    for s in manifest["sources"]:
        n = s["name"]
        if items[n] != s["take"]:
            problems.append(f"source {n!r}: wrote {items[n]} items, the manifest takes {s['take']}")
        takes = np.zeros(len(s["shards"]), dtype=np.int64)
        for mk in markers:
            for shard, c in mk["shard_takes"][n]:
                takes[shard] += c
        want = np.array([sh["take"] for sh in s["shards"]], dtype=np.int64)
        if not np.array_equal(takes, want):
            bad = int(np.nonzero(takes != want)[0][0])
            problems.append(
                f"source {n!r} shard {s['shards'][bad]['path']}: wrote {takes[bad]} items, the manifest takes {want[bad]}"
            )
    if manifest["mode"]["kind"] == "packing":
        for s in manifest["sources"]:
            if tokens[s["name"]] != s["take_tokens"]:
                problems.append(
                    f"source {s['name']!r}: wrote {tokens[s['name']]} tokens, the manifest says {s['take_tokens']}"
                )
    if problems:
        raise ResampleError("the resampled shards do not match the manifest: " + "; ".join(problems[:10]))


def _composition(manifest: Mapping[str, Any], items: dict, tokens: dict) -> dict:
    """The index's ``composition``: what was written per source against what the manifest asked."""
    names = [s["name"] for s in manifest["sources"]]
    total_items = max(sum(items.values()), 1)
    total_tokens = max(sum(tokens.values()), 1)
    realised = manifest["weights"]["realised_tokens"]
    return {
        "items": items,
        "tokens": tokens,
        "item_share": {n: items[n] / total_items for n in names},
        "token_share": {n: tokens[n] / total_tokens for n in names},
        "manifest_items": {s["name"]: s["take"] for s in manifest["sources"]},
        "manifest_tokens": {s["name"]: s["take_tokens"] for s in manifest["sources"]},
        "manifest_token_share": dict(realised),
        "max_token_share_deviation": max(abs(tokens[n] / total_tokens - realised[n]) for n in names),
        "items_match_manifest": True,
    }


def read_index(out_dir: str | os.PathLike) -> dict:
    """The resample index of ``out_dir`` (unwrapped from the MDS index.json for MDS output)."""
    path = outdir.join(outdir.location(out_dir), INDEX)
    try:
        obj = outdir.read_json(path)
    except (OSError, ValueError) as exc:
        raise ResampleError(f"cannot read resample index {path}: {exc}") from None
    obj = obj.get("fastmix_data", obj)
    if obj.get("format") != INDEX_FORMAT:
        raise ResampleError(f"{path} is not a fastmix_data resample index")
    if obj.get("version") != INDEX_VERSION:
        raise ResampleError(
            f"resample index version {obj.get('version')!r} in {path} is not supported (reads {INDEX_VERSION})"
        )
    return obj
