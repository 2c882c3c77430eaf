"""`fastmix-data demo`: the whole product on the embedded default corpus, in a few minutes on CPU.

1. build a five-domain corpus from the running Python installation (fastmix_data.corpus);
   training data as Parquet (code, docstrings, tests) and WebDataset tars (prose, markup);
2. plant a target: held-out text drawn from known proportions of the domains;
3. run a FastMix search: the search stream serves the domains uniformly (packed byte sequences),
   the proxy learns, and every outer step pushes the current weights into a *training job's*
   MixtureStream, which keeps streaming under those live weights;
4. write weights, trajectory, plot, the job stream's telemetry, a manifest of the final mixture,
   and a summary.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fastmix_data.corpus import build_corpus, build_planted_target
from fastmix_data.search import run_method
from fastmix_data.stream.mixture import MixtureStream

log = logging.getLogger(__name__)

PARQUET_DOMAINS = ("code", "docstrings", "tests")
PLANTED = {"code": 0.5, "prose": 0.3, "docstrings": 0.2}


class LiveJob:
    """A stand-in training job: reads its MixtureStream while the proxy pushes weights into it.

    Each weight update is followed by ``batches_per_update`` batches read from the job's stream.
    """

    def __init__(self, stream: MixtureStream, batches_per_update: int = 2):
        self.stream = stream
        self.batches_per_update = batches_per_update
        self.iterator = iter(stream)
        self.effective: list[int] = []

    def set_weights(self, weights: dict[str, float]) -> int:
        batch = self.stream.set_weights(weights)
        self.effective.append(batch)
        for _ in range(self.batches_per_update):
            next(self.iterator)
        return batch


def _sources(corpus: Path, domains) -> dict[str, str]:
    return {
        d: str(corpus / "train" / d) if d in PARQUET_DOMAINS else str(corpus / "train_wds" / d / "*.tar")
        for d in domains
    }


def run_demo(out: str | Path = "demo_out", *, max_tokens: int = 1_500_000, seq_len: int = 128, batch_size: int = 16,
             seed: int = 0, progress: bool = True) -> dict:
    """Run the demo into ``out``; return the summary (also written to ``out/summary.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = build_corpus(out / "corpus", seed=seed, progress=progress)
    domains = [d for d in info["domains"]]
    planted = {d: w for d, w in PLANTED.items() if d in domains}
    target_info = build_planted_target(out / "target", out / "corpus", planted, n_docs=40, seed=seed)
    sources = _sources(out / "corpus", domains)
    uniform = {d: 1.0 for d in domains}

    job_stream = MixtureStream(sources, uniform, batch_size=batch_size, seq_len=seq_len, seed=seed + 1,
                               weight_units="tokens")
    job = LiveJob(job_stream)
    # FastMix at its defaults: the schedule (warm-up, outer-step interval, z step) derives from the budget
    config = {"method": "fastmix", "max_tokens": max_tokens, "output": {"progress": progress},
              "train": {"proxy": "cpu", "seed": seed, "seq_len": seq_len, "batch_size": batch_size}}
    result = run_method(config, sources=sources, target=str(out / "target"), sink=job, out_dir=out / "search")

    job_stats = job_stream.stats()
    manifest_path = None
    try:
        from fastmix_data.export.manifest import build_manifest, write_manifest

        manifest = build_manifest(sources, result.weights, "20M_tokens", root=str(out / "corpus"), seed=seed,
                                  seq_len=seq_len, weight_units="tokens")
        manifest_path = out / "manifest.json"
        write_manifest(manifest, manifest_path)
    except ImportError:  # exporters not installed in this build
        log.warning("fastmix_data.export is unavailable; no manifest written")

    planted_tokens = target_info.get("byte_proportions", planted)
    found_bytes = result.shares["bytes"] or result.weights  # the planted proportions are byte shares
    l1 = lambda w: sum(abs(w.get(d, 0.0) - planted_tokens.get(d, 0.0)) for d in domains)  # noqa: E731
    summary = {
        "domains": domains,
        "planted_target_proportions_by_bytes": planted_tokens,
        "final_weights": result.weights,
        "final_byte_shares": found_bytes,
        "l1_to_planted": {"uniform_start": l1(uniform_norm(domains)), "final": l1(found_bytes)},
        "search": {"tokens": result.compute["tokens"]["train"], "stopped": result.stopped_reason,
                   "schedule": result.details["schedule"], "compute": result.compute, "outputs": str(out / "search")},
        "job_stream": {"weight_updates": len(job.effective), "effective_batches_first_last": job.effective[:1] + job.effective[-1:],
                       "batches_served": job_stats["batches"], "max_abs_count_deviation": job_stats["max_abs_count_deviation"],
                       "sources": {d: {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()
                                       if k in ("requested_token_share", "realised_token_share", "samples")}
                                   for d, s in job_stats["sources"].items()}},
        "manifest": None if manifest_path is None else str(manifest_path),
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def uniform_norm(domains) -> dict[str, float]:
    return {d: 1.0 / len(domains) for d in domains}


def print_summary(summary: dict) -> None:
    print("\nfastmix-data demo")
    print(f"  domains: {', '.join(summary['domains'])}")
    print("  source        planted(bytes)  found(bytes)   job requested->realised (token share)")
    js = summary["job_stream"]["sources"]
    for d in summary["domains"]:
        print(f"  {d:<12} {summary['planted_target_proportions_by_bytes'].get(d, 0.0):>10.3f} "
              f"{summary['final_byte_shares'][d]:>12.3f}   {js[d]['requested_token_share']:.3f} -> {js[d]['realised_token_share']:.3f}")
    l1 = summary["l1_to_planted"]
    print(f"  L1 distance to the planted proportions: {l1['uniform_start']:.3f} (uniform) -> {l1['final']:.3f} (found)")
    c = summary["search"]["compute"]
    print(f"  search: {summary['search']['tokens']:,} tokens, {c['flops']['total']:.3g} FLOPs, "
          f"{summary['wall_seconds']} s wall in all")
    print(f"  live job stream: {summary['job_stream']['weight_updates']} weight updates, "
          f"{summary['job_stream']['batches_served']} batches served")
    print(f"  outputs: {summary['search']['outputs']} (weights.json, trajectory.jsonl, trajectory.png), "
          f"{summary['manifest']}")
