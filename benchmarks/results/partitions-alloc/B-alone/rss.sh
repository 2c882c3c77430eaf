#!/bin/bash
# Second attempt (B alone), the rule's memory part: startup_profile tokens 2 and 4 workers and text 4
# workers, main and B, one run each, interleaved per cell; niced, not under the lock (../rss.sh).
exec bash "$(dirname "$0")/../rss.sh" B /work/wt/i16-alloc/benchmarks/results/partitions-alloc/B-alone/profiles "tokens 2" "tokens 4" "text 4"
