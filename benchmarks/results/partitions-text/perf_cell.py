"""The cell perf-workers.txt profiled: partition_bench.measure of the fastmix text cell, from the
repository root (argv: items, workers)."""

import os
import sys

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
os.environ.setdefault("BENCH_CACHE", "/tmp/perf-bench/index-cache")
import partition_bench as pb  # noqa: E402

data = pb.prepare("/tmp/perf-bench", 22, 3)
print(pb.measure(pb.open_fastmix, data, 0, int(sys.argv[2]), int(sys.argv[1])))
