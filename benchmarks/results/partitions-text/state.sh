# Sourced by the second attempt's scripts (ab2.sh, thp2.sh, inproc2.sh; i16-text2): the worktree as the
# working directory, the results folder in $D, and the state lines their logs start and end with.
cd /work/wt/i16-text
D=benchmarks/results/partitions-text
now() { echo "$(date -u +%FT%TZ) load $(cat /proc/loadavg)"; }
head_of() { git -C "$1" rev-parse --short HEAD; }
started() { echo "start $(now) main $(head_of /work/main) branch $(head_of .) library-diff-vs-HEAD '$(git status --short fastmix_data)'"; }
ended() { echo "end $(now) main $(head_of /work/main)"; }
