"""FastMix search overhead over plain proxy training, and the cost of an outer step vs K.

Usage:
    python benchmarks/search_overhead.py [--repeats 3] [--steps 100] [--out benchmarks/results/search_overhead.md]

Part 1 -- overhead: the same pre-generated batches (K=4 synthetic Markov sources, so data loading
costs nothing) are trained on by (a) plain proxy training (``hypergrad="none"``), (b) FastMix with
the default one-pass head hypergradient scoring every trained token (``window``), (c) the head
hypergradient on a per-source buffer re-forwarded at the outer step (``buffer``) and (d) the
full-parameter variant (``full``, per-source autograd). Runs are interleaved, repeated, and each
variant's wall time is divided by the plain run of the same repeat.

Part 2 -- K scaling (K = 2, 8, 32, 128): (i) the one-pass scoring of one micro-batch for K sources,
(ii) the whole outer step of a FastMix run (target pass + z update), (iii) the end-to-end overhead
ratio, and for contrast (iv) the full-parameter variant's per-source inner products on a fixed
search batch, which grow linearly with K.

Timings are wall-clock on whatever machine runs this; the report records its CPU model and cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common  # noqa: E402  (benchmarks/: the script's own directory)

from fastmix_data.search import SearchConfig, TargetSet, run_method  # noqa: E402
from fastmix_data.search.hypergrad import (  # noqa: E402
    full_source_scores,
    full_target_gradient,
    head_gradient,
    per_token_source,
    source_head_scores,
)
from fastmix_data.search.model import build_proxy, proxy_config  # noqa: E402
from fastmix_data.search.synthetic import SyntheticStream, markov_sources, mixture_batches  # noqa: E402


def machine() -> str:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except Exception:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {dev}"


def mmm(xs):
    return f"{min(xs):.3g} / {statistics.median(xs):.3g} / {max(xs):.3g}"


def make_data(K, steps, B, L, seed=0):
    srcs = markov_sources(K, alphabet_size=16, shift=max(1, 200 // K), seed=seed)
    s = SyntheticStream(srcs, batch_size=B, seq_len=L, seed=seed)
    batches = [s.batch(i) for i in range(steps)]
    target = mixture_batches(srcs, [1.0] + [0.0] * (K - 1), num_batches=4, batch_size=B, seq_len=L)
    return batches, target, s.source_names


class Batches(list):
    """Pre-made search batches with their source names (the stream run_method trains on)."""

    def __init__(self, batches, names):
        super().__init__(batches)
        self.source_names = list(names)


def as_target(batches) -> TargetSet:
    """Target batches as one TargetSet (token-averaged, one group)."""
    tokens = torch.cat([b["tokens"] for b in batches])
    return TargetSet(tokens, torch.zeros(len(tokens), dtype=torch.int64), ["target"])


def search_config(steps, batch, seq_len, *, model="cpu", model_args=None, device="auto", dtype="auto",
                  compile=False, **fastmix) -> SearchConfig:
    """A FastMix config with the benchmarks' fixed schedule (an outer step every 20 micro-batches,
    after 20), so that every variant does the same work."""
    return SearchConfig.from_dict({
        "max_tokens": steps * batch * seq_len,
        "train": {"proxy": {"preset": model, **(model_args or {})}, "batch_size": batch, "seq_len": seq_len,
                  "device": device, "dtype": dtype, "compile": compile},
        "fastmix": {"outer_every": 20, "warmup_steps": 20, **fastmix},
        "output": {"progress": False, "plot": False}})


def run_fastmix(batches, target, names, c: SearchConfig):
    tgt = as_target(target) if c.fastmix.hypergrad != "none" else None
    return run_method(c, stream=Batches(batches, names), target=tgt)


def run(batches, target, names, *, steps, model, **kw):
    B, L = batches[0]["tokens"].shape[0], batches[0]["tokens"].shape[1] - 1
    return run_fastmix(batches, target, names, search_config(steps, B, L, model=model, **kw)).compute


def timeit(fn, n, warm=True):
    if warm:
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100, help="micro-batches per run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--model", default="cpu")
    ap.add_argument("--ks", default="2,8,32,128")
    ap.add_argument("--k-steps", type=int, default=60, help="micro-batches per run in the K-scaling part")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 is far less sensitive to other processes on the machine)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_overhead.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    B, L, steps = a.batch, a.seq_len, a.steps
    ks = [int(k) for k in a.ks.split(",")]
    t_start = time.time()
    lines = []
    p = lines.append

    # ------------------------------------------------------------------ part 1: overhead
    K = 4
    batches, target, names = make_data(K, steps, B, L)
    variants = {
        "plain": dict(hypergrad="none"),
        "fastmix head/window (default)": dict(hypergrad="head", search_batch="window"),
        "fastmix head/buffer m=4": dict(hypergrad="head", search_batch="buffer"),
        "fastmix full/buffer m=4": dict(hypergrad="full", search_batch="buffer"),
    }
    res = {v: [] for v in variants}
    for r in range(a.repeats):
        for v, kw in variants.items():
            res[v].append(run(batches, target, names, steps=steps, model=a.model, **kw))
            print(f"[overhead] repeat {r} {v}: {res[v][-1]['wall_s']:.2f}s", flush=True)
    plain = res["plain"]
    tok = steps * B * L
    # throughput of plain proxy training with every core (more exposed to other processes)
    thr = {}
    for n_threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n_threads)
        thr[n_threads] = [tok / run(batches, target, names, steps=steps, model=a.model, hypergrad="none")["wall_s"]
                          for _ in range(a.repeats)]
        print(f"[throughput] {n_threads} threads: {thr[n_threads]}", flush=True)
    torch.set_num_threads(a.threads)
    p(f"## 0. Proxy training throughput (preset `{a.model}`, {B}x{L} tokens per micro-batch, plain training)\n")
    p("| torch threads | tokens/s (min / median / max) |")
    p("|---|---|")
    for n_threads, xs in thr.items():
        p(f"| {n_threads} | {mmm(xs)} |")
    p("")
    p(f"## 1. Overhead over plain proxy training (K={K}, {steps} micro-batches of {B}x{L} tokens, outer step every 20, preset `{a.model}`)\n")
    p(f"torch threads: {a.threads}. Plain proxy training: {mmm([tok / c['wall_s'] for c in plain])} tokens/s "
      f"(min / median / max over {a.repeats} repeats). *Ratio of minima* = best FastMix wall / best plain wall "
      "(least disturbed by other processes); *paired* = per-repeat ratios.\n")
    p("| variant | wall s (min / med / max) | ratio of minima | wall ratio, paired (min / med / max) | FLOPs ratio | scored tokens | wall in scoring / outer steps, s (median) |")
    p("|---|---|---|---|---|---|---|")
    for v in variants:
        cs = res[v]
        ratio = [c["wall_s"] / q["wall_s"] for c, q in zip(cs, plain)]
        fr = cs[0]["flops"]["total"] / plain[0]["flops"]["total"]
        sc = statistics.median(c["details"]["wall_breakdown_s"]["score"] for c in cs)
        ou = statistics.median(c["details"]["wall_breakdown_s"]["outer"] for c in cs)
        rmin = min(c["wall_s"] for c in cs) / min(q["wall_s"] for q in plain)
        p(f"| {v} | {mmm([c['wall_s'] for c in cs])} | {rmin:.3f} | {mmm(ratio)} | {fr:.4f} | {cs[0]['tokens']['scored']} | {sc:.2f} / {ou:.2f} |")
    p("")

    # ------------------------------------------------------------------ part 2: K scaling
    torch.manual_seed(0)
    m = build_proxy(proxy_config(a.model))
    V = m.head.out_features
    toks = torch.randint(0, V, (B, L + 1))
    with torch.no_grad():
        h = m.final_hidden(toks[:, :-1])
        logits = m.head(h)
        G = head_gradient(h, toks[:, 1:], logits=logits).grad
    nfix = max(ks)  # fixed search batch for the full-parameter contrast: one sequence per source at max K
    search_toks = torch.randint(0, V, (nfix, 17))
    params = list(m.parameters())
    Gfull, _, _ = full_target_gradient(m, search_toks[:8], params)
    rows = []
    for K in ks:
        src = torch.arange(B) % K
        one = timeit(lambda K=K, src=src: source_head_scores(h, toks[:, 1:], per_token_source(src, L), G, K, logits=logits), 20)
        s_src = torch.arange(nfix) % K
        full = timeit(lambda K=K, s_src=s_src: full_source_scores(m, search_toks, s_src, Gfull, K, params), 1, warm=False)
        onefix = timeit(lambda K=K, s_src=s_src: source_head_scores(
            *_hl(m, search_toks), search_toks[:, 1:], per_token_source(s_src, 16), G, K, head_weight=m.head.weight), 5)
        kb, kt, kn = make_data(K, a.k_steps, B, L, seed=1)
        fm_runs, plain_runs = [], []
        for _ in range(a.repeats):
            plain_runs.append(run(kb, kt, kn, steps=a.k_steps, model=a.model, hypergrad="none"))
            fm_runs.append(run(kb, kt, kn, steps=a.k_steps, model=a.model, hypergrad="head"))
        outer = [c["details"]["wall_breakdown_s"]["outer"] / c["details"]["outer_steps"] * 1000 for c in fm_runs]
        score = [c["details"]["wall_breakdown_s"]["score"] / c["details"]["micro_batches"] * 1000 for c in fm_runs]
        ratio = [min(c["wall_s"] for c in fm_runs) / min(q["wall_s"] for q in plain_runs)]
        rows.append((K, one, score, outer, ratio, onefix, full))
        print(f"[K={K}] one-pass {statistics.median(one)*1e3:.2f} ms, outer {statistics.median(outer):.1f} ms, "
              f"ratio {ratio[0]:.3f}, full {statistics.median(full)*1e3:.0f} ms", flush=True)
    p(f"## 2. Cost vs number of sources K (preset `{a.model}`, micro-batch {B}x{L})\n")
    p("Columns, min / median / max: (i) one-pass head scores of one micro-batch, standalone; (ii) the same inside "
      "a FastMix run, per micro-batch; (iii) one outer step (target pass + z update) inside the run; (iv) wall "
      f"ratio FastMix/plain of the whole {a.k_steps}-micro-batch run (ratio of minima over {a.repeats} repeats); (v) one-pass vs (vi) full-parameter per-source "
      f"inner products on a fixed search batch of {nfix} sequences x 16 tokens holding all K sources "
      "((vi) timed once).\n")
    p("| K | (i) one-pass ms | (ii) in-run scoring ms/micro-batch | (iii) outer step ms | (iv) run ratio | (v) one-pass, fixed batch ms | (vi) full-parameter ms |")
    p("|---|---|---|---|---|---|---|")
    for K, one, score, outer, ratio, onefix, full in rows:
        p(f"| {K} | {mmm([x * 1e3 for x in one])} | {mmm(score)} | {mmm(outer)} | {ratio[0]:.3f} | "
          f"{mmm([x * 1e3 for x in onefix])} | {mmm([x * 1e3 for x in full])} |")
    p("")

    head = [
        "# FastMix search overhead",
        "",
        f"- machine: {machine()}",
        "- the machine is shared with other jobs: read minima (least disturbed) rather than maxima",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        "- command: `" + " ".join(["python benchmarks/search_overhead.py", *(argv if argv is not None else sys.argv[1:])]) + "`",
        f"- repeats: {a.repeats}; benchmark wall time {time.time() - t_start:.0f} s",
        "- FLOPs: 6N per trained token, 2N per evaluated token (target and search-batch forwards), plus the "
        "hypergradient matmuls (2Vd per scored or target token; 4N per backward token for the full variant); N "
        "excludes the input embedding.",
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    _common.write_atomic(a.out, text)
    print(text)


def _hl(m, toks):
    with torch.no_grad():
        return (m.final_hidden(toks[:, :-1]),)


if __name__ == "__main__":
    main()
