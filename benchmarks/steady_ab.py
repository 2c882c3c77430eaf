"""Paired, interleaved A/B of the partition benchmark's steady-state cell between two checkouts.

Each pair runs `partition_bench.measure` (``--mode text``: the ``fastmix`` contender, batches of 32
texts; ``tokens``: packed sequences of 2,048 tokens from the token shards, batches of 8, int64 tensors;
``tokens-narrow``: the same with ``narrow_tokens=True``; ``--n`` samples or sequences, ``--workers``
workers) once with checkout A's ``fastmix_data`` first on the path and once with B's, in a fresh
process each, the order A B / B A alternating, seed = pair index, every cell under ``flock LOCK``.
Besides the benchmark's own figures, a cell records the page faults and user / system CPU of its live
workers, read at the moment `measure` reads the CPU (before the workers exit), and a digest of its
first and last batch (cells with the same seed and mode serve the same batches at any worker count). Prints per pair and
the paired medians B / A (total, workers, training process, samples/s); appends each cell's JSON to
``--jsonl``. Used for benchmarks/results/partitions-last.md::

    python benchmarks/steady_ab.py --a /path/to/checkout-A --b /path/to/checkout-B --pairs 5 \
        --workers 2,4 --jsonl /tmp/ab.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import partition_bench as pb  # noqa: E402

#: --mode -> partition_bench contender
MODES = {"text": "fastmix", "tokens": "fastmix tokens", "tokens-narrow": "fastmix tokens narrow"}


def _workers_state() -> dict:
    """Minor faults and user / system CPU seconds of this process's live descendants, and this
    process's own faults."""
    tick = os.sysconf("SC_CLK_TCK")
    faults = user = system = 0
    for pid in _common.live_descendants():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        faults, user, system = faults + int(fields[7]), user + int(fields[11]), system + int(fields[12])
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {"w_minflt": faults, "w_user": user / tick, "w_sys": system / tick, "m_minflt": own.ru_minflt}


def digest(batch) -> str:
    """Content digest of a served batch: a list of texts, or a tensor of token ids (as int64, so that
    narrow and widened batches of the same ids agree)."""
    if isinstance(batch, list):
        data = "\0".join(batch).encode()
    else:
        data = batch.to(dtype=pb.torch.int64).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def fingerprinted(open_fn, n: int, seen: dict):
    """``open_fn`` whose first batch and the batch that reaches ``n`` items leave their `digest` in
    ``seen`` (``first``, ``last``); two digests per cell, so the CPU measured is not the hashing's."""

    def opened(data, seed, workers):
        served = 0
        for batch, sources in open_fn(data, seed, workers):
            served += len(batch)
            if served == len(batch):
                seen["first"] = digest(batch)
            if served >= n:
                seen["last"] = digest(batch)
            yield batch, sources

    return opened


def child(args) -> dict:
    """One cell, in this process: `partition_bench.measure`, plus the workers' state at its CPU reading."""
    seen: dict = {}
    tree_cpu = _common._process_tree_cpu

    def tree_cpu_and_workers() -> float:
        seen.update(_workers_state())
        return tree_cpu()

    _common._process_tree_cpu = tree_cpu_and_workers  # measure reads the CPU through it
    data = pb.prepare(args.workdir, args.shard_mb, args.files)
    out = pb.measure(fingerprinted(pb.CONTENDERS[MODES[args.mode]], args.n, seen), data, args.seed, args.workers_one,
                     args.n)  # fmt: skip
    if args.mode != "text":
        out["tokens_s"] = out["samples_s"] * pb.SEQ_LEN  # training positions per sequence
    import fastmix_data

    return {**out, **seen, "mode": args.mode, "code": os.path.dirname(os.path.dirname(os.path.abspath(fastmix_data.__file__)))}


#: a cell without transparent huge pages: prctl(PR_SET_THP_DISABLE) before anything is imported (the
#: library's worker_memory.disable_huge_pages would import fastmix_data, pyarrow and torch first)
_NO_THP = f"import ctypes; ctypes.CDLL(None).prctl({_common.PR_SET_THP_DISABLE}, 1, 0, 0, 0); "


def run_cell(args, code: str, seed: int, workers: int, *, no_thp: bool = False) -> dict:
    """One cell in a fresh process under ``flock args.lock``, with checkout ``code``'s fastmix_data;
    ``no_thp``: huge pages disabled in that process from its start."""
    env = dict(os.environ, PYTHONPATH=code)
    env.setdefault("BENCH_CACHE", os.path.join(args.workdir, "index-cache"))
    child = [os.path.abspath(__file__), "--child", "--workdir", args.workdir, "--seed", str(seed),
             "--workers-one", str(workers), "--n", str(args.n), "--shard-mb", str(args.shard_mb),
             "--files", str(args.files), "--mode", args.mode]  # fmt: skip
    if no_thp:
        child = ["-c", _NO_THP + f"import runpy, sys; sys.argv = {child!r}; runpy.run_path(sys.argv[0], run_name='__main__')"]
    cmd = ["flock", args.lock, sys.executable, *child]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=900, cwd=args.workdir)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if os.path.realpath(res["code"]) != os.path.realpath(code):
        raise RuntimeError(f"the cell imported fastmix_data from {res['code']}, not from {code}")
    return res


def _ratio(b: dict, a: dict, key: str) -> float:
    return b[key] / a[key] if a[key] else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", help="checkout A (its fastmix_data first on the path)")
    p.add_argument("--b", help="checkout B")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--workers", default="2")
    p.add_argument("--mode", choices=MODES, default="text", help="text samples or packed token sequences")
    p.add_argument("--n", type=int, default=300_000, help="samples (text) or sequences (tokens) per cell")
    p.add_argument("--workdir", default="/tmp/perf-bench")
    p.add_argument("--shard-mb", type=int, default=22)
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--lock", default="/tmp/quiet.lock")
    p.add_argument("--jsonl", default=None, help="append each cell's figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workers-one", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    load0 = os.getloadavg()
    pairs: dict[int, list[tuple[dict, dict]]] = {}
    for i in range(args.pairs):
        for w in [int(x) for x in args.workers.split(",")]:
            order = ("A", "B") if i % 2 == 0 else ("B", "A")
            got = {}
            for name in order:
                got[name] = run_cell(args, args.a if name == "A" else args.b, i, w)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps({**got[name], "variant": name, "pair": i, "workers": w,
                                            "load": os.getloadavg()[0]}) + "\n")  # fmt: skip
            a, b = got["A"], got["B"]
            pairs.setdefault(w, []).append((a, b))
            print(f"pair {i} ({' '.join(order)}) w={w}: A {a['cpu_per_1k']:.4f} ({a['main_per_1k']:.4f} + "
                  f"{a['workers_per_1k']:.4f}), B {b['cpu_per_1k']:.4f} ({b['main_per_1k']:.4f} + "
                  f"{b['workers_per_1k']:.4f}), B / A {_ratio(b, a, 'cpu_per_1k'):.3f}; worker faults "
                  f"{a['w_minflt']} / {b['w_minflt']}", flush=True)  # fmt: skip
    print(f"load at start {load0}, at end {os.getloadavg()}")
    for w, runs in pairs.items():
        total = [_ratio(b, a, "cpu_per_1k") for a, b in runs]
        print(f"{w} workers: total B / A {statistics.median(total):.3f} ({min(total):.3f}-{max(total):.3f}), "
              f"{sum(r < 1 for r in total)}/{len(total)} below 1; workers "
              f"{statistics.median(_ratio(b, a, 'workers_per_1k') for a, b in runs):.3f}; training process "
              f"{statistics.median(_ratio(b, a, 'main_per_1k') for a, b in runs):.3f}; samples/s "
              f"{statistics.median(_ratio(b, a, 'samples_s') for a, b in runs):.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
