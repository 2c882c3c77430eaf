"""Is MixMin's / FastMix's L1 to a planted mixture limited by the size of the target sample?

A diagnostic beside the quality benchmark (same corpora, planted targets, proxies and code path:
``run_quality.prepare`` and ``run_quality.method_config``), searches only, no final runs. For each
K = 3 corpus it runs the method at its defaults except for the overrides in the row (the target
sample's ``target.max_seqs``; MixMin's ``mixmin.example_tokens``; the search budget) and reports:

* the L1 distance of the sample's own token shares to the planted token shares (the floor a method
  scoring that sample can reach),
* each method's L1 to the planted token shares, mean +- SE over the seeds,
* for MixMin, the share of target tokens in examples its proxies assign (by the largest likelihood)
  to a source other than the example's label: with posteriors this sharp, MixMin's exported token
  shares are that hard assignment, so this is the part of its L1 the proxies' reading decides.

    nice -n 15 python benchmarks/quality/target_size.py --work out/quality   # ~5 min, writes target_size.md

The overrides are diagnostics, not defaults; see the reading in target_size.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import _common  # noqa: E402
import run_quality as rq  # noqa: E402
from report import MARKER  # noqa: E402

from fastmix_data.search import load_target, run_method  # noqa: E402
from fastmix_data.search.methods import mixmin as mixmin_module  # noqa: E402

#: (label, method, overrides); max_seqs None = the whole target; example_tokens 10**9 = whole documents
ROWS = [
    ("MixMin, defaults (1,024 seqs, 1,024-token examples)", "mixmin", {}),
    ("MixMin, 4,096 seqs", "mixmin", {"target.max_seqs": 4096}),
    ("MixMin, whole target", "mixmin", {"target.max_seqs": None}),
    ("MixMin, whole target, whole-document examples", "mixmin",
     {"target.max_seqs": None, "mixmin.example_tokens": 10**9}),
    ("FastMix, defaults (1,024 seqs)", "fastmix", {}),
    ("FastMix, 4,096 seqs", "fastmix", {"target.max_seqs": 4096}),
    ("FastMix, whole target", "fastmix", {"target.max_seqs": None}),
    ("FastMix, 4x the budget (information)", "fastmix", {"max_tokens": 4}),
]


class _Spy:
    """Keeps the per-example log-likelihoods MixMin computes (to count the examples its proxies
    assign to another source than their label)."""

    def __init__(self):
        self.orig, self.last = mixmin_module.example_columns, None

    def __call__(self, logq, target, ex):
        self.last = self.orig(logq, target, ex)
        self.target = target
        return self.last


def misassigned(spy: _Spy, names: list[str]) -> float:
    ex, t = spy.last, spy.target
    label = torch.tensor([names.index(t.group_names[g]) for g in ex.group.tolist()])
    return float(ex.weight[ex.logq.argmax(0) != label].sum() / ex.weight.sum())


def run_row(work: Path, data: dict, method: str, over: dict, seeds: list[int], args, spy: _Spy) -> dict:
    l1s, mis = [], []
    for seed in seeds:
        o = dict(over)
        if "max_tokens" in o:
            o["max_tokens"] = o["max_tokens"] * args.final_tokens
        cfg = rq.method_config(args, method, seed, work).replace(**o)
        r = run_method(cfg, sources=data["sources"], target=data["search"]["planted"],
                       out_dir=work / "target_size" / f"{method}-s{seed}")
        l1s.append(rq.l1(r.weights, data["planted_tokens"]))
        if method == "mixmin":
            mis.append(misassigned(spy, list(data["sources"])))
    n = len(seeds)
    out = {"l1": [float(np.mean(l1s)), float(np.std(l1s, ddof=1) / np.sqrt(n)) if n > 1 else 0.0], "l1_runs": l1s}
    if mis:
        out["misassigned"] = float(np.mean(mis))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="out/quality", help="the quality benchmark's work folder (corpora, cache)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--experiments", nargs="+", default=["stdlib-K3", "system-K3"])
    ap.add_argument("--out", default=str(HERE / "target_size.md"))
    args = ap.parse_args(argv)
    args.seq_len, args.planted_docs, args.eval_seqs = 64, 100, 512
    args.final_tokens, args.batch_size, args.proxy = 16 * 64 * 256, 16, "tiny"
    torch.set_num_threads(1)
    work = Path(args.work)
    spy = _Spy()
    mixmin_module.example_columns = spy
    t0, load0 = time.perf_counter(), rq._uptime()
    data = rq.prepare(work, args)
    lines = []
    for exp in args.experiments:
        d = data[exp]
        P = d["planted_tokens"]
        lines += [f"## {exp}", "", "planted token shares: " + ", ".join(f"{k} {v:.3f}" for k, v in P.items()), ""]
        floors = {}
        for n in (1024, 4096, None):
            t = load_target(d["search"]["planted"], args.seq_len, max_seqs=n)
            floors[n] = (len(t), rq.l1(t.shares(), P), len(set(t.doc.tolist())))
        lines += ["| target sample (target.max_seqs) | sequences | documents | L1 of its token shares to the planted |",
                  "| :-- | --: | --: | --: |"]
        lines += [f"| {n or 'whole target'} | {s} | {docs} | {f:.3f} |" for n, (s, f, docs) in floors.items()]
        lines += ["", f"| run (seeds {args.seeds}) | L1 to planted (mean ± SE) | per seed | MixMin: target tokens "
                  "its proxies assign to another source |", "| :-- | --: | :-- | --: |"]
        for label, method, over in ROWS:
            r = run_row(work, d, method, over, args.seeds, args, spy)
            rq.log(f"{exp} {label}: L1 {r['l1'][0]:.3f} ± {r['l1'][1]:.3f}")
            mis = f"{r['misassigned']:.3f}" if "misassigned" in r else "–"
            lines.append(f"| {label} | {r['l1'][0]:.3f} ± {r['l1'][1]:.3f} | "
                         + ", ".join(f"{x:.3f}" for x in r["l1_runs"]) + f" | {mis} |")
        lines.append("")
    head = ["# Target sample size and the L1 to a planted mixture (diagnostic)", "",
            f"- date: {_common.today()}, commit {_common.git_revision(str(rq.REPO))}",
            f"- command: `{_common.command_line()}`",
            f"- load average at start / end: {load0} / {rq._uptime()}; wall {(time.perf_counter() - t0) / 60:.1f} min",
            "- searches only (no final runs), each method at its defaults except the overrides named in the row; "
            f"budget = one final run ({args.final_tokens:,} tokens) unless the row says otherwise.", ""]
    text = "\n".join(head + lines)
    old = Path(args.out)
    if old.exists() and MARKER in old.read_text():
        prev = old.read_text()
        text += "\n" + prev[prev.index(MARKER):]
    _common.write_atomic(str(old), text + "\n")
    rq.log(f"wrote {old}")


if __name__ == "__main__":
    main()
