#!/bin/bash
# The rule's part (b): ONE paired A/B of THE candidate (B+C, this branch's default) against main.
# steady_ab takes /tmp/quiet.lock per cell. Argument: the results folder (default: this one;
# B-alone/ab.sh gives its own for the second attempt, B alone).
set -e
R=/work/wt/i16-alloc; O=${1:-$R/benchmarks/results/partitions-alloc}; PY=$R/.venv/bin/python
cd $R
echo "A = /work/main at $(git -C /work/main rev-parse --short HEAD); B = $R at $(git rev-parse --short HEAD) ($(git status --short fastmix_data | wc -l) changed files in fastmix_data)"
echo "tokens start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
$PY benchmarks/steady_ab.py --a /work/main --b $R --pairs 5 --workers 2,4 --mode tokens --n 200000 --jsonl $O/ab-tokens.jsonl
echo "tokens end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "text start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
$PY benchmarks/steady_ab.py --a /work/main --b $R --pairs 5 --workers 2,4 --mode text --n 300000 --jsonl $O/ab-text.jsonl
echo "text end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
