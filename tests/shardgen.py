"""Write real shards with the real libraries, for tests and benchmarks.

Every writer splits ``docs`` into ``shards`` contiguous, near-equal groups (shard i gets docs
``[i*n//shards, (i+1)*n//shards)``), so shard order equals doc order. When an ids column is asked for
and ``ids`` is not given, each doc's ids are its UTF-8 bytes (the byte tokenizer without EOS).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

_WORDS = ["alpha", "beta", "gamma", "delta", "naïve", "café", "日本語", "emoji🙂", "x", "zeta", "\n", "tab\t"]


def make_docs(n: int, seed: int = 0, prefix: str = "doc", empty: bool = False) -> list[str]:
    """``n`` distinct documents of varied length and Unicode; with ``empty``, doc 3 is ``""``.

    (MDS cannot store an empty ``ndarray``, so empty docs are opt-in.)
    """
    rng = random.Random(seed)
    docs = [
        f"{prefix}{i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 30))) for i in range(n)
    ]
    if empty and n > 3:
        docs[3] = ""
    return docs


def byte_ids(doc: str) -> list[int]:
    return list(doc.encode("utf-8"))


def split_evenly(items: Sequence, shards: int) -> list[list]:
    n = len(items)
    return [list(items[i * n // shards : (i + 1) * n // shards]) for i in range(shards)]


def _ids_for(docs: Sequence[str], ids: Sequence[Sequence[int]] | None) -> list[list[int]]:
    return [list(x) for x in ids] if ids is not None else [byte_ids(d) for d in docs]


def write_parquet_source(
    directory: str | os.PathLike,
    docs: Sequence[str],
    shards: int = 2,
    text_col: str | None = "text",
    ids_col: str | None = None,
    ids: Sequence[Sequence[int]] | None = None,
    ids_type: pa.DataType | None = None,
    extra: dict[str, Sequence] | None = None,
    row_group_size: int | None = None,
    prefix: str = "part",
) -> list[Path]:
    """Write ``docs`` as ``shards`` Parquet files ``{prefix}-00000.parquet`` ...; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    all_ids = _ids_for(docs, ids) if ids_col else None
    positions = split_evenly(range(len(docs)), shards)
    paths = []
    for s, pos in enumerate(positions):
        cols: dict[str, pa.Array] = {}
        if text_col:
            cols[text_col] = pa.array([docs[i] for i in pos], pa.string())
        if ids_col and all_ids is not None:
            cols[ids_col] = pa.array([all_ids[i] for i in pos], pa.list_(ids_type or pa.int32()))
        for name, values in (extra or {}).items():
            cols[name] = pa.array([values[i] for i in pos])
        path = directory / f"{prefix}-{s:05d}.parquet"
        pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_wds_source(
    directory: str | os.PathLike,
    docs: Sequence[str],
    shards: int = 2,
    text_member: str | None = "txt",
    ids_member: str | None = None,
    ids: Sequence[Sequence[int]] | None = None,
    extra: dict[str, Sequence] | None = None,
    prefix: str = "shard",
) -> list[Path]:
    """Write ``docs`` as WebDataset tars with ``webdataset.TarWriter``; sample keys ``doc000000``...

    ``ids_member`` ending in ``npy`` stores an int32 array, ending in ``json`` a JSON list. ``extra``
    maps member suffix -> per-doc values, written as webdataset encodes them (by suffix).
    """
    import webdataset as wds

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    all_ids = _ids_for(docs, ids) if ids_member else None
    paths = []
    for s, pos in enumerate(split_evenly(range(len(docs)), shards)):
        path = directory / f"{prefix}-{s:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in pos:
                sample: dict = {"__key__": f"doc{i:06d}"}
                if text_member:
                    sample[text_member] = docs[i].encode("utf-8")
                if ids_member and all_ids is not None:
                    if ids_member.endswith("npy"):
                        sample[ids_member] = np.asarray(all_ids[i], dtype=np.int32)
                    else:
                        sample[ids_member] = json.dumps(all_ids[i]).encode()
                for name, values in (extra or {}).items():
                    sample[name] = values[i]
                sink.write(sample)
        paths.append(path)
    return paths


def write_mds_source(
    directory: str | os.PathLike,
    docs: Sequence[str],
    shards: int = 2,
    text_col: str | None = "text",
    ids_col: str | None = None,
    ids: Sequence[Sequence[int]] | None = None,
    ids_encoding: str = "ndarray:int32",
    extra: dict[str, tuple[str, Sequence]] | None = None,
    compression: str | None = None,
) -> Path:
    """Write ``docs`` as an MDS dataset with ``streaming.MDSWriter`` (one shard per group); return
    the directory. ``extra`` maps column -> (encoding, per-doc values)."""
    from fastmix_data.sources.mds_compat import import_streaming

    streaming = import_streaming()
    directory = Path(directory)
    all_ids = _ids_for(docs, ids) if ids_col else None
    columns = {}
    if text_col:
        columns[text_col] = "str"
    if ids_col:
        columns[ids_col] = ids_encoding
    for name, (enc, _) in (extra or {}).items():
        columns[name] = enc
    with streaming.MDSWriter(
        out=str(directory), columns=columns, compression=compression, size_limit=None
    ) as w:
        for group in split_evenly(range(len(docs)), shards):
            for i in group:
                sample: dict = {}
                if text_col:
                    sample[text_col] = docs[i]
                if ids_col and all_ids is not None:
                    if ids_encoding.startswith("ndarray"):
                        dtype = ids_encoding.split(":")[1] if ":" in ids_encoding else "int64"
                        sample[ids_col] = np.asarray(all_ids[i], dtype=dtype)
                    else:
                        sample[ids_col] = all_ids[i]
                for name, (_, values) in (extra or {}).items():
                    sample[name] = values[i]
                w.write(sample)
            # End the shard here, as MDSWriter.write does when a shard reaches size_limit.
            w.flush_shard()
            w._reset_cache()
    return directory


def write_hf_source(
    directory: str | os.PathLike,
    docs: Sequence[str],
    shards: int = 2,
    text_col: str | None = "text",
    ids_col: str | None = None,
    ids: Sequence[Sequence[int]] | None = None,
) -> Path:
    """Write ``docs`` with ``datasets.Dataset.save_to_disk(num_shards=shards)``; return the directory."""
    import datasets

    data: dict[str, list] = {}
    if text_col:
        data[text_col] = list(docs)
    if ids_col:
        data[ids_col] = _ids_for(docs, ids)
    directory = Path(directory)
    datasets.Dataset.from_dict(data).save_to_disk(str(directory), num_shards=shards)
    return directory


def write_code_web(root: Path) -> Path:
    """The resample tests' corpus: code (150 Parquet docs, 3 shards) and web (100 WebDataset docs, 2 tars)."""
    write_parquet_source(root / "code", make_docs(150, prefix="code"), shards=3)
    write_wds_source(root / "web", make_docs(100, prefix="web", seed=1), shards=2)
    return root


def code_web_manifest(root: Path) -> dict:
    """The manifest of :func:`write_code_web`'s corpus: 600 items, weights 0.3/0.7, then 0.7/0.3 from 200."""
    from fastmix_data.export import build_manifest

    history = [{"position": 200, "weights": {"code": 0.7, "web": 0.3}}]
    return build_manifest(
        {"code": str(root / "code"), "web": str(root / "web")}, {"code": 0.3, "web": 0.7}, 600,
        root=root, seed=4, history=history,
    )  # fmt: skip


def truncate(path: str | os.PathLike, keep: float | int = 0.5) -> None:
    """Cut a file to ``keep`` bytes (int) or that fraction of its size (float)."""
    size = os.path.getsize(path)
    n = keep if isinstance(keep, int) else int(size * keep)
    with open(path, "r+b") as f:
        f.truncate(n)


def overwrite(path: str | os.PathLike, offset: int, data: bytes) -> None:
    """Overwrite bytes at ``offset`` (negative: from the end) in place, keeping the size."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(offset if offset >= 0 else size + offset)
        f.write(data)


def read_all(source) -> tuple[list[str] | None, list[list[int]] | None]:
    """Every row of a source, shard by shard: (texts, ids as lists), either None when absent."""
    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    for i in range(len(source.shards)):
        data = source.read_shard(i)
        if data.texts is not None:
            texts = (texts or []) + data.texts
        if data.ids is not None:
            ids = (ids or []) + [a.tolist() for a in data.ids]
    return texts, ids


def write_ab_sources(root: Path, n_a: int = 60, n_b: int = 60, shards_a: int = 2, shards_b: int = 2) -> dict:
    """Source "a" (Parquet, docs "a …") and source "b" (WebDataset, docs "b …") under ``root``;
    returns the ``sources`` mapping of a MixtureStream."""
    write_parquet_source(root / "a", make_docs(n_a, prefix="a"), shards=shards_a)
    write_wds_source(root / "b", make_docs(n_b, prefix="b"), shards=shards_b)
    return {"a": str(root / "a"), "b": str(root / "b" / "*.tar")}


def write_code_web_sources(root: Path) -> dict:
    """Source "code" (Parquet with an ids column, 150 docs in 4 shards) and "web" (WebDataset, 90
    docs with non-ASCII text in 3 shards) under ``root``; returns the ``sources`` mapping."""
    write_parquet_source(root / "code", make_docs(150, seed=1, prefix="code"), shards=4, ids_col="input_ids")
    write_wds_source(root / "web", make_docs(90, seed=2, prefix="wéb"), shards=3)
    return {"code": str(root / "code"), "web": str(root / "web" / "*.tar")}


def plan_counts(plan, n: int, chunk: int = 1 << 20) -> list[np.ndarray]:
    """Per source, items taken from each shard at positions [0, n), by planning every position: the
    slow, obviously-correct cross-check of ``MixturePlan.shard_takes`` (numpy over chunks of ``chunk``
    positions and ``np.add.at`` over (source, shard))."""
    offsets = np.cumsum([0] + [len(layout.items_per_shard) for layout in plan.layouts])
    counts = np.zeros(int(offsets[-1]), dtype=np.int64)
    for start in range(0, n, chunk):
        sl = plan.plan(start, min(n, start + chunk))
        np.add.at(counts, offsets[sl.source] + sl.shard, 1)
    return [counts[offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1)]
