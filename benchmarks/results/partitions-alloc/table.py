"""Per startup_profile JSON: workers' minor faults (end - entry, summed: from the start of each worker's
MixtureStream.__iter__, where the allocator settings are made, to its end; and since fork), workers' CPU
(end - entry), decode and packing CPU, largest process's peak RSS (ru_maxrss: training process at the
n-th item, every worker at its end), the code path imported."""

import json
import sys

print("| file | code | worker faults (from __iter__) | since fork | workers CPU s | decode s | packing s | largest peak RSS MB (training; workers) |")
print("| :-- | :-- | --: | --: | --: | --: | --: | :-- |")
for path in sys.argv[1:]:
    with open(path) as f:
        d = json.load(f)
    ws = d["worker_figures"]
    train = d["training"]["nth"]["maxrss_mb"]
    rss = [w["end"]["maxrss_mb"] for w in ws]
    faults = sum(w["end"]["minflt"] - w["entry"]["minflt"] for w in ws)
    fork = sum(w["end"]["minflt"] for w in ws)
    cpu = sum(w["end"]["cpu"] - w["entry"]["cpu"] for w in ws)
    read = sum(w["counts"]["read_cpu"] for w in ws)
    pack = sum(w["counts"]["pack_cpu"] for w in ws)
    print(f"| {path.rsplit('/', 1)[-1]} | {d['code']} | {faults:,} | {fork:,} | {cpu:.2f} | {read:.2f} | {pack:.2f} | "
          f"**{max([train, *rss]):.0f}** ({train:.0f}; {', '.join(str(round(r)) for r in rss)}) |")
