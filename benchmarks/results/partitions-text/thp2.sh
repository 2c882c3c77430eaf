#!/bin/bash
# The like-for-like ratio after the second attempt's A/B kept the change (i16-text2): inprocess_thp on the
# branch (the brief's step 3), then, for context in the same window, the same script on main's checkout
# (this worktree's .venv, main's fastmix_data and script: REPO = /work/main). Each cell takes /tmp/quiet.lock.
set -e
. "$(dirname "$0")/state.sh"
started
.venv/bin/python benchmarks/inprocess_thp.py --mode text --reps 5 --out $D/thp2-branch.json
echo "after branch $(now)"
.venv/bin/python /work/main/benchmarks/inprocess_thp.py --mode text --reps 5 --out $D/thp2-main.json
ended
