#!/bin/bash
# NOT part of the rule (after its verdict): a second profile of every candidate and main, tokens 4 workers,
# and text 4 workers twice, interleaved; niced, not under the lock. To see where B+C's user CPU comes from.
set -e
R=/work/wt/i16-alloc; O=$R/benchmarks/results/partitions-alloc/supplementary; PY=$R/.venv/bin/python
mkdir -p $O; cd /tmp/perf-bench
run() {  # candidate mode workers out
  local c=$1; shift
  case $c in
    main) E="PYTHONPATH=/work/main" ;;
    B) E="PYTHONPATH=$R FASTMIX_DATA_WORKER_ARROW_POOL=default" ;;
    C) E="PYTHONPATH=$R FASTMIX_DATA_WORKER_MALLOC=default" ;;
    BC) E="PYTHONPATH=$R" ;;
  esac
  echo "$c $1 w$2 $3 start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  env $E nice -n 10 $PY $R/benchmarks/startup_profile.py --mode $1 --workers $2 --out $O/$c-$1-w$2-$3.json > /dev/null 2>&1
}
for c in main B C BC; do run $c tokens 4 r2; done
for r in r1 r2; do for c in main B C BC; do run $c text 4 $r; done; done
echo "end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
