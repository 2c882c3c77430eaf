#!/bin/bash
# The rule's one A/B (i16-text), run from the worktree; every cell takes /tmp/quiet.lock itself.
set -e
cd /work/wt/i16-text
D=benchmarks/results/partitions-text
echo "start $(date -u +%FT%TZ) load $(cat /proc/loadavg) main $(git -C /work/main rev-parse --short HEAD) branch $(git rev-parse --short HEAD)"
.venv/bin/python benchmarks/steady_ab.py --a /work/main --b /work/wt/i16-text --pairs 5 --workers 2,4 --mode text --n 300000 --jsonl $D/ab-text.jsonl
echo "after text $(date -u +%FT%TZ) load $(cat /proc/loadavg)"
.venv/bin/python benchmarks/steady_ab.py --a /work/main --b /work/wt/i16-text --pairs 5 --workers 2,4 --mode tokens --n 200000 --jsonl $D/ab-tokens.jsonl
echo "after tokens $(date -u +%FT%TZ) load $(cat /proc/loadavg)"
# the in-process check (the change touches ItemSource._gather_unit, which the in-process stream runs)
.venv/bin/python benchmarks/steady_ab.py --a /work/main --b /work/wt/i16-text --pairs 5 --workers 0 --mode text --n 300000 --jsonl $D/ab-inprocess.jsonl
echo "end $(date -u +%FT%TZ) load $(cat /proc/loadavg)"
