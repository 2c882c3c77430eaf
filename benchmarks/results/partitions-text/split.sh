#!/bin/bash
# The per-batch split (benchmarks/text_path_split.py) of main's code and of the change (i16-text-change,
# d57c7c5, its fastmix_data unpacked to $CHANGE), each under the lock, THP off as in a worker.
cd /work/wt/i16-text
D=benchmarks/results/partitions-text
CHANGE=${CHANGE:-/tmp/i16t/change}
SET=${SET:-split2}  # split1: 12:04 UTC (before the texts_to_str stage), split2: 12:08 UTC
# log: $D/$SET.log
for rep in 1 2; do
  for side in main change; do
    code=/work/main; [ $side = change ] && code=$CHANGE
    echo "$side rep $rep start $(date -u +%FT%TZ) load $(cat /proc/loadavg)"
    PYTHONPATH=$code flock /tmp/quiet.lock .venv/bin/python benchmarks/text_path_split.py --no-thp \
      --workers 2 --batches 600 --reps 5 --out $D/$SET-$side-$rep.json > /dev/null
    echo "$side rep $rep end $(date -u +%FT%TZ) load $(cat /proc/loadavg)"
  done
done
