#!/bin/bash
cd /work/wt/i16-start
echo "start $(date -u +%H:%M:%S) load $(cat /proc/loadavg)"
.venv/bin/python benchmarks/steady_ab.py --a /work/main --b /work/wt/i16-start --pairs 5 --workers 2,4 --mode text --jsonl /tmp/i16s/ab-text.jsonl
echo "text done $(date -u +%H:%M:%S) load $(cat /proc/loadavg)"
.venv/bin/python benchmarks/steady_ab.py --a /work/main --b /work/wt/i16-start --pairs 5 --workers 2,4 --mode tokens --n 200000 --jsonl /tmp/i16s/ab-tokens.jsonl
echo "end $(date -u +%H:%M:%S) load $(cat /proc/loadavg)"
