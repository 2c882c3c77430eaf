"""cProfile of a `loader()` training process after its first batch (not a timing; partitions-lean.md).

    python prof_training.py CHECKOUT MODE WORKERS N     # MODE: text | tokens; N items profiled
"""

import cProfile
import io
import os
import pstats
import sys
import time

root, mode, workers, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path[:0] = [root, os.path.join(root, "benchmarks")]
os.environ.setdefault("BENCH_CACHE", "/tmp/perf-bench/index-cache")
import partition_bench as pb  # noqa: E402

import fastmix_data  # noqa: E402

assert fastmix_data.__file__.startswith(root), fastmix_data.__file__
data = pb.prepare("/tmp/perf-bench", 22, 3)
it = pb.open_fastmix(data, 0, workers) if mode == "text" else pb.open_fastmix_tokens(data, 0, workers)
next(it)
served = batches = 0
profile = cProfile.Profile()
t = time.process_time()
profile.enable()
for b in it:
    served += len(b[0])
    batches += 1
    if served >= n:
        break
profile.disable()
cpu = time.process_time() - t
print(f"{mode} W={workers} batches={batches} own cpu {cpu:.2f}s = {1e6 * cpu / batches:.1f} us/batch (profiled)")
out = io.StringIO()
stats = pstats.Stats(profile, stream=out).sort_stats("tottime")
stats.print_stats(30)
print(out.getvalue())
for (f, line, fn), (_, nc, tt, ct, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:30]:
    print(f"{1e6 * tt / batches:8.2f} us tot {1e6 * ct / batches:8.2f} us cum  {nc / batches:6.2f}/b  "
          f"{os.path.basename(f)}:{line}({fn})")  # fmt: skip
