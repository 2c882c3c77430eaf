#!/bin/bash
# Second attempt, the rule's ONE paired A/B of B (this branch's change) against main: ../ab.sh into this folder.
exec bash "$(dirname "$0")/../ab.sh" /work/wt/i16-alloc/benchmarks/results/partitions-alloc/B-alone
