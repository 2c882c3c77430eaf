#!/bin/bash
# The rule's part (b), memory: startup_profile tokens 2 workers and text 4 workers, main and THE candidate
# (tokens 4 workers: part (a)'s runs). Niced, not under the lock; interleaved per cell.
set -e
R=/work/wt/i16-alloc; O=$R/benchmarks/results/partitions-alloc/profiles; PY=$R/.venv/bin/python
cd /tmp/perf-bench
for cell in "tokens 2" "text 4"; do set -- $cell
  for c in main BC; do
    [ $c = main ] && P=/work/main || P=$R
    echo "$c $1 w$2 start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    env PYTHONPATH=$P nice -n 10 $PY $R/benchmarks/startup_profile.py --mode $1 --workers $2 --out $O/$c-$1-w$2.json > /dev/null 2>&1
    echo "$c $1 w$2 end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
