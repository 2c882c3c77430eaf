"""The proxy trainer on a GPU: numerics against an fp64 CPU reference, search agreement, throughput.

Usage:
    python benchmarks/proxy_gpu.py [--repeats 3] [--out benchmarks/results/proxy_gpu.md]

1. Numerics: the target head gradient and the one-pass per-source scores computed on the GPU under
   bf16 autocast (the trainer's default there) against the same computation in fp64 on the CPU,
   same weights and tokens: relative error and whether the sources rank the same.
2. Search agreement: the same FastMix search (K=4 synthetic Markov sources, target = source 0) on
   the CPU in fp32, and on the GPU in bf16 and fp32: final weights and their L1 distance.
3. Throughput of plain proxy training and of a FastMix search (head hypergradient, window) on the
   same pre-generated batches, per preset, micro-batch shape, dtype and ``torch.compile``:
   tokens/s (min / median / max over repeats, each run timed after a warm-up run of the same
   shape), the FastMix/plain wall ratio (ratio of minima), and achieved model TFLOP/s (6N per
   trained token plus the hypergradient matmuls, as the trainer counts them).

4. Reproducibility: two identical fresh searches, with torch's default algorithms and with
   ``torch.use_deterministic_algorithms(True)``: the largest differences of weights and parameters.

Made for CUDA; ``--device cpu`` runs the same code on the CPU (a smoke test of this script, not a
measurement). Prints what it measured and writes a markdown report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common  # noqa: E402  (benchmarks/: the script's own directory)

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # lets section 4 turn on deterministic cuBLAS

from search_overhead import make_data, run_fastmix, search_config  # noqa: E402  (K Markov sources; target = source 0)

from fastmix_data.search.hypergrad import head_gradient, per_token_source, source_head_scores  # noqa: E402
from fastmix_data.search.model import build_proxy, proxy_config  # noqa: E402


def mmm(xs, fmt="{:.3g}"):
    return " / ".join(fmt.format(x) for x in (min(xs), statistics.median(xs), max(xs)))


def search(batches, target, names, **kw):
    """One run_search over the given batches; returns its compute record and final weights."""
    r = search_result(batches, target, names, **kw)
    return r.compute, r.weights


def search_result(batches, target, names, **kw):
    """One FastMix search over the given batches (outer step every 20 micro-batches, after 20)."""
    B, L = batches[0]["tokens"].shape[0], batches[0]["tokens"].shape[1] - 1
    c = search_config(len(batches), B, L, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return run_fastmix(batches, target, names, c)


# ---------------------------------------------------------------------------- 1. numerics


def numerics(dev, K=8, B=16, L=256, preset="gpu", vocab=32000):
    """Relative errors of the GPU bf16 head gradient and source scores vs fp64 on the CPU."""
    torch.manual_seed(0)
    cfg = proxy_config(preset, vocab_size=vocab)
    ref = build_proxy(cfg, seed=0).double()
    gpu = build_proxy(cfg, seed=0).to(dev)
    toks = torch.randint(0, vocab, (B, L + 1))
    tgt = torch.randint(0, vocab, (B, L + 1))
    src = torch.arange(B) % K

    def scores(model, dev, autocast, dtype):
        x, y = toks[:, :-1].to(dev), toks[:, 1:].to(dev)
        tx, ty = tgt[:, :-1].to(dev), tgt[:, 1:].to(dev)
        with torch.no_grad(), autocast():
            h_t = model.final_hidden(tx)
            z_t = model.head(h_t)
            h = model.final_hidden(x)
            z = model.head(h)
        G = head_gradient(h_t, ty, logits=z_t, dtype=dtype).grad
        s = source_head_scores(h, y, per_token_source(src.to(dev), L), G, K, logits=z)
        return G.double().cpu(), s.means().double().cpu()

    G_ref, s_ref = scores(ref, "cpu", nullcontext, torch.float64)
    G_bf, s_bf = scores(gpu, dev, lambda: torch.autocast(dev, dtype=torch.bfloat16), torch.float32)
    G_32, s_32 = scores(gpu, dev, nullcontext, torch.float32)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    return {
        "G bf16": rel(G_bf, G_ref), "scores bf16": rel(s_bf, s_ref),
        "G fp32": rel(G_32, G_ref), "scores fp32": rel(s_32, s_ref),
        "rank bf16": bool(torch.equal(s_bf.argsort(), s_ref.argsort())),
        "rank fp32": bool(torch.equal(s_32.argsort(), s_ref.argsort())),
        "shape": f"preset `{preset}` (vocab {vocab}), K={K}, {B}x{L} tokens scored, {B}x{L} target tokens",
    }


# ---------------------------------------------------------------------------- 4. reproducibility


def reproducibility(dev, steps=100):
    """Two identical fresh searches, with torch's default and with deterministic algorithms:
    the largest difference of their final weights and of their proxy parameters."""
    batches, target, names = make_data(4, steps, 16, 128, seed=2)
    out = {}
    for mode in ("default", "deterministic"):
        torch.use_deterministic_algorithms(mode == "deterministic")
        try:
            a, b = (search_result(batches, target, names, device=dev, model="cpu", hypergrad="head") for _ in range(2))
        finally:
            torch.use_deterministic_algorithms(False)
        dw = max(abs(a.weights[k] - b.weights[k]) for k in names)
        dp = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.model.parameters(), b.model.parameters()))
        out[mode] = (dw, dp)
    return out


# ---------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="micro-batches per timed run")
    ap.add_argument("--agree-steps", type=int, default=200, help="micro-batches of the agreement runs")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "proxy_gpu.md"))
    a = ap.parse_args(argv)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("proxy_gpu.py measures a CUDA device and none is available (--device cpu for a smoke test)")
    t_start = time.time()
    torch._dynamo.config.cache_size_limit = 64  # one proxy per run: keep compiled code, never fall back to eager
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are true fp32
    lines: list[str] = []
    p = lines.append

    # 1. numerics
    n = numerics(dev)
    print("[numerics]", n, flush=True)
    p("## 1. Numerics: GPU vs fp64 on the CPU\n")
    p(f"{n['shape']}; same weights and tokens. Relative error = ||gpu - ref|| / ||ref||.\n")
    p("| GPU compute | target head gradient rel. error | per-source scores rel. error | sources ranked the same |")
    p("|---|---|---|---|")
    p(f"| bf16 autocast (trainer default on CUDA) | {n['G bf16']:.2e} | {n['scores bf16']:.2e} | {n['rank bf16']} |")
    p(f"| fp32 | {n['G fp32']:.2e} | {n['scores fp32']:.2e} | {n['rank fp32']} |")
    p("")

    # 2. agreement
    K = 4
    batches, target, names = make_data(K, a.agree_steps, 16, 128)
    rows = []
    for label, kw in (("CPU fp32", dict(device="cpu", dtype="float32")),
                      (f"{dev} bf16", dict(device=dev, dtype="bfloat16")),
                      (f"{dev} fp32", dict(device=dev, dtype="float32"))):
        comp, w = search(batches, target, names, model="cpu", hypergrad="head", **kw)
        rows.append((label, w, comp["wall_s"]))
        print(f"[agree] {label}: {w} in {comp['wall_s']:.1f}s", flush=True)
    base = rows[0][1]
    p(f"## 2. Search agreement (K={K} Markov sources, target = {names[0]}, {a.agree_steps} micro-batches of 16x128, preset `cpu`)\n")
    p("| run | " + " | ".join(names) + " | L1 to CPU fp32 | wall s |")
    p("|---|" + "---|" * len(names) + "---|---|")
    for label, w, wall in rows:
        l1 = sum(abs(w[k] - base[k]) for k in names)
        p(f"| {label} | " + " | ".join(f"{w[k]:.4f}" for k in names) + f" | {l1:.3g} | {wall:.1f} |")
    p("")

    # 3. throughput
    shapes = [("cpu", None, 16, 128), ("gpu", 32000, 16, 128), ("gpu", 32000, 32, 1024)]
    combos = [("float32", False), ("bfloat16", False)] + ([] if a.no_compile else [("bfloat16", True)])
    p(f"## 3. Throughput ({a.steps} micro-batches per run, K=4, outer step every 20; min / median / max over {a.repeats} repeats)\n")
    p("bfloat16 = bf16 autocast (the trainer's default on CUDA). TFLOP/s counts the trainer's own FLOPs (6N per trained token, "
      "N without the input embedding, plus the hypergradient matmuls) over wall time.\n")
    p("| preset (vocab) | micro-batch | dtype | compile | plain tokens/s | FastMix tokens/s | FastMix/plain wall | FastMix TFLOP/s (best) |")
    p("|---|---|---|---|---|---|---|---|")
    for preset, vocab, B, L in shapes:
        margs = {} if vocab is None else {"vocab_size": vocab}
        batches, target, names = make_data(4, a.steps, B, L, seed=1)
        tok = a.steps * B * L
        for dtype, comp in combos:
            kw = dict(device=dev, dtype=dtype, compile=comp, model=preset, model_args=margs)
            res = {"none": [], "head": []}
            try:
                for hg in res:  # warm-up (and compilation) of both variants
                    search(batches, target, names, hypergrad=hg, **kw)
                for _ in range(a.repeats):
                    for hg in res:
                        res[hg].append(search(batches, target, names, hypergrad=hg, **kw)[0])
            except Exception as e:  # noqa: BLE001 -- report and go on with the other rows
                print(f"[throughput] {preset} {B}x{L} {dtype} compile={comp}: {type(e).__name__}: {e}", flush=True)
                p(f"| {preset} ({vocab or 'bytes'}) | {B}x{L} | {dtype} | {comp} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
                continue
            plain = [tok / c["wall_s"] for c in res["none"]]
            fm = [tok / c["wall_s"] for c in res["head"]]
            ratio = min(c["wall_s"] for c in res["head"]) / min(c["wall_s"] for c in res["none"])
            tf = max(c["flops"]["total"] / c["wall_s"] for c in res["head"]) / 1e12
            print(f"[throughput] {preset} {B}x{L} {dtype} compile={comp}: plain {statistics.median(plain):.3g} "
                  f"fastmix {statistics.median(fm):.3g} ratio {ratio:.3f} {tf:.1f} TFLOP/s", flush=True)
            p(f"| {preset} ({vocab or 'bytes'}) | {B}x{L} | {dtype} | {comp} | {mmm(plain)} | {mmm(fm)} | {ratio:.3f} | {tf:.1f} |")
    p("")

    # 4. reproducibility
    rep = reproducibility(dev)
    print("[reproducibility]", rep, flush=True)
    p("## 4. Reproducibility: two identical fresh searches (K=4, 100 micro-batches of 16x128, preset `cpu`)\n")
    p("| torch algorithms | max weight difference | max proxy parameter difference |")
    p("|---|---|---|")
    for mode, (dw, dp) in rep.items():
        p(f"| {mode} | {dw:.3g} | {dp:.3g} |")
    p("")

    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), CUDA {torch.version.cuda}"
    else:
        where = "CPU (smoke test, not a measurement)"
    head = [
        "# Proxy trainer on a GPU",
        "",
        f"- machine: {where}, torch {torch.__version__}",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        "- command: `" + " ".join(["python benchmarks/proxy_gpu.py", *(argv if argv is not None else sys.argv[1:])]) + "`",
        f"- benchmark wall time {time.time() - t_start:.0f} s",
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    _common.write_atomic(a.out, text)
    print(text)


if __name__ == "__main__":
    main()
