"""Where the partition benchmark's cell spends its start-up: per process, CPU until its first batch.

Not a timing benchmark (no lock needed; run it niced): CPU stamps (``time.process_time``, minor
faults) and, with ``--cprofile DIR``, a cProfile (CPU time) of each process from its start to its first batch.
One cell of partition_bench (``--mode text``: batches of 32 texts; ``tokens``: packed sequences of
2,048 tokens, batches of 8), ``--workers`` W (0: in-process), ``--n`` items, in this process, with
whatever ``fastmix_data`` is first on the path (``PYTHONPATH=/work/main`` for main).

The library's functions are wrapped here, before the workers fork (they inherit the wrappers):

* training process: CPU at the stream's construction, after ``iter()`` (workers forked, rings
  made), at its first batch and at the n-th item;
* each worker: CPU at the start of ``MixtureStream.__iter__`` (its DataLoader start-up since the
  fork), at its first built batch, and at its end; its CPU inside ``ItemSource._read`` (Parquet
  decode) and ``ItemSource._packed`` (packing of a piece, its reads included) until the first
  batch and in all; rows and tokens decoded, and items built and served (in a batch the training
  process took: index below the n-th item's batch).

Prints one JSON object (also written to ``--out``)::

    python benchmarks/startup_profile.py --mode tokens --workers 4 --n 200000 --out /tmp/p.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

if "--no-thp" in sys.argv:  # before pyarrow is imported: the in-process cell without huge pages
    _common.disable_huge_pages()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import partition_bench as pb  # noqa: E402

COUNTS = ("read_cpu", "pack_cpu", "rows_decoded", "tokens_decoded", "groups_decoded", "pieces_packed")
STATE: dict = {"consumed": 1 << 62, "profile_dir": None, "out_dir": None}


def _stamp() -> dict:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu": time.process_time(), "minflt": use.ru_minflt, "maxrss_mb": use.ru_maxrss / 1024}


def _fresh() -> dict:
    return {k: 0 for k in COUNTS} | {"items_built": 0, "items_served": 0}


def _decoded_tokens(data) -> int:
    from fastmix_data.stream.items import row_tokens

    return int((data.row_tokens if data.row_tokens is not None else row_tokens(data)).sum())


def install() -> None:
    """Wrap the library's reads, packing, worker entry and ring writes (see the module's doc)."""
    from fastmix_data.stream import direct_ring, items, mixture

    read, packed = items.ItemSource._read, items.ItemSource._packed
    it, write_all = mixture.MixtureStream.__iter__, direct_ring.write_all
    counts = STATE["counts"] = _fresh()

    def timed_read(self, *args, **kw):
        t = time.process_time()
        out = read(self, *args, **kw)
        counts["read_cpu"] += time.process_time() - t
        counts["groups_decoded"] += len(out)
        counts["rows_decoded"] += sum(d.rows for d in out)
        counts["tokens_decoded"] += sum(_decoded_tokens(d) for d in out)
        return out

    def timed_packed(self, epoch, shard, piece):
        hit = ("packed", epoch, shard, piece) in self._cache
        t = time.process_time()
        out = packed(self, epoch, shard, piece)
        if not hit:
            counts["pack_cpu"] += time.process_time() - t
            counts["pieces_packed"] += 1
        return out

    def entered(self):
        import torch

        if torch.utils.data.get_worker_info() is None:  # the training process (in-process cell)
            yield from it(self)
            return
        STATE["worker"] = {"entry": _stamp(), "pid": os.getpid(), "before_fork": dict(counts)}
        counts.update(_fresh())  # this worker's own, from here
        if STATE["profile_dir"]:
            STATE["profiler"] = cProfile.Profile(time.process_time)
            STATE["profiler"].enable()
        yield from it(self)

    def watched(batches, path, fifo):
        return write_all(_first_and_counts(batches), path, fifo)

    items.ItemSource._read, items.ItemSource._packed = timed_read, timed_packed
    mixture.MixtureStream.__iter__, direct_ring.write_all = entered, watched


def _first_and_counts(batches):
    """The worker's batches, its first one stamped (profile stopped), items counted, and its
    figures written to ``out_dir`` at its end."""
    me, counts = STATE["worker"], STATE["counts"]
    try:
        for batch in batches:
            n = batch["_meta"].shape[1]
            counts["items_built"] += n
            counts["items_served"] += n if batch["batch_index"] < STATE["consumed"] else 0
            if "first" not in me:
                me["first"], me["first_counts"] = _stamp(), dict(counts)
                _stop_profile(f"worker-{me['pid']}")
            yield batch
    finally:
        me["end"], me["counts"] = _stamp(), dict(counts)
        _common.write_atomic(os.path.join(STATE["out_dir"], f"worker-{me['pid']}.json"), json.dumps(me))


def _stop_profile(name: str) -> None:
    prof = STATE.pop("profiler", None)
    if prof is not None:
        prof.disable()
        prof.dump_stats(os.path.join(STATE["profile_dir"], f"{name}.prof"))


def _worker_files() -> list[str]:
    """The workers' figure files written so far (whole: each is renamed into place; not the
    temporary files of one being written)."""
    return sorted(n for n in os.listdir(STATE["out_dir"]) if n.startswith("worker-") and n.endswith(".json"))


def run(args, data: dict | None = None) -> dict:
    """The cell, stamped; the workers' figures collected from ``out_dir``. ``data``: partition_bench's
    sources (``{"text": ..., "tokens": ...}``; default: its prepared benchmark corpus in ``--workdir``)."""
    batch = pb.BATCH if args.mode == "text" else pb.PACK_BATCH
    STATE["consumed"] = -(-args.n // batch)
    data = data or pb.prepare(args.workdir, 22, 3)
    stamps = {"start": _stamp()}
    if args.cprofile:
        STATE["profiler"] = cProfile.Profile(time.process_time)
        STATE["profiler"].enable()
    stream = pb.text_stream(data, args.seed) if args.mode == "text" else pb.token_stream(data, args.seed)
    stamps["opened"] = _stamp()
    it = iter(stream.loader(num_workers=args.workers, prefetch_factor=2) if args.workers else stream)
    stamps["iter"] = _stamp()
    served = 0
    for b in it:
        served += len(b["text"] if args.mode == "text" else b["tokens"])
        if "first" not in stamps:
            stamps["first"] = _stamp()
            _stop_profile("training")
        if served >= args.n:
            break
    stamps["nth"] = _stamp()
    own = dict(STATE["counts"])  # the training process's own reads (in-process, or built here)
    del it, b
    deadline = time.monotonic() + 10  # the workers write their figures at their end
    while len(_worker_files()) < args.workers and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = []
    for name in _worker_files():
        with open(os.path.join(STATE["out_dir"], name)) as f:
            workers.append(json.load(f))
    return {"mode": args.mode, "workers": args.workers, "n": args.n, "seed": args.seed,
            "code": os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["fastmix_data"].__file__))),
            "training": stamps, "training_counts": own, "worker_figures": workers}  # fmt: skip


def main(argv=None, data: dict | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("text", "tokens"), default="text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=None, help="items (default 300,000 texts or 200,000 sequences)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/perf-bench")
    ap.add_argument("--cprofile", default=None, help="profiles (until the first batch) here")
    ap.add_argument("--no-thp", action="store_true", help="transparent huge pages off in this process")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    args.n = args.n or (300_000 if args.mode == "text" else 200_000)
    os.environ.setdefault("BENCH_CACHE", os.path.join(args.workdir, "index-cache"))
    STATE["out_dir"] = args.out + ".workers"
    os.makedirs(STATE["out_dir"], exist_ok=True)
    for old in os.listdir(STATE["out_dir"]):
        os.unlink(os.path.join(STATE["out_dir"], old))
    STATE["profile_dir"] = args.cprofile
    if args.cprofile:
        os.makedirs(args.cprofile, exist_ok=True)
    install()
    out = run(args, data)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
