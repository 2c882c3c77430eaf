"""Where a remote epoch's wall time goes, per DataLoader worker: a timeline of one cold, one warm and
one local-disk epoch of remote_bench's data (same shards, same loopback S3 and latency proxy, same
2-worker loader), each in a fresh process.

The stream's functions are wrapped (in this benchmark only; the library has no tracing) so that
every process appends timestamped events to a trace file: the worker's first batch request, the
S3 client's start (``S3FileSystem.set_session``), each ranged GET round (submit, complete, bytes),
each cache wait (`ShardCache.get_many`, main thread = the stream waiting, other threads = prefetch),
each shard decode (Parquet read of the fetched bytes), planning, and each batch sent to the ring.

    python benchmarks/remote_timeline.py                  # -> prints the per-worker summary and timelines
    python benchmarks/remote_timeline.py --samples 96000 --shards 48
    TIMELINE_CODE=/tmp/main python benchmarks/remote_timeline.py   # the code of another tree (git archive)

It reuses ``remote_bench.py``'s data of the same size (``--workdir``, same default), or writes it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

if os.environ.get("TIMELINE_CODE"):  # A/B: import fastmix_data from another checkout's tree instead
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__name__.lower()
                        and "editable" not in getattr(f, "__module__", "")]
    sys.path.insert(0, os.environ["TIMELINE_CODE"])

_TRACE: dict = {"fd": None}


def _event(kind: str, t0: float, t1: float, **extra) -> None:
    rec = {"pid": os.getpid(), "th": threading.current_thread().name, "k": kind, "t0": t0, "t1": t1, **extra}
    os.write(_TRACE["fd"], (json.dumps(rec) + "\n").encode())


def _wrap(owner, name: str, kind: str, info=None) -> None:
    inner = getattr(owner, name)

    def traced(*args, **kw):
        t0 = time.time()
        try:
            return inner(*args, **kw)
        finally:
            _event(kind, t0, time.time(), **(info(*args, **kw) if info else {}))

    setattr(owner, name, traced)


def _wrap_gen(owner, name: str) -> None:
    inner = getattr(owner, name)

    def traced(self, *args, **kw):
        _event("iter-start", time.time(), time.time())
        prof = None
        if os.environ.get("TIMELINE_PROFILE"):
            import cProfile

            prof = cProfile.Profile(time.process_time)  # CPU time of this worker (all its threads)
            prof.enable()
        try:
            yield from inner(self, *args, **kw)
        finally:
            if prof is not None:
                prof.disable()
                prof.dump_stats(f"{os.environ['TIMELINE_PROFILE']}.{os.getpid()}")

    setattr(owner, name, traced)


def install(trace_path: str) -> None:
    """Wrap the functions of interest; every process (forked workers too) appends to ``trace_path``."""
    import s3fs

    from fastmix_data.sources.parquet import ParquetReader
    from fastmix_data.storage.cache import ShardCache
    from fastmix_data.storage.fs import RemoteFS
    from fastmix_data.stream import items as items_mod
    from fastmix_data.stream.batch_ring import RingWriter
    from fastmix_data.stream.mixture import MixtureStream

    _TRACE["fd"] = os.open(trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    short = lambda url: url.rsplit("/", 1)[-1]  # noqa: E731
    s3fs.S3FileSystem.set_session = _session_wrapper(s3fs.S3FileSystem.set_session)
    _wrap(RemoteFS, "read_ranges_identified", "GET",
          lambda self, url, ranges: {"url": short(url), "n": len(ranges), "bytes": sum(int(b) for _, b in ranges)})
    _wrap(RemoteFS, "read_ranges", "GET", lambda self, url, ranges: {"url": short(url), "n": len(ranges)})
    _wrap(RemoteFS, "stat", "HEAD", lambda self, url: {"url": short(url)})
    _wrap(ShardCache, "get_many", "cache", lambda self, entries, fill, **kw: {"n": len(entries)})
    _wrap(ParquetReader, "_read_remote", "read", lambda self, url, *a: {"url": short(url)})
    _wrap(ParquetReader, "read_row_groups", "read", lambda self, path, *a: {"url": short(path)})
    _wrap(items_mod.ItemSource, "_read", "unit", lambda self, shard, groups: {"shard": shard})
    _wrap(MixtureStream, "_plan_block", "plan", lambda self, idx: {"batches": len(idx)})
    _wrap(MixtureStream, "_prefetch", "prefetch-hook")
    _wrap(MixtureStream, "_materialise", "build", lambda self, sl, idx: {"batches": len(idx)})
    _wrap(RingWriter, "send", "send")
    _wrap_gen(MixtureStream, "__iter__")


def _session_wrapper(orig):
    async def set_session(self, *a, **kw):
        fresh = getattr(self, "_s3", None) is None
        t0 = time.time()
        try:
            return await orig(self, *a, **kw)
        finally:
            if fresh:
                _event("client", t0, time.time())

    return set_session


def child(kind: str, spec: dict, samples: int, workers: int, trace: str, seed: int) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(process)d %(threadName)s %(relativeCreated)d %(message)s")
    logging.getLogger("fastmix_data.storage").setLevel(logging.INFO)  # retries
    install(trace)
    from fastmix_data.stream.mixture import MixtureStream

    t_open = time.time()
    stream = MixtureStream({"pq": spec}, {"pq": 1.0}, batch_size=32, seed=seed)
    t0 = time.time()
    _event("open", t_open, t0)
    seen = 0
    first = None
    loader = stream.loader(num_workers=workers)
    for batch in loader:
        if first is None:
            first = time.time()
            _event("first-batch", t0, first)
        seen += len(batch["text"])
        if seen >= samples:
            break
    _event("epoch", t0, time.time(), samples=seen)
    stream.close()


def summarise(trace: str) -> str:
    events = [json.loads(line) for line in Path(trace).read_text().splitlines()]
    start = next(e["t0"] for e in events if e["k"] == "epoch")
    main_pid = next(e["pid"] for e in events if e["k"] == "epoch")
    out = []
    epoch = next(e for e in events if e["k"] == "epoch")
    first = next(e for e in events if e["k"] == "first-batch")
    out.append(f"epoch {epoch['t1'] - start:.3f} s, first batch {first['t1'] - start:.3f} s, "
               f"{epoch['samples']} samples")
    by_pid = collections.defaultdict(list)
    for e in events:
        by_pid[e["pid"]].append(e)
    for pid, evs in sorted(by_pid.items(), key=lambda kv: min(e["t0"] for e in kv[1])):
        if pid == main_pid:
            continue
        evs.sort(key=lambda e: e["t0"])
        last = max(e["t1"] for e in evs)
        totals = collections.defaultdict(lambda: [0, 0.0])
        for e in evs:
            key = e["k"] + ("" if e["th"] == "MainThread" else "@bg")
            totals[key][0] += 1
            totals[key][1] += e["t1"] - e["t0"]
        out.append(f"  worker pid {pid}: first event +{evs[0]['t0'] - start:.3f} s, last +{last - start:.3f} s")
        out.append("    totals: " + ", ".join(f"{k} {n}x {s:.3f}s" for k, (n, s) in sorted(totals.items())))
        for e in evs:
            if e["k"] in ("send",):
                continue
            extra = {k: v for k, v in e.items() if k not in ("pid", "th", "k", "t0", "t1")}
            out.append(f"    {e['t0'] - start:7.3f} .. {e['t1'] - start:7.3f}  {e['k']:13s} "
                       f"{'main' if e['th'] == 'MainThread' else e['th'][-3:]:5s} {extra if extra else ''}")
        sends = [e for e in evs if e["k"] == "send"]
        if sends:
            out.append(f"    sends: {len(sends)} from +{sends[0]['t0'] - start:.3f} to +{sends[-1]['t1'] - start:.3f}")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kw = json.loads(sys.argv[2])
        child(**kw)
        return
    from remote_bench import BUCKET, make_docs, write_copies
    from remote_servers import moto_process, proxy_process, s3_env, upload_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=24_000)
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastmix_bench", "remote"))
    ap.add_argument("--only", default="cold,warm,local")
    args = ap.parse_args()
    work = Path(args.workdir) / f"{args.samples}x{args.shards}"  # remote_bench's data of this size
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FASTMIX_DATA_CACHE"] = str(work / "index-cache")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from fastmix_data.sources import index_source

    with moto_process() as endpoint:
        write_copies(work, make_docs(args.samples), args.shards)
        os.environ.update(s3_env(endpoint))
        upload_dir(endpoint, work / "pq", BUCKET, "pq")
        index_url = f"s3://{BUCKET}/indexes/pq.json"
        index_source("pq", f"s3://{BUCKET}/pq", out=index_url, cache_dir=work / "index-cache")
        with proxy_process(endpoint, args.latency) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = os.environ["S3_ENDPOINT_URL"] = proxy
            cache = work / "timeline-cache"
            shutil.rmtree(cache, ignore_errors=True)
            for kind in args.only.split(","):
                spec = {"path": f"s3://{BUCKET}/pq", "index_file": index_url, "cache_dir": str(cache)}
                if kind == "local":
                    spec = {"path": str(work / "pq")}
                trace = str(work / f"trace-{kind}.jsonl")
                Path(trace).unlink(missing_ok=True)
                kw = {"kind": kind, "spec": spec, "samples": args.samples, "workers": args.workers,
                      "trace": trace, "seed": 0}
                subprocess.run([sys.executable, __file__, "--child", json.dumps(kw)], check=True)
                print(f"== {kind} (uptime {os.getloadavg()[0]:.2f})")
                print(summarise(trace), flush=True)


if __name__ == "__main__":
    main()
