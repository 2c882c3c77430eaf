"""The A/B's tables from steady_ab's JSONL (ab-tokens.jsonl, ab-text.jsonl): per cell and pair, A and B
CPU per 1,000 items (training + workers), B / A total, training, workers, items/s, worker faults,
workers' user / system CPU s, and whether both served the same first and last batch."""

import json
import statistics
import sys


def ratio(b, a, k):
    return b[k] / a[k]


for path in sys.argv[1:]:
    rows = [json.loads(line) for line in open(path)]
    for w in sorted({r["workers"] for r in rows}):
        cell = {(r["pair"], r["variant"]): r for r in rows if r["workers"] == w}
        pairs = sorted({p for p, _ in cell})
        print(f"\n### {rows[0]['mode']}, {w} workers\n")
        print("| pair (order) | A total (training + workers) | B total (training + workers) | B / A | B / A training | "
              "B / A workers | B / A items/s | worker faults A / B | workers user + sys s, A / B | same batches |")
        print("| :-- | --: | --: | --: | --: | --: | --: | --: | --: | :-- |")
        tot, tr, wk, sp = [], [], [], []
        for p in pairs:
            a, b = cell[(p, "A")], cell[(p, "B")]
            same = (a["first"], a["last"]) == (b["first"], b["last"]) and a["last"] is not None
            tot.append(ratio(b, a, "cpu_per_1k")), tr.append(ratio(b, a, "main_per_1k"))
            wk.append(ratio(b, a, "workers_per_1k")), sp.append(ratio(b, a, "samples_s"))
            order = "A B" if p % 2 == 0 else "B A"
            print(f"| {p} ({order}) | {a['cpu_per_1k']:.4f} ({a['main_per_1k']:.4f} + {a['workers_per_1k']:.4f}) | "
                  f"{b['cpu_per_1k']:.4f} ({b['main_per_1k']:.4f} + {b['workers_per_1k']:.4f}) | {tot[-1]:.4f} | "
                  f"{tr[-1]:.3f} | {wk[-1]:.3f} | {sp[-1]:.3f} | {a['w_minflt']:,} / {b['w_minflt']:,} | "
                  f"{a['w_user']:.2f} + {a['w_sys']:.2f} / {b['w_user']:.2f} + {b['w_sys']:.2f} | {'yes' if same else 'NO'} |")
        med = statistics.median
        print(f"| **median** | | | **{med(tot):.4f}** ({min(tot):.3f}-{max(tot):.3f}), {sum(t < 1 for t in tot)}/5 below 1 | "
              f"{med(tr):.3f} | {med(wk):.3f} | {med(sp):.3f} | | | |")
        us = [cell[(p, 'B')]['w_user'] / cell[(p, 'A')]['w_user'] for p in pairs]
        sy = [cell[(p, 'B')]['w_sys'] / cell[(p, 'A')]['w_sys'] for p in pairs]
        print(f"\nworkers' user CPU B / A median {med(us):.3f} ({min(us):.3f}-{max(us):.3f}); system CPU B / A median "
              f"{med(sy):.3f} ({min(sy):.3f}-{max(sy):.3f}); loads (1 min) at the cells {min(r['load'] for r in cell.values()):.2f}-"
              f"{max(r['load'] for r in cell.values()):.2f}")
