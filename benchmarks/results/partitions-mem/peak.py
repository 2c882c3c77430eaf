"""Largest process's peak RSS (MB) of each startup_profile JSON given: max over the training process
(at the n-th item) and every worker (at its end); ru_maxrss."""

import json
import sys

for path in sys.argv[1:]:
    with open(path) as f:
        d = json.load(f)
    train = d["training"]["nth"]["maxrss_mb"]
    workers = [w["end"]["maxrss_mb"] for w in d["worker_figures"]]
    faults = sum(w["end"]["minflt"] - w["entry"]["minflt"] for w in d["worker_figures"])
    print(
        f"{path}: code {d['code']} largest {max([train, *workers]):.0f} training {train:.0f} "
        f"workers {[round(w) for w in workers]} worker faults {faults}"
    )
