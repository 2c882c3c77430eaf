"""Diagnostic: does opening the benchmark's MixtureStream (as the training process does before its
DataLoader workers fork) already pay pyarrow's first-decode initialisation? Prints the CPU ms of one
token row-group decode in a fresh process (THP off) after opening the stream, and without it.

    flock /tmp/quiet.lock .venv/bin/python benchmarks/results/partitions-floor/stream_warms.py
"""

import subprocess
import sys

CHILD = r"""
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)
sys.path.insert(0, "benchmarks")
import multiproc_floor as mf
units = mf.row_groups(mf.shard_files("/tmp/perf-bench", "tokens"))
if sys.argv[1] == "stream":
    import partition_bench as pb
    from fastmix_data import MixtureStream
    data = pb.prepare("/tmp/perf-bench", 22, 3)
    it = iter(MixtureStream(data["tokens"], pb.WEIGHTS, batch_size=8, seq_len=pb.SEQ_LEN,
                            cache_dir=os.path.join("/tmp/perf-bench", "index-cache")))
t = time.process_time()
mf.decode(units[:1], "tokens")
print(sys.argv[1], "first decode ms", round(1000 * (time.process_time() - t), 1))
"""

for how in ("fresh", "stream", "fresh", "stream"):
    subprocess.run([sys.executable, "-c", CHILD, how], check=True)
