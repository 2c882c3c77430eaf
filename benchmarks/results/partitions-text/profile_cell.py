"""cProfile (CPU time) of a whole text cell of partition_bench with W loader workers: each worker's
`direct_ring.write_all` (its whole stream: reads, building, ring writes) and the training process
after its first batch; the top functions of each written to DIR. Not a timing (run it niced); cProfile
inflates Python-level calls, so read the split, not the seconds.

    nice -n 15 .venv/bin/python benchmarks/results/partitions-text/profile_cell.py --workers 2 --dir DIR
"""

import argparse
import cProfile
import glob
import os
import pstats
import sys
import time

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, BENCH)
os.environ.setdefault("BENCH_CACHE", "/tmp/perf-bench/index-cache")
import partition_bench as pb  # noqa: E402

from fastmix_data.stream import direct_ring  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    write_all = direct_ring.write_all

    def profiled(batches, path, fifo):
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        try:
            write_all(batches, path, fifo)
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(args.dir, f"worker-{os.getpid()}.prof"))

    direct_ring.write_all = profiled
    data = pb.prepare("/tmp/perf-bench", 22, 3)
    prof, served, t0 = cProfile.Profile(time.process_time), 0, time.process_time()
    for texts, _ in pb.open_fastmix(data, 0, args.workers):
        if not served:
            prof.enable()
        served += len(texts)
        if served >= args.n:
            break
    prof.disable()
    print(f"training process CPU {time.process_time() - t0:.3f} s for {served} texts")
    time.sleep(2)  # the workers write their profiles at their end
    for name, files in (("workers", sorted(glob.glob(os.path.join(args.dir, "worker-*.prof")))), ("training", None)):
        with open(os.path.join(args.dir, f"{name}-w{args.workers}.txt"), "w") as f:
            stats = pstats.Stats(*files, stream=f) if files else pstats.Stats(prof, stream=f)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(30)
    for p in glob.glob(os.path.join(args.dir, "worker-*.prof")):
        os.unlink(p)


if __name__ == "__main__":
    main()
