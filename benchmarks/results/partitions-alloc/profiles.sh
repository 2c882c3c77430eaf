#!/bin/bash
# The rule's part (a): startup_profile, tokens, 4 workers, once per candidate and main (niced, not under the lock).
# Candidates by the branch's opt-outs: B = pyarrow's pool left, C = glibc's thresholds left, BC = both set.
set -e
R=/work/wt/i16-alloc; O=$R/benchmarks/results/partitions-alloc/profiles; PY=$R/.venv/bin/python
cd /tmp/perf-bench
for c in main B C BC; do
  echo "$c start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  case $c in
    main) env PYTHONPATH=/work/main nice -n 10 $PY $R/benchmarks/startup_profile.py --mode tokens --workers 4 --out $O/$c-tokens-w4.json ;;
    B) env PYTHONPATH=$R FASTMIX_DATA_WORKER_ARROW_POOL=default nice -n 10 $PY $R/benchmarks/startup_profile.py --mode tokens --workers 4 --out $O/$c-tokens-w4.json ;;
    C) env PYTHONPATH=$R FASTMIX_DATA_WORKER_MALLOC=default nice -n 10 $PY $R/benchmarks/startup_profile.py --mode tokens --workers 4 --out $O/$c-tokens-w4.json ;;
    BC) env PYTHONPATH=$R nice -n 10 $PY $R/benchmarks/startup_profile.py --mode tokens --workers 4 --out $O/$c-tokens-w4.json ;;
  esac > /dev/null
  echo "$c end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
done
