#!/bin/bash
# The second attempt's one A/B (i16-text2; rule fixed by the lead at ~12:12 UTC, after the first A/B was
# seen): texts only, 10 pairs, 2 and 4 workers. Every cell takes /tmp/quiet.lock itself.
set -e
. "$(dirname "$0")/state.sh"
started
.venv/bin/python benchmarks/steady_ab.py --a /work/main --b /work/wt/i16-text --pairs 10 --workers 2,4 --mode text --n 300000 --jsonl $D/ab2-text.jsonl
ended
