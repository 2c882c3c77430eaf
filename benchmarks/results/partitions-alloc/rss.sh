#!/bin/bash
# The rule's part (b), memory: startup_profile tokens 2 workers and text 4 workers, main and THE candidate
# (tokens 4 workers: part (a)'s runs). Niced, not under the lock; interleaved per cell.
# Arguments (B-alone/rss.sh gives them for the second attempt): candidate's name, profiles folder, cells.
set -e
R=/work/wt/i16-alloc; PY=$R/.venv/bin/python
C=${1:-BC}; O=${2:-$R/benchmarks/results/partitions-alloc/profiles}; shift 2 || true
cells=("$@"); [ ${#cells[@]} -gt 0 ] || cells=("tokens 2" "text 4")
cd /tmp/perf-bench
echo "main = /work/main at $(git -C /work/main rev-parse --short HEAD); $C = $R at $(git -C $R rev-parse --short HEAD) ($(git -C $R status --short fastmix_data | wc -l) changed files in fastmix_data)"
for cell in "${cells[@]}"; do set -- $cell
  for c in main $C; do
    [ $c = main ] && P=/work/main || P=$R
    echo "$c $1 w$2 start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    env PYTHONPATH=$P nice -n 10 $PY $R/benchmarks/startup_profile.py --mode $1 --workers $2 --out $O/$c-$1-w$2.json > /dev/null 2>&1
    echo "$c $1 w$2 end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
