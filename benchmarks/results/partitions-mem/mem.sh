#!/bin/bash
# Memory cells of issue 16's rule (a): startup_profile, niced, not under the lock, main and variant
# interleaved, one run each. Usage: [OUT=DIR] mem.sh NAME CHECKOUT   (main is /work/main)
set -euo pipefail
WT=/work/wt/i16-mem; OUT=${OUT:-$WT/benchmarks/results/partitions-mem}; NAME=$1; CODE=$2
cd /tmp/perf-bench
echo "start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
for cell in "tokens --workers 0 --no-thp" "tokens --workers 2" "tokens --workers 4" "text --workers 4"; do
  tag=$(echo "$cell" | tr -d ' -' | sed 's/workers/w/;s/nothp/-nothp/')
  for side in main:/work/main "$NAME:$CODE"; do
    who=${side%%:*}; code=${side#*:}
    nice -n 10 env PYTHONPATH=$code $WT/.venv/bin/python $WT/benchmarks/startup_profile.py --mode $cell \
      --out $OUT/$who-$tag.json > /dev/null
    echo "$who $tag done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
echo "end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
