"""The proxy preset ladder on one accelerator: throughput, MFU, memory, FastMix's overhead, numerics.

Usage (one H100/H200; the whole report in one command, about 10 minutes including compilation and
the BPE encoding; the largest preset first, and the report is rewritten after every row):
    python benchmarks/proxy_ladder.py --out benchmarks/results/proxy_ladder.md
CPU smoke test at tiny sizes (proves the script end to end; not a measurement of the ladder):
    python benchmarks/proxy_ladder.py --device cpu --presets tiny --seq-lens 32,64 --tokens 512 \\
        --vocab 512 --steps 6 --outer-every 3 --repeats 1 --numerics tiny --head-shapes 256x512x32 \\
        --out /tmp/ladder_smoke.md

Data: real tokens. The demo corpus (five domains of the local Python installation's text, built in
seconds, no network) and a byte-level BPE of ``--vocab`` ids trained on its training split with
the ``tokenizers`` library (both cached under ``--work``); the searches get the BPE file as
``train.tokenizer``, the five domains as sources and the validation split of ``prose`` as target.

Sections of the report:

1. FLOPs per token (``fastmix_data.search.flops``: ``6N + 12 n_layer d L``, N with the head,
   without the input embedding) and FastMix's extra work at equal efficiency.
2. Throughput per preset and sequence length, ``--tokens`` tokens per micro-batch: whole searches
   through ``run_method`` -- the code path of ``fastmix-data search`` (the stream encoding the
   sources with the BPE, ProxyTrainer on ProxyStep: bf16 autocast, fused AdamW, compiled trunk and
   fused head on CUDA) --, plain proxy training (``fastmix.hypergrad=none``) and FastMix at its
   defaults with an outer step every ``--outer-every`` micro-batches (``--fastmix-args`` overrides,
   e.g. ``target_batches_per_step=1``), interleaved, ``--repeats`` times after a warm-up search.
   tokens/s in the steady state (the trajectory's clock from the first outer step to the last),
   model TFLOP/s (training FLOPs only, so plain and FastMix are comparable), MFU against
   ``--peak-tflops`` (default: the device's dense bf16 datasheet peak, e.g. 989 for H100 SXM /
   H200), peak memory, FastMix/plain wall ratio per trained token (per repeat; min / median / max).
   ``--unfused`` adds the same two searches with ``train.fused_head=false``.
3. Numerics per ``--numerics`` preset: the bf16 target gradient and per-source scores on the device
   against the same computation in float64 on the CPU (same weights, same real tokens).
4. The head alone at ``--head-shapes`` (tokens x vocabulary x width): fused vs unfused, with and
   without scores: time and peak memory.

The report is rewritten after every row, so a run cut short (a device session's time limit) keeps
what it measured. Sections 3-5 time and check the pieces (ProxyStep, the fused head) directly.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common  # noqa: E402  (benchmarks/: the script's own directory)

from fastmix_data.search.flops import peak_tflops, proxy_token_flops  # noqa: E402
from fastmix_data.search.fused_head import fused_head_loss  # noqa: E402
from fastmix_data.search.hypergrad import source_head_scores, token_losses  # noqa: E402
from fastmix_data.search.model import build_proxy, count_params, proxy_config  # noqa: E402
from fastmix_data.search.proxy_step import ProxyStep  # noqa: E402

TARGET_DOMAIN = "prose"


def mmm(xs, fmt="{:.3g}"):
    return " / ".join(fmt.format(x) for x in (min(xs), statistics.median(xs), max(xs)))


# ---------------------------------------------------------------------------- real-token data


def bpe_vocabulary(work: Path, vocab: int):
    """The demo corpus under ``work`` and a byte-level BPE of ``vocab`` ids trained on it (cached)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fastmix_data.corpus import build_corpus, load_corpus_manifest, read_split_texts
    from fastmix_data.search.vocab import load_tokenizer

    corpus = work / "corpus"
    if not (corpus / "corpus.json").exists():
        build_corpus(corpus, progress=False)
    path = work / f"bpe-{vocab}.json"
    if not path.exists():
        domains = list(load_corpus_manifest(corpus)["domains"])
        texts = [t for d in domains for t in read_split_texts(corpus, "train", d)]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        tok.save(str(path))
    return corpus, load_tokenizer(path)


def real_batches(corpus: Path, voc, L: int, B: int, n: int, n_target: int):
    """``n`` search batches ``(tokens [B, L+1], source [B])`` over the corpus's domains and
    ``n_target`` target batches from the validation split of TARGET_DOMAIN, in BPE ids."""
    from fastmix_data.corpus import load_corpus_manifest
    from fastmix_data.stream import MixtureStream

    domains = list(load_corpus_manifest(corpus)["domains"])
    srcs = {d: str(corpus / "train" / d / "*.parquet") for d in domains}
    kw = dict(seq_len=L, tokenizer=voc.tokenizer, world_size=1, rank=0)
    search = MixtureStream(srcs, {d: 1.0 for d in domains}, batch_size=B, seed=0, **kw)
    target = MixtureStream({"t": str(corpus / "validation" / TARGET_DOMAIN / "*.parquet")}, {"t": 1.0},
                           batch_size=max(1, B // 2), seed=1, **kw)
    batches = [(b["tokens"], b["source"]) for b in itertools.islice(search, n)]
    targets = [b["tokens"] for b in itertools.islice(target, n_target)]
    return batches, targets, domains


# ---------------------------------------------------------------------------- 2. throughput


def search_config(a, preset: str, L: int, B: int, *, fused: bool, hypergrad: str, data: dict) -> dict:
    """The config of one timed search: exactly what ``fastmix-data search`` builds from flags
    (``--proxy PRESET[,overrides] --tokenizer BPE --batch-size B --seq-len L --max-tokens ...``)."""
    spec = ",".join([preset] + [f"{k}={v}" for k, v in a.model_args.items()])
    return {
        "method": "fastmix", "max_tokens": a.steps * B * L, "sources": data["sources"],
        "train": {"proxy": spec, "tokenizer": data["tokenizer"], "batch_size": B, "seq_len": L, "lr": a.lr,
                  "device": a.device, "compile": a.compile_on, "fused_head": fused},
        "target": {"path": data["target"], "max_seqs": a.target_seqs},
        "fastmix": {"hypergrad": hypergrad, "warmup_steps": 0, "outer_every": a.outer_every, **a.fastmix_args},
        "output": {"progress": False, "plot": False},
    }


def timed_search(cfg: dict, dev) -> dict:
    """One search through ``run_method`` (the command line's code path, no output directory):
    steady-state seconds per trained token from its trajectory (the wall clock between the first
    outer step -- compilation and the first target pass are before it -- and the last), the
    process's CPU time for the whole run, and the peak memory above what was resident at the start."""
    from fastmix_data.search import run_method

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    c0 = time.process_time()
    r = run_method(cfg)
    cpu = time.process_time() - c0
    recs = [x for x in r.trajectory if x["tokens"] > 0]
    first, last = recs[0], recs[-1]
    out = {"tokens": last["tokens"] - first["tokens"], "wall": last["wall_s"] - first["wall_s"], "cpu": cpu,
           "phases": r.details.get("wall_breakdown_s", {}), "state": 16 * count_params(r.model)["total"] / 2**30}
    if dev.type == "cuda":
        out["peak"] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    return out


def contenders_of(a) -> list[tuple[str, bool, str]]:
    """``(name, fused head, fastmix.hypergrad)`` of the searches section 2 interleaves: plain proxy
    training is FastMix's loop with ``hypergrad=none``."""
    out = [("plain", True, "none"), ("fastmix", True, "head")]
    if a.unfused:
        out += [("plain-unfused", False, "none"), ("fastmix-unfused", False, "head")]
    return out


def measure_cell(a, preset, L, data, dev):
    """One preset at one sequence length: ``{run: [timed_search results]}``, a warm-up search each
    (compilation caches, allocator), then ``a.repeats`` interleaved rounds in rotating order."""
    B = max(1, a.tokens // L)
    contenders = contenders_of(a)
    runs = {c[0]: [] for c in contenders}
    cfgs = {name: search_config(a, preset, L, B, fused=fused, hypergrad=hg, data=data) for name, fused, hg in contenders}
    for name, _, _ in contenders if dev.type == "cuda" or a.compile_on else ():  # warm-up: compilation, allocator
        timed_search({**cfgs[name], "max_tokens": 2 * a.outer_every * B * L}, dev)
    for r in range(a.repeats):
        for name, _, _ in contenders[r % len(contenders):] + contenders[: r % len(contenders)]:
            runs[name].append(timed_search(cfgs[name], dev))
    return B, runs


def _throughput_header(a, dev, bf16, peak, p) -> None:
    p(f"## 2. Throughput: searches through run_method ({a.steps} micro-batches of {a.tokens} tokens per search, K=5 "
      f"BPE sources, outer step every {a.outer_every}; {a.repeats} repeats{', after a warm-up search each' if dev.type == 'cuda' or a.compile_on else ''}; min / median / max)\n")
    p(f"Each row is a whole search as the command line runs it (`run_method`: the stream BPE-encodes the sources, "
      f"ProxyTrainer/ProxyStep trains; dtype {'bf16 autocast' if bf16 else 'float32'}, compile={a.compile_on}, "
      f"proxy overrides {a.model_args or {}}, FastMix overrides {a.fastmix_args or {}}). plain = the same loop with "
      "`fastmix.hypergrad=none`; fastmix = its defaults (residual signal, target passes sized to the window) "
      "unless overridden. tokens/s: steady state, from the trajectory's clock between the first outer step and "
      "the last (compilation and setup excluded; on a GPU a warm-up search first); data loading (BPE encoding in the loop's thread) included. "
      f"TFLOP/s and MFU count training FLOPs only (6N + 12 n_layer d L per token); MFU against "
      f"{f'{peak:g} TFLOP/s' if peak else 'no peak (not a GPU)'}.\n")
    p("Memory: the model's weights, gradients and AdamW state (16 bytes per parameter), and the peak allocated "
      "above everything resident when the search started.\n")
    cpu = dev.type == "cpu"
    if cpu:
        p("On the CPU the last column also gives the ratio of this process's CPU time over the whole search "
          "(setup included; one intra-op thread): much less disturbed by other jobs than wall time.\n")
    p("| preset | L | micro-batch | run | tokens/s | model TFLOP/s | MFU | memory GiB: state + peak above | "
      "/ plain wall (per repeat) | data s / all phases s (last repeat) |" + (" / plain CPU time |" if cpu else ""))
    p("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cpu else ""))


def _throughput_rows(a, preset, L, B, peak, cpu_clock, runs, p):
    cfg = proxy_config(preset, vocab_size=a.vocab_size, **a.model_args)
    f = proxy_token_flops(cfg, L)
    for name, _, _ in contenders_of(a):
        base = "plain" if "unfused" not in name else "plain-unfused"
        rs, rb = runs[name], runs[base]
        tps = [x["tokens"] / x["wall"] for x in rs]
        tf = [t * f.train / 1e12 for t in tps]
        per_tok = lambda x: x["wall"] / x["tokens"]  # noqa: E731
        ratio = [per_tok(x) / per_tok(y) for x, y in zip(rs, rb)]
        cratio = [x["cpu"] / y["cpu"] for x, y in zip(rs, rb)]
        peak_m = max((x.get("peak", -1) for x in rs), default=-1)
        ph = rs[-1]["phases"]
        data_s = ph.get("data", 0.0)
        loop_s = sum(ph.values())
        mfu_ = mmm([x / peak for x in tf], "{:.1%}") if peak else "n/a"
        p(f"| {preset} | {L} | {B}x{L} | {name} | {mmm(tps)} | {mmm(tf)} | {mfu_} | "
          f"{rs[0]['state']:.2f} + {'n/a' if peak_m < 0 else f'{peak_m:.1f}'} | "
          f"{'1' if name == base else mmm(ratio, '{:.3f}')} | {data_s:.1f} / {loop_s:.1f} |"
          + ((" 1 |" if name == base else f" {mmm(cratio, '{:.3f}')} |") if cpu_clock else ""))
        print(f"[throughput] {preset} L={L} {name}: {statistics.median(tps):.4g} tok/s, "
              f"{statistics.median(tf):.3g} TFLOP/s, ratio {statistics.median(ratio):.3f}", flush=True)
    per_tok = lambda x: x["wall"] / x["tokens"]  # noqa: E731
    plain_tf = statistics.median(x["tokens"] / x["wall"] * f.train / 1e12 for x in runs["plain"])
    return (plain_tf / peak if peak else None,
            statistics.median(per_tok(x) / per_tok(y) for x, y in zip(runs["fastmix"], runs["plain"])),
            statistics.median(x["cpu"] / y["cpu"] for x, y in zip(runs["fastmix"], runs["plain"])))


def throughput(a, dev, bf16, peak, data, lines, flush):
    """Section 2; returns {(preset, L): (plain MFU, FastMix/plain wall, FastMix/plain CPU time)} (medians)."""
    p = lines.append
    _throughput_header(a, dev, bf16, peak, p)
    summary = {}
    for preset in a.presets:
        for L in a.seq_lens:
            B = max(1, a.tokens // L)
            try:
                B, runs = measure_cell(a, preset, L, data, dev)
            except Exception as e:  # noqa: BLE001 -- report the row and go on
                print(f"[throughput] {preset} L={L}: {type(e).__name__}: {e}", flush=True)
                p(f"| {preset} | {L} | {B}x{L} | failed: {type(e).__name__}: {str(e)[:100]} | | | | | | |")
                flush()
                continue
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            summary[(preset, L)] = _throughput_rows(a, preset, L, B, peak, dev.type == "cpu", runs, p)
            flush()
    p("")
    return summary


# ---------------------------------------------------------------------------- 3. the head alone


def head_runs(N, V, d, dev, bf16, K=5):
    """``({name: fn}, W)``: the head's loss + backward, fused vs unfused, with and without scores."""
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(N, d, generator=g).to(dev)
    W = torch.nn.Parameter((torch.randn(V, d, generator=g) / d**0.5).to(dev))
    y = torch.randint(0, V, (N,), generator=g).to(dev)
    src = torch.randint(0, K, (N,), generator=g).to(dev)
    w = torch.full((N,), 1.0 / N, device=dev)
    G = (torch.randn(V, d, generator=g) * 1e-3).to(dev)
    ac = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast(dev.type, enabled=False))
    hdt = torch.bfloat16 if bf16 else torch.float32

    def unfused(score):
        h = h0.to(hdt).requires_grad_(True)
        with ac():
            logits = h @ W.T
        loss = (w * token_losses(logits, y)).sum()
        loss.backward()
        if score:
            source_head_scores(h.detach(), y, src, G, K, logits=logits.detach())

    def fused(score):
        h = h0.to(hdt).requires_grad_(True)
        with ac():
            out = fused_head_loss(h, W, y, w, G=G if score else None)
        out.loss.backward()
        if score:
            torch.zeros(K, dtype=torch.float64, device=dev).index_add_(0, src, out.scores.double())

    runs = {"unfused": lambda: unfused(False), "unfused + scores": lambda: unfused(True),
            "fused": lambda: fused(False), "fused + scores": lambda: fused(True)}
    return runs, W


def head_bench(N, V, d, dev, bf16, repeats, K=5):
    """Seconds (median) and peak memory of the head's loss + backward, fused vs unfused, +- scores."""
    runs, W = head_runs(N, V, d, dev, bf16, K)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in runs}
    mem: dict[str, float] = {}
    for fn in runs.values():  # warm-up
        fn()
        W.grad = None
    for r in range(repeats):
        for name, fn in list(runs.items())[r % 4:] + list(runs.items())[: r % 4]:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync()
            t0 = time.perf_counter() if dev.type == "cuda" else time.process_time()
            fn()
            sync()
            times[name].append((time.perf_counter() if dev.type == "cuda" else time.process_time()) - t0)
            if dev.type == "cuda":
                mem[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
            W.grad = None
    return {k: statistics.median(v) for k, v in times.items()}, mem, {k: v for k, v in times.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _head_memory_child(N, V, d, name) -> float:
    """In a fresh process: GiB of peak resident memory above what the inputs hold, for one run."""
    import resource

    torch.set_num_threads(1)
    runs, _ = head_runs(N, V, d, torch.device("cpu"), False)
    base = _rss()
    runs[name]()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30


def head_memory_cpu(N, V, d) -> dict[str, float]:
    """Peak RSS above the inputs of each head run, each in its own spawned process (CPU)."""
    import multiprocessing as mp

    out = {}
    ctx = mp.get_context("spawn")
    for name in ("unfused", "unfused + scores", "fused", "fused + scores"):
        with ctx.Pool(1) as pool:
            out[name] = pool.apply(_head_memory_child, (N, V, d, name))
    return out


def head_memory_section(a, lines, flush):
    p = lines.append
    p("## 5. The head alone: peak memory on the CPU (resident set above the inputs, one fresh process per run)\n")
    p("Float32. The fused head keeps one chunk of logits (`2^26 / V` tokens) instead of `[N, V]`.\n")
    p("| N x V x d | unfused | unfused + scores | fused | fused + scores | [N, V] fp32 GiB |")
    p("|---|---|---|---|---|---|")
    for shape in a.head_memory:
        N, V, d = (int(x) for x in shape.split("x"))
        m = head_memory_cpu(N, V, d)
        print(f"[head memory] {shape}: {m}", flush=True)
        p(f"| {N}x{V}x{d} | {m['unfused']:.2f} | {m['unfused + scores']:.2f} | {m['fused']:.2f} | "
          f"{m['fused + scores']:.2f} | {N * V * 4 / 2**30:.2f} |")
        flush()
    p("")


def head_section(a, dev, bf16, lines, flush):
    p = lines.append
    clock = "wall" if dev.type == "cuda" else "process CPU time, one thread"
    p(f"## 4. The head alone: loss + backward, with and without FastMix's scores ({a.head_repeats} interleaved repeats, median ms of {clock})\n")
    p("unfused = logits materialised, float32 cross-entropy, backward through autograd, scores by a separate "
      "one-pass over the logits (the trainer's path before the fused head); fused = `fused_head_loss` "
      f"(chunked, scores folded in). dtype {'bf16 autocast' if bf16 else 'float32'}. Memory: peak allocated "
      "above the inputs (CUDA only); `[N, V]` = the bytes of one float32 logits matrix for scale.\n")
    p("| N x V x d | unfused | unfused + scores | fused | fused + scores | scores' cost: unfused / fused | fused+scores / unfused plain | peak GiB (unfused+scores / fused+scores) | [N, V] fp32 GiB |")
    p("|---|---|---|---|---|---|---|---|---|")
    for shape in a.head_shapes:
        N, V, d = (int(x) for x in shape.split("x"))
        med, mem, _ = head_bench(N, V, d, dev, bf16, a.head_repeats)
        ms = {k: v * 1e3 for k, v in med.items()}
        mm = "n/a" if not mem else f"{mem['unfused + scores']:.2f} / {mem['fused + scores']:.2f}"
        p(f"| {N}x{V}x{d} | {ms['unfused']:.1f} | {ms['unfused + scores']:.1f} | {ms['fused']:.1f} | {ms['fused + scores']:.1f} | "
          f"{med['unfused + scores'] / med['unfused']:.3f} / {med['fused + scores'] / med['fused']:.3f} | "
          f"{med['fused + scores'] / med['unfused']:.3f} | {mm} | {N * V * 4 / 2**30:.2f} |")
        print(f"[head] {shape}: {ms}", flush=True)
        flush()
    p("")


# ---------------------------------------------------------------------------- 4. numerics


def numerics(preset, vocab, margs, dev, bf16, batches, targets, K):
    """Relative errors of the device's (bf16) target gradient and per-source scores against float64 on the CPU."""
    model = build_proxy(proxy_config(preset, vocab_size=vocab, **margs), seed=0)
    ref = ProxyStep(build_proxy(proxy_config(preset, vocab_size=vocab, **margs), seed=0).double(), K)
    dut = ProxyStep(model, K, device=dev, bf16=bf16)
    tokens, source = batches[0]
    target = targets[0]
    ones = torch.ones(K)
    G_ref = ref.head_gradient(target).grad
    s_ref = ref.score_batch(tokens, source, G_ref).means()  # = the fused scores in float64 (tested), forward only
    G_dut = dut.head_gradient(target.to(dev)).grad
    s_dut = dut.micro_step(tokens.to(dev), source.to(dev), ones.to(dev), G=G_dut).scores.means().cpu()

    def rel(x, y):
        x, y = x.double().cpu(), y.double().cpu()
        ok = ~torch.isnan(y)
        return float((x[ok] - y[ok]).norm() / y[ok].norm())

    ok = ~torch.isnan(s_ref)
    return {"G": rel(G_dut, G_ref), "scores": rel(s_dut, s_ref),
            "rank": bool(torch.equal(s_dut[ok].argsort(), s_ref[ok].argsort())),
            "tokens": f"{tokens.shape[0]}x{tokens.shape[1] - 1} scored, {target.shape[0]}x{target.shape[1] - 1} target"}


# ---------------------------------------------------------------------------- main


def flops_section(a, lines):
    p = lines.append
    p("## 1. FLOPs per token (analytic)\n")
    p(f"Vocabulary {a.vocab_size}. Train = 6N + 12 n_layer d L; score = 2 V d per trained token; a target or "
      "held-out token = a forward + 2 V d. At equal efficiency FastMix takes 1 + score + its extra passes of plain "
      "training's time. At its defaults (residual signal, target passes sized to the window) it forwards about "
      "one target and one held-out training sequence per trained sequence; lean = one target batch of half a "
      f"micro-batch per {a.outer_every} micro-batches and no residual (`--fastmix-args "
      f"target_batches_per_step=1,residual=false` with `target.batch_size` = B/2).\n")
    p("| preset | parameters (total / N) | L | train GFLOP/token | score | FastMix/plain at equal efficiency: defaults | lean |")
    p("|---|---|---|---|---|---|---|")
    for preset in a.presets:
        cfg = proxy_config(preset, vocab_size=a.vocab, **a.model_args)
        with torch.device("meta"):
            n = count_params(build_proxy(cfg))
        for L in a.seq_lens:
            f = proxy_token_flops(cfg, L)
            lean = 1 + f.score / f.train + 0.5 / a.outer_every * f.target / f.train
            defaults = 1 + (f.score + 2 * f.target) / f.train
            p(f"| {preset} | {n['total'] / 1e6:.3g}M / {n['flops'] / 1e6:.3g}M | {L} | {f.train / 1e9:.3g} | "
              f"{f.score / f.train:.1%} | {defaults:.3f} | {lean:.3f} |")
    p("")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--presets", default="p150m,p60m,p20m", type=lambda s: s.split(","),
                    help="largest first: a run cut short has the targets' row")
    ap.add_argument("--model-args", default="", help="ProxyConfig overrides for every preset, e.g. tie_embeddings=1,activation_checkpointing=1")
    ap.add_argument("--seq-lens", default="1024,2048", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per micro-batch (B = tokens / L)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=20, help="micro-batches per timed run")
    ap.add_argument("--outer-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="auto: on for CUDA")
    ap.add_argument("--unfused", action="store_true", help="also time the unfused head (train.fused_head=false)")
    ap.add_argument("--fastmix-args", default="", help="FastMix overrides of the timed searches, e.g. "
                    "target_batches_per_step=1,residual=false (default: its defaults)")
    ap.add_argument("--target-seqs", type=int, default=1024, help="target.max_seqs of the timed searches")
    ap.add_argument("--head-shapes", default="16384x32000x512,16384x32000x1024", type=lambda s: [x for x in s.split(",") if x])
    ap.add_argument("--head-repeats", type=int, default=5)
    ap.add_argument("--head-memory", default="", type=lambda s: [x for x in s.split(",") if x],
                    help="CPU only: head shapes whose peak memory is measured in fresh processes, e.g. 16384x32000x512")
    ap.add_argument("--sections", default="flops,throughput,numerics,head",
                    type=lambda s: set(s.split(",")), help="any of flops,throughput,numerics,head,head-memory")
    ap.add_argument("--numerics", default="p20m,p150m", type=lambda s: [x for x in s.split(",") if x])
    ap.add_argument("--peak-tflops", type=float, default=None, help="default: the device's dense bf16 datasheet peak")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    ap.add_argument("--work", default="out/proxy_ladder", help="cache of the corpus and the BPE")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "proxy_ladder.md"))
    a = ap.parse_args(argv)
    a.model_args = {k: int(v) if v.isdigit() else v for k, v in (x.split("=") for x in a.model_args.split(",") if x)}
    for k in ("tie_embeddings", "activation_checkpointing"):
        if k in a.model_args:
            a.model_args[k] = str(a.model_args[k]).lower() in ("1", "true")
    from fastmix_data.search.config import _number

    a.fastmix_args = {k: _number(v) for k, v in (x.split("=") for x in a.fastmix_args.split(",") if x)}
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu (a smoke test at tiny sizes, see the docstring)")
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = dev.type == "cuda"
    bf16 = cuda
    compile_ = a.compile == "on" or (a.compile == "auto" and cuda)
    a.compile_on = compile_
    peak = a.peak_tflops or (peak_tflops(torch.cuda.get_device_name(dev)) if cuda else None)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64
    rev, t_start, load0 = _common.git_revision(str(Path(__file__).resolve().parents[1])), time.time(), _load()
    lines: list[str] = []

    def flush(final: bool = False) -> None:
        """Rewrite the report with what is measured so far (a run cut short keeps its rows)."""
        text = "\n".join(_header(a, argv, dev, rev, load0, t_start, voc, domains, final) + lines) + "\n"
        _common.write_atomic(a.out, text)
        if final:
            print(text)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus, voc = bpe_vocabulary(work, a.vocab)
    from fastmix_data.corpus import load_corpus_manifest

    domains = list(load_corpus_manifest(corpus)["domains"])
    a.vocab_size = voc.size
    search_data = {"sources": {d: str(corpus / "train" / d / "*.parquet") for d in domains},
                   "target": str(corpus / "validation" / TARGET_DOMAIN / "*.parquet"),
                   "tokenizer": str(work / f"bpe-{a.vocab}.json")}
    print(f"[data] BPE {voc.size} ids, domains {domains}", flush=True)

    if "flops" in a.sections:
        flops_section(a, lines)
        flush()
    summary = throughput(a, dev, bf16, peak, search_data, lines, flush) if "throughput" in a.sections else {}

    p = lines.append
    if a.numerics and "numerics" in a.sections:
        L0 = min(a.seq_lens)
        batches, targets, doms = real_batches(corpus, voc, L0, max(1, a.tokens // L0), 1, 1)
        K = len(doms)
        small = [(t[:4], s[:4]) for t, s in batches[:1]]
        p(f"## 3. Numerics: {'bf16 on ' + a.device if bf16 else a.device + ' float32'} vs float64 on the CPU (same weights, real tokens, L={L0})\n")
        p("Relative error = ||device - ref|| / ||ref||, over the target head gradient and the per-source mean scores.\n")
        p("| preset | tokens | target gradient rel. error | per-source scores rel. error | sources ranked the same |")
        p("|---|---|---|---|---|")
        for preset in a.numerics:
            n = numerics(preset, a.vocab, a.model_args, dev, bf16, small, [targets[0][:4]], K)
            print(f"[numerics] {preset}: {n}", flush=True)
            p(f"| {preset} | {n['tokens']} | {n['G']:.2e} | {n['scores']:.2e} | {n['rank']} |")
            flush()
        p("")
    if "head" in a.sections:
        head_section(a, dev, bf16, lines, flush)
    if "head-memory" in a.sections and a.head_memory:
        head_memory_section(a, lines, flush)

    if summary:
        top = max(a.presets, key=lambda q: _flops_n(a, q))
        p("## Targets (largest preset)\n")
        for L in a.seq_lens:
            if (top, L) in summary:
                mfu_, ratio, cratio = summary[(top, L)]
                mfu_s = "n/a (no peak)" if mfu_ is None else f"{mfu_:.1%} ({'met' if mfu_ >= 0.40 else 'NOT met'})"
                p(f"- {top}, L={L}: plain training MFU {mfu_s} (target >= 40 %); FastMix/plain wall "
                  f"{ratio:.3f} ({'met' if ratio <= 1.2 else 'NOT met'}; target <= 1.2)"
                  + (f"; CPU time {cratio:.3f}" if not cuda else ""))
        p("")

    flush(final=True)


def _flops_n(a, preset: str) -> int:
    """Matmul parameters of ``preset`` at the run's vocabulary (on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return count_params(build_proxy(proxy_config(preset, vocab_size=a.vocab_size, **a.model_args)))["flops"]


def _header(a, argv, dev, rev, load0, t_start, voc, domains, final) -> list[str]:
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), CUDA {torch.version.cuda}"
    else:
        m = _common.machine_info()
        where = f"CPU {m['cpu']}, {m['cores']}, {torch.get_num_threads()} torch threads (not a GPU measurement)"
    cmd = _common.command_line() if argv is None else "python benchmarks/proxy_ladder.py " + " ".join(argv)
    return [
        "# Proxy preset ladder" + ("" if dev.type == "cuda" else " (CPU run)") + ("" if final else " (run in progress or cut short)"),
        "",
        f"- machine: {where}; torch {torch.__version__}",
        f"- date: {_common.today()}; fastmix_data {rev}",
        f"- command: `{cmd}`",
        f"- load (1-min average) at start {load0}, now {_load()}; benchmark wall time so far {time.time() - t_start:.0f} s",
        f"- data: BPE of {voc.size} ids trained on the demo corpus; {len(domains)} sources ({', '.join(domains)}); "
        f"target: validation `{TARGET_DOMAIN}`",
        "",
    ]


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
