#!/bin/bash
# partitions-floor.md's runs, in order; each cell takes /tmp/quiet.lock itself (never held across a run).
# Run from the worktree root after the lead's CI: bash benchmarks/results/partitions-floor/run.sh
set -euo pipefail
D=benchmarks/results/partitions-floor
PY=.venv/bin/python
$PY benchmarks/multiproc_floor.py --mode tokens --procs 1,2,4,1+sink,4+sink --reps 5 --out $D/tokens.json 2>&1 | tee $D/tokens.log
$PY benchmarks/multiproc_floor.py --mode text --procs 1,2,4,1+sink,4+sink --reps 5 --out $D/text.json 2>&1 | tee $D/text.log
$PY benchmarks/multiproc_floor.py --mode tokens --procs 1,2,4 --passes 4 --reps 5 --out $D/tokens-passes4.json 2>&1 | tee $D/tokens-passes4.log
# added after the three runs above (12:54 UTC), to split text's per-process start-up from its per-row-group floor as for tokens
$PY benchmarks/multiproc_floor.py --mode text --procs 1,2,4 --passes 4 --reps 5 --out $D/text-passes4.json 2>&1 | tee $D/text-passes4.log
# added 12:55 UTC: text at the real text cell's amount of decode (300,000 of 781,608 rows, ~0.4 of the row groups)
$PY benchmarks/multiproc_floor.py --mode text --procs 1,2,4 --fraction 0.4 --reps 5 --out $D/text-fraction04.json 2>&1 | tee $D/text-fraction04.log
# a second window (12:56 UTC), the same five runs, files *-r2
$PY benchmarks/multiproc_floor.py --mode tokens --procs 1,2,4,1+sink,4+sink --reps 5 --out $D/tokens-r2.json 2>&1 | tee $D/tokens-r2.log
$PY benchmarks/multiproc_floor.py --mode text --procs 1,2,4,1+sink,4+sink --reps 5 --out $D/text-r2.json 2>&1 | tee $D/text-r2.log
$PY benchmarks/multiproc_floor.py --mode tokens --procs 1,2,4 --passes 4 --reps 5 --out $D/tokens-passes4-r2.json 2>&1 | tee $D/tokens-passes4-r2.log
$PY benchmarks/multiproc_floor.py --mode text --procs 1,2,4 --passes 4 --reps 5 --out $D/text-passes4-r2.json 2>&1 | tee $D/text-passes4-r2.log
$PY benchmarks/multiproc_floor.py --mode text --procs 1,2,4 --fraction 0.4 --reps 5 --out $D/text-fraction04-r2.json 2>&1 | tee $D/text-fraction04-r2.log
# added 13:06 UTC after first_decode.log (a fresh process's first token decode ~200 ms, ~35 ms after a warm parent): the same
# control with the cell's parent warmed (one row group decoded before it forks, not counted)
$PY benchmarks/multiproc_floor.py --mode tokens --procs 1,2,4 --warm-parent --reps 5 --out $D/tokens-warm.json 2>&1 | tee $D/tokens-warm.log
$PY benchmarks/multiproc_floor.py --mode text --procs 1,2,4 --warm-parent --reps 5 --out $D/text-warm.json 2>&1 | tee $D/text-warm.log
$PY benchmarks/multiproc_floor.py --mode tokens --procs 1,2,4 --passes 4 --warm-parent --reps 5 --out $D/tokens-passes4-warm.json 2>&1 | tee $D/tokens-passes4-warm.log
