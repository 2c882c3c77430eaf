"""Scale benchmark for export beyond one machine: manifest and planner at 1k-100k shards, resample on Ray.

What is measured:

1. ``build_manifest`` for 1,000 ... 100,000 shards (4 sources) and a 1T-token budget, from synthetic
   shard-index entries (rows 5k-20k, 600 tokens per row: what ``open_source`` returns from its index
   cache; ``build_manifest`` reads nothing else). Each size runs in a fresh process: wall time
   (min / median / max of the repetitions), the peak of Python + NumPy allocations during the call
   (tracemalloc, a separate untimed call) and the process's peak RSS. Beside it, what every resample
   worker does once: ``manifest_plan`` (the pure plan) and ``manifest_sources`` (sources from the
   manifest's records), and planning one 65,536-position chunk at the end of the budget.
   The growth exponent is the log-log slope from the smallest to the largest size.
2. Resample throughput of one corpus (as benchmarks/export_bench.py: Parquet, one epoch, 16MB output
   shards) with the local engine (1 and 2 processes) and the Ray engine (1 and 2 tasks at once) on a
   local Ray cluster of 2 CPUs, interleaved; ratios to the local 1-process run, paired per repetition.
   Ray's own cost per task (an empty task through the engine) is measured too, and both feed a
   written estimate for a 100-node cluster.

Usage::

    python benchmarks/scale_bench.py                    # both parts, 3 repetitions
    python benchmarks/scale_bench.py --quick            # smoke run (small sizes, 1 repetition)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    Summary,
    command_line,
    git_revision,
    machine_info,
    markdown_table,
    today,
    versions,
    write_atomic,
)
from export_bench import make_corpus, synthetic_sources  # noqa: E402

CHUNK = 1 << 16


# ------------------------------------------------------------------------------------------ part 1
def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def scale_child(shards: int, repeats: int) -> dict:
    """One size, in this (fresh) process; returns the measurements as a dict."""
    from fastmix_data.export import build_manifest, manifest_plan, manifest_sources

    root = os.path.join(tempfile.gettempdir(), "fastmix-scale-synthetic")
    synth = synthetic_sources(root, shards)
    weights = dict.fromkeys(synth, 1.0)

    def build():
        return build_manifest(synth, weights, "1T_tokens", root=root)

    m = build()  # warm-up (lazy imports)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = build()
        times.append(time.perf_counter() - t0)
    n = int(m["budget"]["items"])
    out = {"shards": shards, "items": n, "tokens": int(m["budget"]["tokens"]), "build_s": times}
    out["build_peak_mb"] = _peak_mb(build)
    for label, fn in (
        ("plan_s", lambda: manifest_plan(m).segments()),
        ("sources_s", lambda: manifest_sources(m)),
    ):
        secs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            secs.append(time.perf_counter() - t0)
        out[label] = secs
    plan = manifest_plan(m)
    plan.segments()
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sl = plan.plan(n - CHUNK, n)
        secs.append(time.perf_counter() - t0)
    assert len(sl.position) == CHUNK
    out["chunk_s"] = secs
    out["worker_setup_peak_mb"] = _peak_mb(lambda: (manifest_plan(m).segments(), manifest_sources(m)))
    out["manifest_json_mb"] = len(json.dumps(m)) / 1e6
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    return out


def run_scale(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        cmd = [sys.executable, os.path.abspath(__file__), "--child-scale", str(n), "--repeats", str(repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{n:,} shards: build {Summary.of(rows[-1]['build_s']).fmt(digits=3)} s", flush=True)
    return rows


def slope(rows: list[dict], key) -> float:
    a, b = rows[0], rows[-1]
    return math.log(key(b) / key(a)) / math.log(b["shards"] / a["shards"])


def scale_report(rows: list[dict]) -> list[str]:
    med = lambda r, k: Summary.of(r[k]).median  # noqa: E731
    table = [
        [
            f"{r['shards']:,}", f"{r['items']:,}", Summary.of(r["build_s"]).fmt(digits=3),
            f"{r['build_peak_mb']:.1f}", Summary.of(r["plan_s"]).fmt(digits=3),
            Summary.of(r["sources_s"]).fmt(digits=3), f"{r['worker_setup_peak_mb']:.1f}",
            Summary.of(r["chunk_s"]).fmt(scale=1e-3, digits=1), f"{r['manifest_json_mb']:.1f}",
            f"{r['max_rss_mb']:.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    header = ["shards", "items (1T tokens)", "build_manifest s", "build peak MB", "manifest_plan s",
              "manifest_sources s", "worker setup peak MB", "plan 64k chunk ms", "manifest JSON MB",
              "process peak RSS MB"]  # fmt: skip
    return [
        markdown_table(header, table),
        "",
        f"Growth from {rows[0]['shards']:,} to {rows[-1]['shards']:,} shards (log-log slope; 1 = linear): "
        f"build_manifest time {slope(rows, lambda r: med(r, 'build_s')):.2f}, its peak allocations "
        f"{slope(rows, lambda r: r['build_peak_mb']):.2f}; manifest_plan {slope(rows, lambda r: med(r, 'plan_s')):.2f}; "
        f"manifest_sources {slope(rows, lambda r: med(r, 'sources_s')):.2f}; one 64k-position chunk "
        f"{slope(rows, lambda r: med(r, 'chunk_s')):.2f}.",
    ]


# ------------------------------------------------------------------------------------------ part 2
def _noop_setup(context):
    return None


def _noop_task(state, key):
    from fastmix_data.engine import TaskOutcome

    return TaskOutcome(key)


def run_resample(args) -> tuple[list[str], dict]:
    import ray

    from fastmix_data.engine import Job, LocalEngine, RayEngine
    from fastmix_data.export import build_manifest
    from fastmix_data.export.resample import resample
    from fastmix_data.sources import open_source

    os.environ.setdefault("FASTMIX_DATA_CACHE", os.path.join(args.workdir, "cache"))
    data = os.path.join(args.workdir, f"corpus-2x{args.shards}x{args.rows}")
    if not os.path.isdir(data):
        make_corpus(data + ".tmp", 2, args.shards, args.rows)
        os.replace(data + ".tmp", data)
    sources = {f"src{s}": os.path.join(data, f"src{s}") for s in range(2)}
    rows = {n: open_source(n, p).rows for n, p in sources.items()}
    in_mb = sum(os.path.getsize(os.path.join(d, f)) for d in sources.values() for f in os.listdir(d)) / 1e6
    manifest = build_manifest(sources, rows, sum(rows.values()), root=data, seed=0)
    os.environ["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    scratch = os.path.join(args.workdir, "scratch")
    engines = {
        "local engine, 1 process": LocalEngine(1),
        "local engine, 2 processes": LocalEngine(2),
        "ray engine, 1 worker": RayEngine(workers=1),
        "ray engine, 2 workers": RayEngine(workers=2),
    }
    times: dict[str, list[float]] = {k: [] for k in engines}
    stats: dict[str, list[dict]] = {k: [] for k in engines}
    for rep in range(args.repeats + 1):  # repetition 0 is the warm-up
        for label, eng in engines.items():
            shutil.rmtree(scratch, ignore_errors=True)
            t0 = time.perf_counter()
            index = resample(manifest, scratch, "parquet", args.shard_size, engine=eng, progress=False)
            if rep:
                times[label].append(time.perf_counter() - t0)
                stats[label].append(index["stats"])
                print(f"{label}: {times[label][-1]:.2f} s", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    noop = []
    for _ in range(args.repeats):
        _, st = RayEngine(workers=2).run(Job(_noop_setup, _noop_task, None), list(range(200)), progress=False)
        noop.append(st.seconds / 200)
    ray.shutdown()
    base = times["local engine, 1 process"]
    table = []
    for label, secs in times.items():
        ratios = [b / s for b, s in zip(base, secs)]
        table.append([label, Summary.of(secs).fmt(digits=2), Summary.of([in_mb / s for s in secs]).fmt(digits=1),
                      Summary.of(ratios).fmt(digits=2) + "×"])  # fmt: skip
    one = stats["ray engine, 1 worker"]
    per_task = Summary.of([s["task_seconds"] / s["tasks"] for s in one]).median
    mb_task = in_mb / one[0]["tasks"]
    facts = {"in_mb": in_mb, "tasks": one[0]["tasks"], "per_task_s": per_task, "mb_per_task": mb_task,
             "noop_ms": Summary.of(noop).median * 1e3, "core_mb_s": mb_task / per_task}  # fmt: skip
    lines = [
        f"Corpus: 2 Parquet sources × {args.shards} shards × {args.rows:,} rows, {in_mb:.1f} MB; one epoch "
        f"(every row once) to Parquet shards of {args.shard_size} ({facts['tasks']} output shards = tasks). "
        "MB/s = input MB / wall seconds of the whole `resample` call (validation, planning, reading, "
        "writing, fsync, sha256, index). Ratio = local 1-process time / this time, paired per repetition.",
        "",
        markdown_table(["run", "seconds", "MB/s", "vs local 1 process"], table),
        "",
        f"Per task (Ray, 1 worker; the task function's own time, without the worker's one-off setup): {per_task:.3f} s for {mb_task:.1f} MB of input = {facts['core_mb_s']:.1f} MB/s "
        f"per core; Ray's own cost per task (an empty task through the engine, 2 at once): "
        f"{facts['noop_ms']:.2f} ms.",
    ]
    return lines, facts


def estimate(facts: dict, scale_rows: list[dict]) -> list[str]:
    """A written estimate for 100 nodes from the measured per-task cost."""
    nodes, cores, corpus_tb, shard_mb = 100, 32, 10, 256
    tasks = corpus_tb * 1e6 / shard_mb
    task_s = shard_mb / facts["core_mb_s"] + facts["noop_ms"] / 1e3
    slots = nodes * cores
    waves = math.ceil(tasks / slots)
    big = scale_rows[-1]
    setup = Summary.of(big["plan_s"]).median + Summary.of(big["sources_s"]).median
    hours = (waves * task_s + setup) / 3600
    need = slots * facts["core_mb_s"] / 1e3
    return [
        f"Assume {nodes} nodes × {cores} cores, a {corpus_tb} TB corpus resampled once (one epoch) into "
        f"{shard_mb} MB output shards: {tasks:,.0f} tasks, {slots:,} at once, {waves} waves. A task costs "
        f"{shard_mb} MB / {facts['core_mb_s']:.1f} MB/s + {facts['noop_ms']:.1f} ms Ray overhead = {task_s:.1f} s, "
        f"and each worker process first builds the plan and sources once ({setup:.2f} s at "
        f"{big['shards']:,} input shards, measured above). Compute-bound estimate: "
        f"{waves} × {task_s:.1f} s + {setup:.1f} s ≈ {hours:.2f} h. That needs {need:,.0f} GB/s of "
        f"aggregate storage throughput ({need / nodes:.2f} GB/s per node, read and about as much written); a "
        "bucket or network file system slower than that is the limit instead, and the estimate scales with "
        "its bandwidth. The driver's own work is small beside it: the manifest and the index "
        "(`finalize` over the markers the tasks return) are linear in shards (part 1).",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="1000,3000,10000,30000,100000")
    ap.add_argument("--shards", type=int, default=8, help="resample corpus: shards per source")
    ap.add_argument("--rows", type=int, default=50_000, help="resample corpus: rows per shard")
    ap.add_argument("--shard-size", default="16MB")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastmix_bench", "scale"))
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scale.md")
    )
    ap.add_argument("--note", default="")
    ap.add_argument("--child-scale", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_scale is not None:
        print(json.dumps(scale_child(args.child_scale, args.repeats)))
        return 0
    if args.quick:
        args.repeats, args.sizes, args.shards, args.rows = 1, "1000,4000", 2, 5_000
        args.out = os.path.join(args.workdir, "scale-quick.md")
    load_start = os.getloadavg()
    sizes = [int(x) for x in args.sizes.split(",")]
    scale_rows = run_scale(sizes, args.repeats)
    resample_lines, facts = run_resample(args)
    load_end = os.getloadavg()
    info = machine_info()
    report = [
        "# Scale benchmark: manifest, planner and resample beyond one machine",
        "",
        f"- date: {today()}",
        f"- command: `{command_line()}`",
        f"- revision: {git_revision()}",
        f"- machine: {info['cpu']}; {info['cores']}; {info['ram']} RAM; {info['os']}; {info['python']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions(["numpy", "pyarrow", "ray"]).items()),
        f"- load average (1/5/15 min) at start: {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}; "
        f"at end: {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} (2 cores shared with other jobs)",
        f"- repetitions: {args.repeats}; min / median / max shown as `median (min–max)`",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        "## Manifest and planner, 1k to 100k shards, 1T tokens",
        "",
        "Synthetic shard-index entries (4 sources; rows 5k–20k per shard, 600 tokens per row), budget "
        "`1T_tokens` (many epochs at small sizes: the counts are per shard, not per epoch). "
        "*build peak MB*: the largest Python + NumPy allocation total during one `build_manifest` call "
        "(tracemalloc). *worker setup*: `manifest_plan` + `manifest_sources`, what each resample worker "
        "process does once. *plan 64k chunk*: `plan.plan(N − 65536, N)`, one chunk at the end of the budget.",
        "",
        *scale_report(scale_rows),
        "",
        "## Resample: local engine vs Ray on this machine",
        "",
        *resample_lines,
        "",
        "## Estimate for a 100-node cluster",
        "",
        *estimate(facts, scale_rows),
        "",
    ]
    write_atomic(args.out, "\n".join(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
