#!/bin/bash
# Issue 16's rule (b) for a variant: paired A/B main vs the variant's checkout (steady_ab takes
# flock /tmp/quiet.lock per cell). Usage: ab.sh NAME CHECKOUT
set -euo pipefail
WT=/work/wt/i16-mem; OUT=$WT/benchmarks/results/partitions-mem; NAME=$1; CODE=$2
cd $WT
echo "start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg) main $(git -C /work/main rev-parse --short HEAD) $NAME $(git -C $CODE rev-parse --short HEAD) clean:$(git -C $CODE status --porcelain | wc -l)"
.venv/bin/python benchmarks/steady_ab.py --a /work/main --b $CODE --pairs 5 --workers 2,4 --mode text --n 300000 --jsonl $OUT/ab-$NAME-text.jsonl
echo "after text $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
.venv/bin/python benchmarks/steady_ab.py --a /work/main --b $CODE --pairs 5 --workers 2,4 --mode tokens --n 200000 --jsonl $OUT/ab-$NAME-tokens.jsonl
echo "end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
