#!/bin/bash
# i16-text2's context check (not part of the rule): paired in-process A/B with huge pages off.
set -e
. "$(dirname "$0")/state.sh"
started
.venv/bin/python $D/inproc_nothp_ab.py --pairs 10 --jsonl $D/inproc2-nothp.jsonl
ended
