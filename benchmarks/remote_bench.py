"""Remote streaming benchmark: fastmix_data over a loopback S3 server with injected latency, against
MosaicML Streaming (MDS with ``remote=``) and litdata (its optimized format), and against itself on
local disk; plus the index benchmark (100,000 shards: index time and memory, then planning the first
block from the index file).

Setup (all on 127.0.0.1, free ports): moto's S3 server in a child process; a proxy in another child
process that adds ``--latency`` seconds (default 20 ms) to every request; the same rows written as
Parquet (fastmix), MDS (``streaming.MDSWriter``) and litdata chunks (``litdata.optimize``), uploaded
with boto3. Every contender reads one epoch through the proxy with a 2-worker torch DataLoader and a
fresh local cache (cold); fastmix also runs again on its filled cache (warm) and from local disk.
Contenders run interleaved, in a seeded random order per repetition.

    python benchmarks/remote_bench.py                    # full run -> benchmarks/results/remote.md
    python benchmarks/remote_bench.py --skip-index --repeats 3 --quiet-timeout 3    # throughput only (~6 min)
    python benchmarks/remote_bench.py --quick            # smoke run (small data, 1 repetition, 2,000 index shards)

Throughput runs two data sets by default (``--configs 24000x12,96000x48``: 2,000-row shards; the
short one is the original configuration, where a cell lasts 0.2-1.3 s and start-up weighs as much as
throughput; the long one lasts several seconds per cell).

Reported per contender: samples/s over the epoch, time to first batch, bytes fetched through the
proxy (shard objects only; listings and index files apart), bytes the cache holds afterwards; and
where the epoch's CPU went: seconds of the training process, of its DataLoader workers (and of
those, their main threads), of the moto server and of the proxy, and the GET / HEAD requests for
shard objects (read outside the timing: a few /proc reads before and after, and a sample at most
every 50 ms while batches arrive). ``fastmix-cold-s3fs`` is a cold run with the workers' range GETs
through s3fs (``FASTMIX_DATA_S3_CLIENT=s3fs``), interleaved with the rest: the A/B of obstore's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import _common  # noqa: E402
from remote_servers import (  # noqa: E402
    http_process,
    moto_process,
    proxy_counters,
    proxy_process,
    s3_env,
    server_pid,
    upload_dir,
)

BUCKET = "bench"
# fastmix-cold-s3fs: cold with the workers' range GETs through s3fs (FASTMIX_DATA_S3_CLIENT=s3fs), the
# transport before obstore's: the A/B of that change, interleaved with the others
CONTENDERS = ("fastmix-cold", "fastmix-warm", "fastmix-local", "mosaic", "litdata", "fastmix-cold-s3fs")
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega data mixture stream shard cache prefetch weight token model").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 200))) for i in range(n)]


# ----------------------------------------------------------------------------------------- data
def write_copies(work: Path, docs: list[str], shards: int) -> None:
    """Parquet (fastmix), MDS (Mosaic) and litdata copies of ``docs`` under ``work``."""
    from shardgen import write_mds_source, write_parquet_source

    if (work / "data.json").exists() and json.loads((work / "data.json").read_text()) == [len(docs), shards]:
        return
    shutil.rmtree(work / "pq", ignore_errors=True)
    shutil.rmtree(work / "mds", ignore_errors=True)
    shutil.rmtree(work / "lit", ignore_errors=True)
    write_parquet_source(work / "pq", docs, shards=shards)
    write_mds_source(work / "mds", docs, shards=shards)
    import litdata

    per_chunk = -(-len(docs) // shards)
    # start_method="fork": optimize() otherwise switches the whole process to "spawn" (force=True),
    # and every later DataLoader would start its workers from scratch
    litdata.optimize(fn=_lit_item, inputs=docs, output_dir=str(work / "lit"), chunk_size=per_chunk, num_workers=1,
                     verbose=False, mode="overwrite", start_method="fork")
    (work / "data.json").write_text(json.dumps([len(docs), shards]))


def _lit_item(doc: str) -> dict:
    return {"text": doc}


# ----------------------------------------------------------------------------------------- contenders
_SERVERS: dict[str, int] = {}  # name -> pid of the server processes a cell's CPU is counted for (child_main)


def _cpu_marks() -> dict[str, float]:
    """CPU seconds so far of this (training) process, of it and its descendants (the DataLoader
    workers, live or reaped), and of each server process (/proc, a few reads: well under 1 ms)."""
    t = os.times()
    return {"train": t.user + t.system, "tree": _common._process_tree_cpu(),
            **{name: _common.process_cpu(pid) for name, pid in _SERVERS.items()}}  # fmt: skip


class _WorkerThreads:
    """Samples, at most every 50 ms while batches arrive, each worker's CPU and its main thread's
    (the thread that decodes and serves; the others download and prefetch): a worker that the
    loader joins at the end of the epoch can no longer be read, so the split is taken from the
    last sample (4 small /proc reads per sample, about 30 samples per second)."""

    def __init__(self):
        self.pids: list[int] = []
        self.last = 0.0
        self.seen: dict[int, tuple[float, float]] = {}  # pid -> (process CPU, main thread CPU)

    def tick(self) -> None:
        now = time.perf_counter()
        if now - self.last < 0.05:
            return
        self.last = now
        self.pids = self.pids or list(_common.live_descendants())
        for pid in self.pids:
            cpu, main = _common.process_cpu(pid), _common.process_cpu(f"{pid}/task/{pid}")
            if cpu == cpu and main == main:  # not NaN: still alive
                self.seen[pid] = (cpu, main)

    def main_share(self) -> float:
        total = sum(c for c, _ in self.seen.values())
        return sum(m for _, m in self.seen.values()) / total if total else float("nan")


def _cpu_split(before: dict[str, float], after: dict[str, float], share: float) -> dict[str, float]:
    """CPU seconds of an epoch per process: training process, workers (and of them, their main
    threads, by ``share``: see :class:`_WorkerThreads`), each server."""
    d = {k: after[k] - before[k] for k in before}
    workers = d.pop("tree") - d["train"]
    return {"train": d.pop("train"), "workers": workers, "workers_main": workers * share, **d}


def _epoch(loader, samples: int, count) -> tuple[float, float, int, dict]:
    """(seconds to the first batch, seconds for the epoch, samples seen, CPU seconds per process
    over the epoch (:func:`_cpu_split`; read before the first and after the last batch, outside
    the timing))."""
    marks, threads = _cpu_marks(), _WorkerThreads()
    t0 = time.perf_counter()
    first = None
    seen = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t0
        seen += count(batch)
        threads.tick()
        if seen >= samples:
            break
    total = time.perf_counter() - t0
    return first or float("nan"), total, seen, _cpu_split(marks, _cpu_marks(), threads.main_share())


def run_fastmix(spec: dict, samples: int, workers: int, seed: int):
    from fastmix_data.stream.mixture import MixtureStream

    stream = MixtureStream({"pq": spec}, {"pq": 1.0}, batch_size=32, seed=seed)
    try:
        return _epoch(stream.loader(num_workers=workers), samples, lambda b: len(b["text"]))
    finally:
        stream.close()


def run_mosaic(remote: str, local: str, samples: int, workers: int, seed: int):
    import torch

    from fastmix_data.sources.mds_compat import import_streaming

    streaming = import_streaming()
    streaming.base.util.clean_stale_shared_memory()
    ds = streaming.StreamingDataset(remote=remote, local=local, shuffle=True, shuffle_seed=seed, batch_size=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=workers)
    return _epoch(loader, samples, lambda b: len(b["text"]))


def run_litdata(remote: str, cache: str, endpoint: str, samples: int, workers: int, seed: int):
    import litdata
    from litdata.streaming import downloader

    # The loopback server speaks plain http; litdata's obstore path refuses http unless told
    downloader._OBSTORE_CLIENT_OPTIONS = {**(downloader._OBSTORE_CLIENT_OPTIONS or {}), "allow_http": True}

    ds = litdata.StreamingDataset(remote, cache_dir=cache, shuffle=True, seed=seed,
                                  storage_options={"endpoint_url": endpoint})
    loader = litdata.StreamingDataLoader(ds, batch_size=32, num_workers=workers)
    return _epoch(loader, samples, lambda b: len(b["text"]))


def run_child(name: str, **kw) -> tuple[float, float, int, dict] | None:
    """Run contender ``name`` in a child process (its epoch is timed there, after its imports)."""
    kw["spec"] = {k: str(v) for k, v in kw["spec"].items()}
    env = {**os.environ, **({"FASTMIX_DATA_S3_CLIENT": "s3fs"} if name == "fastmix-cold-s3fs" else {})}
    proc = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(kw)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:  # recorded and reported; the other runs go on
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        print(f"{name} failed: {lines[-1] if lines else proc.returncode}", flush=True)
        return None
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def child_main(name: str, kw: dict) -> None:
    samples, workers, seed = kw["samples"], kw["workers"], kw["seed"]
    _SERVERS.update(kw.get("servers", {}))
    if os.environ.get("REMOTE_BENCH_TRACE") and name.startswith("fastmix"):  # remote_timeline's events
        import remote_timeline

        remote_timeline.install(f"{os.environ['REMOTE_BENCH_TRACE']}-{name}.jsonl")
    if name.startswith("fastmix"):
        out = run_fastmix(kw["spec"], samples, workers, seed)
    elif name == "mosaic":
        out = run_mosaic(f"s3://{BUCKET}/{kw['tag']}/mds", kw["local"], samples, workers, seed)
    else:
        out = run_litdata(f"s3://{BUCKET}/{kw['tag']}/lit", kw["local"], kw["proxy"], samples, workers, seed)
    print(json.dumps(list(out)))


def _is_shard(path: str) -> bool:
    """Whether a request path is a shard object's (not a listing, bucket or index file)."""
    return "/indexes/" not in path and path.count("/") >= 2


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def throughput(args, work: Path, endpoint: str, samples: int, shards: int) -> dict:
    """One configuration (``samples`` rows in ``shards`` shards): every contender, interleaved."""
    from fastmix_data.sources import index_source, open_source

    env = s3_env(endpoint)
    os.environ.update(env)
    tag = f"{samples}x{shards}"
    for name in ("pq", "mds", "lit"):
        upload_dir(endpoint, work / name, BUCKET, f"{tag}/{name}")
    index_url = f"s3://{BUCKET}/indexes/{tag}.json"
    index_source("pq", f"s3://{BUCKET}/{tag}/pq", out=index_url, cache_dir=work / "index-cache")
    plan_bytes = sum(open_source("pq", index_file=index_url, cache_dir=work / "tmp-cache").fetch_bytes(i)
                     for i in range(shards))
    shutil.rmtree(work / "tmp-cache", ignore_errors=True)
    results: dict[str, list[dict]] = {}
    failures: dict[str, list[int]] = {}
    with proxy_process(endpoint, args.latency) as proxy:
        servers = {"moto": server_pid(endpoint), "proxy": server_pid(proxy)}
        os.environ["AWS_ENDPOINT_URL"] = os.environ["S3_ENDPOINT_URL"] = proxy
        fm_cache = work / "fm-cache"
        names = [n for n in CONTENDERS if n in args.contenders]
        for rep in range(args.repeats):
            order = names[:]
            random.Random(rep).shuffle(order)
            if order.index("fastmix-warm") < order.index("fastmix-cold"):  # warm needs a filled cache
                i, j = order.index("fastmix-warm"), order.index("fastmix-cold")
                order[i], order[j] = order[j], order[i]
            for name in order:
                local = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
                if name.startswith("fastmix-cold"):
                    shutil.rmtree(fm_cache / "shards", ignore_errors=True)
                spec = {"path": f"s3://{BUCKET}/{tag}/pq", "index_file": index_url, "cache_dir": fm_cache}
                proxy_counters(proxy, reset=True)
                _common.wait_for_quiet(threshold=args.max_busy, timeout=args.quiet_timeout)
                if name == "fastmix-local":
                    spec = {"path": str(work / "pq")}
                # each run in a fresh process: peers keep process-wide state between datasets
                # (Mosaic's shared memory, litdata's start method, fsspec's clients)
                outcome = run_child(name, spec=spec, local=str(local), proxy=proxy, samples=samples,
                                    workers=args.workers, seed=rep, tag=tag, servers=servers)
                if outcome is None:
                    failures.setdefault(name, []).append(rep)
                    shutil.rmtree(local, ignore_errors=True)
                    continue
                first, total, seen, cpu = outcome
                if name.startswith("fastmix"):
                    cache = du(fm_cache / "shards") if name != "fastmix-local" else 0
                else:
                    cache = du(local)
                counters = proxy_counters(proxy)
                fetched = sum(n for p, n in counters["bytes_by_path"].items() if _is_shard(p))
                methods = {m: sum(n for call, n in counters["calls"].items()
                                  if call.startswith(m + " ") and _is_shard(call.partition(" ")[2]))
                           for m in ("GET", "HEAD")}  # fmt: skip
                results.setdefault(name, []).append({"first": first, "total": total, "samples": seen,
                                                     "fetched": fetched, "cache": cache, "rep": rep, "cpu": cpu,
                                                     "get": methods.get("GET", 0), "head": methods.get("HEAD", 0)})
                print(f"{tag} rep {rep} {name:14s} {seen / total:9.0f} samples/s  first batch {first:6.2f} s  "
                      f"fetched {fetched:,} B  cache {cache:,} B  GET/HEAD {methods.get('GET', 0)}/"
                      f"{methods.get('HEAD', 0)}  CPU s " + " ".join(f"{k} {v:.2f}" for k, v in cpu.items()), flush=True)
                shutil.rmtree(local, ignore_errors=True)
    os.environ["AWS_ENDPOINT_URL"] = os.environ["S3_ENDPOINT_URL"] = endpoint
    return {"results": results, "plan_bytes": plan_bytes, "failures": failures, "samples": samples, "shards": shards,
            "load": [os.getloadavg()[0]]}


# ----------------------------------------------------------------------------------------- index
_INDEX_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
mode, url, out, cache = sys.argv[2:6]
from fastmix_data.sources import index_source, open_source
from fastmix_data.stream.mixture import MixtureStream
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "index":
    doc = index_source("idx", url, out=out, cache_dir=cache)
    result = {"shards": len(doc["shards"])}
else:
    stream = MixtureStream({"idx": {"path": url, "index_file": out, "cache_dir": cache}}, {"idx": 1.0},
                           batch_size=32, seed=0)
    opened = time.perf_counter() - t
    block = stream._plan_block(list(range(128)))
    result = {"shards": len(stream.sources[0].shards), "open_s": opened, "planned_items": len(block.position)}
result["seconds"] = time.perf_counter() - t
result["rss_base_mb"] = base / 1024
result["rss_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def index_bench(args, work: Path) -> dict:
    """Index ``--index-shards`` tiny Parquet shards served over http on loopback (a child process;
    an HTTP listing has no sizes, so every shard costs a HEAD and a GET), write the index file into
    the served directory, then load it over http and plan the first block (each step in a fresh
    process, for its peak memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = work / "index-served"
    shards = root / "shards"
    n = args.index_shards
    t = time.perf_counter()
    marker = root / f".made-{n}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        for i in range(n):
            folder = shards / f"{i // 1000:03d}"
            if i % 1000 == 0:
                folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": [f"shard {i} row {j}" for j in range(4)]}), folder / f"part-{i:06d}.parquet")
        marker.touch()
    make_s = time.perf_counter() - t
    cache = str(work / "index-bench-cache")
    shutil.rmtree(cache, ignore_errors=True)
    steps: dict = {"make_s": make_s}
    with http_process(root) as base:
        url, out = f"{base}shards/", str(root / "index.json")
        for mode, where in (("index", out), ("plan", f"{base}index.json")):
            proc = subprocess.run([sys.executable, "-c", _INDEX_CHILD, str(HERE.parent), mode, url, where, cache],
                                  capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            steps[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(mode, steps[mode], flush=True)
    steps["index_file_bytes"] = os.path.getsize(out)
    return steps


# ----------------------------------------------------------------------------------------- report
def _ratio(a: list[float], b: list[float]) -> _common.Summary:
    return _common.Summary.of(x / y for x, y in zip(a, b))


def _ratios(tp: dict) -> list[str]:
    """The paired ratio lines of one configuration (all five contenders ran): each ratio over the
    repetitions where both of its sides ran (a failed run removes only its own pairs)."""
    res = tp["results"]
    rate = {n: {r["rep"]: r["samples"] / r["total"] for r in runs} for n, runs in res.items()}
    first = {n: {r["rep"]: r["first"] for r in runs} for n, runs in res.items()}
    peers = [p for p in ("mosaic", "litdata") if p in rate]

    def paired(a: dict, b: dict) -> str:
        return _common.Summary.of(a[i] / b[i] for i in sorted(set(a) & set(b))).fmt(digits=2)

    best = {i: max(rate[p][i] for p in peers if i in rate[p]) for i in rate["fastmix-cold"]
            if any(i in rate[p] for p in peers)}  # fmt: skip
    best_first = {i: min(first[p][i] for p in peers if i in first[p]) for i in best}
    lines = ["", "Paired ratios (per repetition where both ran, then min / median / max):", ""]
    lines += [f"- fastmix cold / {peer}: {paired(rate['fastmix-cold'], rate[peer])}" for peer in peers]
    lines.append(f"- fastmix cold / fastest peer (target >= 1): {paired(rate['fastmix-cold'], best)}")
    if "fastmix-cold-s3fs" in rate:
        lines.append(f"- fastmix cold with s3fs GETs / fastest peer: {paired(rate['fastmix-cold-s3fs'], best)}")
        lines.append(f"- fastmix cold (obstore GETs) / fastmix cold with s3fs GETs: "
                     f"{paired(rate['fastmix-cold'], rate['fastmix-cold-s3fs'])}")
    lines.append(f"- fastmix warm / fastmix local disk (target >= 0.9): {paired(rate['fastmix-warm'], rate['fastmix-local'])}")
    fetched = [r["fetched"] for r in res["fastmix-cold"]]
    lines.append(f"- fastmix cold bytes fetched / plan bytes (target <= 1): "
                 f"{_common.Summary.of(f / tp['plan_bytes'] for f in fetched).fmt(digits=3)}")
    lines.append(f"- time to first batch, fastmix cold / fastest peer's (lower is better): "
                 f"{paired(first['fastmix-cold'], best_first)}")
    lines.append("")
    return lines


def _cpu_table(res: dict[str, list[dict]]) -> list[str]:
    """Where the CPU of each contender's epoch went: seconds per process (medians over the
    repetitions, each column on its own), their sum over the epoch's wall time (cores kept busy, of
    2), and the requests for shard objects through the proxy."""
    med = lambda xs: _common.Summary.of(xs).median  # noqa: E731
    rows = []
    for name, runs in res.items():
        cpu = [r["cpu"] for r in runs]
        total = [sum(v for k, v in c.items() if k != "workers_main") for c in cpu]
        rows.append([name, f"{med(r['total'] for r in runs):.2f}",
                     *(f"{med(c[k] for c in cpu):.2f}" for k in ("train", "workers", "workers_main", "moto", "proxy")),
                     f"{med(total):.2f}", f"{med(t / r['total'] for t, r in zip(total, runs)):.2f}",
                     f"{med(r['get'] for r in runs):.0f} / {med(r['head'] for r in runs):.0f}"])
    return ["", "CPU seconds of the epoch per process (median over the repetitions, each column on its own; "
            "from /proc and the reaped workers' rusage, before the first and after the last batch; *main threads*: "
            "the workers' CPU times their main threads' share in the last sample taken while they lived (a worker's "
            "main thread decodes and serves, its other threads download and prefetch)), cores kept busy "
            "(all four over the epoch's wall time; the machine has 2), and requests for shard objects "
            "through the proxy:", "",
            _common.markdown_table(["contender", "epoch (s)", "training", "workers", "of which main threads",
                                    "moto server", "proxy",
                                    "all", "cores busy", "GET / HEAD"], rows)]


def report(args, tps: list[dict], idx: dict | None, load: tuple[str, str], revision: str) -> str:
    lines = [
        "# Remote streaming: fastmix_data vs MosaicML Streaming and litdata over a loopback S3",
        "",
        f"Date: {_common.today()}  ",
        f"Command: `{_common.command_line()}`  ",
        f"Revision: {revision}  ",
        f"Machine: {json.dumps(_common.machine_info())}  ",
        f"Versions: {json.dumps(_common.versions(['mosaicml-streaming', 'litdata', 's3fs', 'moto', 'pyarrow', 'torch']))}  ",
        f"Load (uptime) at start: `{load[0]}`; at end: `{load[1]}`",
        "",
    ]
    for tp in tps:
        res = tp["results"]
        lines += [
            f"## Throughput: one epoch of {tp['samples']:,} samples in {tp['shards']} shards, {args.workers} DataLoader "
            f"workers, batch 32, {args.latency * 1000:.0f} ms added to every request, {args.repeats} repetitions",
            "",
            f"Load (1-minute average) after this part: {tp['load'][0]:.2f}.",
            "",
            "median (min–max) over the repetitions. *fetched*: bytes of shard objects through the proxy; "
            f"the plan needs {tp['plan_bytes']:,} B of fastmix's Parquet (footers and text column chunks of "
            "every shard, once).",
            "",
        ]
        rows = []
        for name, runs in res.items():
            rows.append([
                name,
                _common.Summary.of(r["samples"] / r["total"] for r in runs).fmt(),
                _common.Summary.of(r["first"] for r in runs).fmt(digits=2),
                _common.Summary.of(r["fetched"] for r in runs).fmt(),
                _common.Summary.of(r["cache"] for r in runs).fmt(),
            ])
        lines.append(_common.markdown_table(["contender", "samples/s", "first batch (s)", "fetched (B)",
                                             "cache on disk (B)"], rows))
        lines += _cpu_table(res)
        for name, reps in tp["failures"].items():
            lines.append(f"\n{name} failed in repetition(s) {reps} (error in the log); its figures are over the others.")
        lines += _ratios(tp) if all(n in res for n in CONTENDERS[:5]) else ["", "(a subset of the contenders ran: no paired ratios)", ""]
    if idx is not None:
        lines += [
            f"## Index: {args.index_shards:,} Parquet shards (4 rows each) over http on loopback (no added latency)",
            "",
            f"The shards ({idx['make_s']:.0f} s to write, not part of the figures) are served by `http.server` "
            "(with Range and ETag) in a child process; an HTTP listing has no sizes, so each shard costs a HEAD "
            "and one GET (the whole tiny file: footer and text column). Index file: "
            f"{idx['index_file_bytes']:,} bytes. Each step ran in a fresh process; RSS is its peak (`ru_maxrss`) "
            "and the baseline after imports.",
            "",
            _common.markdown_table(
                ["step", "seconds", "peak RSS (MB)", "RSS after imports (MB)"],
                [
                    ["`index_source` (list, HEAD and read each shard, write the index file)",
                     f"{idx['index']['seconds']:.1f}", f"{idx['index']['rss_peak_mb']:.0f}",
                     f"{idx['index']['rss_base_mb']:.0f}"],
                    ["load the index file + open the stream (no listing)", f"{idx['plan']['open_s']:.1f}", "", ""],
                    ["... + plan the first block (128 batches of 32)", f"{idx['plan']['seconds']:.1f}",
                     f"{idx['plan']['rss_peak_mb']:.0f}", f"{idx['plan']['rss_base_mb']:.0f}"],
                ],
            ),
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], json.loads(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="24000x12,96000x48",
                    help="data sets to read, ROWSxSHARDS each (one epoch of each is read; 2,000-row shards by default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help="comma-separated subset to run (the ratios need the first five)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to every request")
    ap.add_argument("--index-shards", type=int, default=100_000)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    ap.add_argument("--max-busy", type=float, default=0.5, help="wait before each run until others use <= this CPU share")
    ap.add_argument("--quiet-timeout", type=float, default=20.0, help="stop waiting for a quiet machine after this (s)")
    ap.add_argument("--quick", action="store_true", help="4,000 samples, 1 repetition, 2,000 index shards")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastmix_bench", "remote"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.configs, args.repeats, args.index_shards = "4000x12", 1, 2000
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",") if c]
    out = args.out or (str(HERE / "results" / "remote.md") if not args.quick else os.path.join(args.workdir, "remote-quick.md"))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FASTMIX_DATA_CACHE"] = str(work / "index-cache")
    os.environ.setdefault("TQDM_DISABLE", "1")
    revision = _common.git_revision(str(HERE.parent))
    load_start = os.getloadavg()
    tps, idx = [], None
    with moto_process() as endpoint:
        for samples, shards in configs if not args.skip_throughput else ():
            data = work / f"{samples}x{shards}"
            write_copies(data, make_docs(samples), shards)
            tps.append(throughput(args, data, endpoint, samples, shards))
    if not args.skip_index:
        idx = index_bench(args, work)
    load = (f"{load_start[0]:.2f}, {load_start[1]:.2f}, {load_start[2]:.2f}",
            "{:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg()))
    text = report(args, tps, idx, load, revision)
    marker = "<!-- Everything below this line is hand-written"
    if os.path.exists(out):
        old = Path(out).read_text()
        if marker in old:
            text += "\n" + old[old.index(marker):]
    _common.write_atomic(out, text + "\n")
    print(f"wrote {out}; peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
