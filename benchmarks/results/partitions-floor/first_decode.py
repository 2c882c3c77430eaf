"""Diagnostic (not a timing study): CPU and minor faults of each row-group decode in a forked child,
in order, to see what a fresh process pays on its first decodes. N children at once, each decoding
its contiguous share of the token (or text) row groups twice; prints per child the CPU ms and faults
of its first 3 decodes, and the sums over the first and the second pass of its share. A third
argument ``warm``: the parent decodes the last row group once before it forks (an inherited arena).

    flock /tmp/quiet.lock .venv/bin/python benchmarks/results/partitions-floor/first_decode.py tokens 4
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # benchmarks/
import multiproc_floor as mf  # noqa: E402


def timed_decode(units, mode):
    out = []
    for u in units:
        c0, f0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        mf.decode([u], mode)
        out.append(
            (1000 * (time.process_time() - c0), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        )
    return out


def main():
    mode, n = sys.argv[1], int(sys.argv[2])
    units = mf.row_groups(mf.shard_files("/tmp/perf-bench", mode))
    if sys.argv[3:] == ["warm"]:
        mf.decode(units[-1:], mode)
    kids = [mf._fork(lambda k=k: timed_decode(mf.share(units, n, k) * 2, mode)) for k in range(n)]
    results, used, failed = mf._reap(kids)
    for k, r in enumerate(results):
        half = len(r) // 2
        first, second = r[:half], r[half:]
        print(
            f"{mode} N={n} child {k}: first 3 decodes (ms, faults) {[(round(c, 1), f) for c, f in r[:3]]}; "
            f"pass 1 {sum(c for c, _ in first):.0f} ms {sum(f for _, f in first)} faults, "
            f"pass 2 {sum(c for c, _ in second):.0f} ms {sum(f for _, f in second)} faults ({half} row groups)"
        )
    print(json.dumps(used))


main()
