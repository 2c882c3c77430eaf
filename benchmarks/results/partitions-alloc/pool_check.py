"""The mechanism check behind candidate C's choice of pool (not a timing; run niced): a process that
has used pyarrow's default pool (mimalloc) forks; the child turns huge pages off (as a DataLoader
worker does) and, per argument, keeps mimalloc (``mi``), switches to jemalloc with decay -1 asked for
in the child (``je``: ``JE_ARROW_MALLOC_CONF`` set there; jemalloc was already initialised when
libarrow loaded, so it has no effect), to the system pool with glibc's mmap / trim thresholds raised
(``sys``), or keeps mimalloc with the thresholds raised (``glibc``); then reads every row group of
the benchmark's 5 token shards 3 times and prints its minor faults, CPU and peak RSS (MB)::

    for m in mi je sys glibc; do nice -n 10 python pool_check.py $m; done
"""

import ctypes
import glob
import os
import resource
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

files = sorted(glob.glob("/tmp/perf-bench/tokens/**/*.parquet", recursive=True))
pq.ParquetFile(files[0]).read_row_groups([0])  # the training process touches its pool first
mode = sys.argv[1]
pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
    if mode == "je":
        os.environ["JE_ARROW_MALLOC_CONF"] = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    elif mode == "sys":
        pa.set_memory_pool(pa.system_memory_pool())
    if mode in ("sys", "glibc"):
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20), libc.mallopt(-1, 256 << 20)
    f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    for _ in range(3):
        for f in files:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                pf.read_row_groups([g])
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(mode, pa.default_memory_pool().backend_name, "faults", use.ru_minflt - f0,
          f"cpu {time.process_time() - t:.2f}", "rss", use.ru_maxrss // 1024)  # fmt: skip
    os._exit(0)
os.waitpid(pid, 0)
