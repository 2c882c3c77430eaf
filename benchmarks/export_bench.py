"""Export benchmark: resample throughput against a plain pyarrow read + write, and offline manifest time.

What is measured (each repeated, min / median / max reported):

1. Resampling one epoch of a Parquet corpus (weights proportional to source sizes, budget = all rows,
   so every input byte is read once and every row written once) to Parquet with
   ``fastmix_data.export.resample``, with 1 and 2 worker processes; MB/s = input Parquet bytes / wall
   time (the whole call: manifest check, planning, reading, gathering rows in plan order, writing,
   fsync, sha256, index).
2. The ceiling: a plain pyarrow read + write of the same files (``pq.read_table`` then
   ``pq.write_table`` per input shard, same columns, no reordering), 1 and 2 processes.
3. ``build_manifest`` for 10,000 shards. Writing and hashing 10,000 real files would dominate the run
   on a 2-core machine, so this uses synthetic shard-index entries (``ShardInfo`` rows/tokens/bytes/
   sha256, as ``open_source`` returns from its cache): exactly the data the manifest reads. A second
   row times the same for real files: ``open_source`` with a warm index cache + ``build_manifest``.

Usage::

    python benchmarks/export_bench.py                  # ~120 MB corpus, 3 repetitions
    python benchmarks/export_bench.py --quick          # small corpus, 1 repetition (smoke run)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    Summary,
    command_line,
    git_revision,
    machine_info,
    markdown_table,
    today,
    versions,
    wait_for_quiet,
    write_atomic,
)

_WORDS = np.array(
    "the of and to in is that for it as with was on be by this are or from at an which def return "
    "import class self value data model train loss weight mixture shard token stream python café 日本語".split()
)


def make_corpus(root: str, sources: int, shards: int, rows: int, seed: int = 0) -> dict[str, str]:
    """``sources`` Parquet sources of ``shards`` shards with ``rows`` documents each (~60 words)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(sources):
        d = os.path.join(root, f"src{s}")
        os.makedirs(d, exist_ok=True)
        for i in range(shards):
            lengths = rng.integers(20, 100, size=rows)
            words = _WORDS[rng.integers(0, len(_WORDS), size=int(lengths.sum()))]
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            texts = [f"src{s} doc{i}-{j}: " + " ".join(words[bounds[j] : bounds[j + 1]]) for j in range(rows)]
            pq.write_table(
                pa.table({"text": pa.array(texts, pa.string())}), os.path.join(d, f"part-{i:05d}.parquet")
            )
        out[f"src{s}"] = d
    return out


def _copy_one(args: tuple[str, str]) -> int:
    src, dst = args
    table = pq.read_table(src, columns=["text"])
    pq.write_table(table, dst)
    return table.num_rows


def pyarrow_copy(files: list[str], out: str, processes: int) -> None:
    os.makedirs(out, exist_ok=True)
    jobs = [(f, os.path.join(out, f"{i:05d}.parquet")) for i, f in enumerate(files)]
    if processes <= 1:
        for job in jobs:
            _copy_one(job)
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(_copy_one, jobs)


def synthetic_sources(root: str, shards: int):
    from fastmix_data.sources import ShardedSource
    from fastmix_data.sources.base import ShardInfo
    from fastmix_data.sources.reader import Columns

    reader = type("Reader", (), {"format": "parquet"})()
    per = shards // 4
    out = {}
    rng = np.random.default_rng(1)
    for k in range(4):
        rows = rng.integers(5_000, 20_000, size=per)
        infos = [
            ShardInfo(
                os.path.join(root, f"d{k}", f"part-{i:05d}.parquet"),
                int(r),
                int(r) * 600,
                int(r) * 300,
                "0" * 64,
            )
            for i, r in enumerate(rows)
        ]
        out[f"d{k}"] = ShardedSource(f"d{k}", "parquet", infos, reader, Columns("text", None))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sources", type=int, default=2)
    ap.add_argument("--shards", type=int, default=8, help="shards per source")
    ap.add_argument("--rows", type=int, default=50_000, help="rows per shard")
    ap.add_argument(
        "--shard-size",
        default="16MB",
        help="resample output shard size (several shards, so 2 workers share work)",
    )
    ap.add_argument("--manifest-shards", type=int, default=10_000)
    ap.add_argument(
        "--real-shards", type=int, default=1_000, help="real tiny files for the warm-cache manifest row"
    )
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastmix_bench", "export"))
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "export.md")
    )
    ap.add_argument("--max-busy", type=float, default=0.25)
    ap.add_argument("--note", default="", help="a line for the report (e.g. what else ran on the machine)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.shards, args.rows, args.real_shards = 1, 2, 5_000, 100
        if args.out.endswith(os.path.join("results", "export.md")):
            args.out = os.path.join(args.workdir, "export-quick.md")

    from fastmix_data.export import build_manifest
    from fastmix_data.export.resample import resample
    from fastmix_data.sources import open_source

    os.environ.setdefault("FASTMIX_DATA_CACHE", os.path.join(args.workdir, "cache"))
    data = os.path.join(args.workdir, f"corpus-{args.sources}x{args.shards}x{args.rows}")
    if not os.path.isdir(data):
        print(f"writing corpus to {data} ...", flush=True)
        tmp = data + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_corpus(tmp, args.sources, args.shards, args.rows)
        os.replace(tmp, data)
    sources = {f"src{s}": os.path.join(data, f"src{s}") for s in range(args.sources)}
    opened = {n: open_source(n, p) for n, p in sources.items()}  # index once (cached)
    files = [s.path for src in opened.values() for s in src.shards]
    in_bytes = sum(os.path.getsize(f) for f in files)
    rows = {n: src.rows for n, src in opened.items()}
    manifest = build_manifest(sources, rows, sum(rows.values()), root=data, seed=0)
    assert all(s["take"] == s["items"] for s in manifest["sources"]), "budget should be exactly one epoch"
    scratch = os.path.join(args.workdir, "scratch")
    from fastmix_data.export.resample import plan_layout

    n_out = plan_layout(manifest, "parquet", args.shard_size).count

    results: dict[str, list[float]] = {}
    busy: list[float] = []

    def measure(label: str, fn) -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        busy.append(wait_for_quiet(args.max_busy))
        t0 = time.perf_counter()
        fn()
        results.setdefault(label, []).append(time.perf_counter() - t0)
        shutil.rmtree(scratch, ignore_errors=True)

    cases = [
        ("pyarrow read+write, 1 process", lambda: pyarrow_copy(files, scratch, 1)),
        ("pyarrow read+write, 2 processes", lambda: pyarrow_copy(files, scratch, 2)),
        (
            "fastmix resample → parquet, 1 worker",
            lambda: resample(manifest, scratch, "parquet", args.shard_size, workers=1, progress=False),
        ),
        (
            "fastmix resample → parquet, 2 workers",
            lambda: resample(manifest, scratch, "parquet", args.shard_size, workers=2, progress=False),
        ),
    ]
    for label, fn in cases:  # warm-up (page cache, imports)
        measure(label, fn)
        results[label].clear()
    for _ in range(args.repeats):
        for label, fn in cases:  # interleaved, so that drifts hit all alike
            measure(label, fn)
            print(f"{label}: {results[label][-1]:.2f} s", flush=True)

    manifest_times: dict[str, list[float]] = {}
    synth_root = os.path.join(args.workdir, "synthetic")
    synth = synthetic_sources(synth_root, args.manifest_shards)
    weights = {n: 1.0 for n in synth}
    build_manifest(synth, weights, "100B_tokens", root=synth_root)  # warm-up
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        m = build_manifest(synth, weights, "100B_tokens", root=synth_root)
        manifest_times.setdefault(
            f"build_manifest, {args.manifest_shards:,} synthetic shards, 100B tokens", []
        ).append(time.perf_counter() - t0)
    assert sum(len(s["shards"]) for s in m["sources"]) == args.manifest_shards

    real_root = os.path.join(args.workdir, f"tiny-{args.real_shards}")
    if not os.path.isdir(real_root):
        tmp = real_root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for k in range(2):
            os.makedirs(os.path.join(tmp, f"t{k}"))
            for i in range(args.real_shards // 2):
                pq.write_table(
                    pa.table({"text": [f"t{k} {i} {j}" for j in range(20)]}),
                    os.path.join(tmp, f"t{k}", f"p-{i:05d}.parquet"),
                )
        os.replace(tmp, real_root)
    tiny = {f"t{k}": os.path.join(real_root, f"t{k}") for k in range(2)}
    build_manifest(tiny, [1, 1], "1M_samples", root=real_root)  # indexes once (cache)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        build_manifest(tiny, [1, 1], "1M_samples", root=real_root)
        manifest_times.setdefault(
            f"open_source (warm index) + build_manifest, {args.real_shards:,} real shards", []
        ).append(time.perf_counter() - t0)

    mb = in_bytes / 1e6
    base1 = Summary.of(results["pyarrow read+write, 1 process"]).median
    rows_total = sum(rows.values())
    table = []
    for label, secs in results.items():
        s = Summary.of(secs)
        tput = Summary.of([mb / x for x in secs])
        table.append(
            [
                label,
                s.fmt(digits=2),
                tput.fmt(digits=1),
                f"{rows_total / s.median:,.0f}",
                f"{base1 / s.median:.2f}×",
            ]
        )
    mtable = [[label, Summary.of(secs).fmt(digits=2)] for label, secs in manifest_times.items()]
    info = machine_info()
    report = [
        "# Export benchmark",
        "",
        f"- date: {today()}",
        f"- command: `{command_line()}`",
        f"- revision: {git_revision()}",
        f"- machine: {info['cpu']}; {info['cores']}; {info['ram']} RAM; {info['os']}; {info['python']}",
        "- versions: "
        + ", ".join(f"{k} {v}" for k, v in versions(["pyarrow", "numpy", "torch", "webdataset"]).items()),
        f"- other load before runs (share of all CPUs busy): max {max(busy):.2f}",
        f"- repetitions: {args.repeats} (interleaved, after one warm-up each); min / median / max",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        "## Resample throughput",
        "",
        f"Corpus: {args.sources} Parquet sources × {args.shards} shards × {args.rows:,} rows = {rows_total:,} rows, "
        f"{mb:.1f} MB on disk (snappy). Manifest: weights proportional to rows, budget = {rows_total:,} samples "
        "(one epoch of each source: every byte read once, every row written once, in plan order). MB/s = input "
        f"Parquet MB / wall seconds. Output shard size {args.shard_size} (estimated from input bytes per row: "
        f"{n_out} output shards); fsync + sha256 of every output shard and the index included.",
        "",
        markdown_table(["run", "seconds", "MB/s", "rows/s (median)", "vs pyarrow 1 proc"], table, "lrrrr"),
        "",
        "## Offline manifest generation",
        "",
        "The synthetic row uses shard-index entries (rows, tokens, bytes, sha256 per shard, as the index cache "
        "holds them) instead of 10,000 real files, which would take minutes to write and hash on this machine; "
        "`build_manifest` reads nothing else. The real-file row includes discovering the files and loading the "
        "cached index.",
        "",
        markdown_table(["run", "seconds"], mtable, "lr"),
        "",
    ]
    write_atomic(args.out, "\n".join(report))
    print("\n".join(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
