"""Live weights end to end on CPU: a FastMix search publishes, a 2-rank torchrun job follows.

    python examples/live_weights/run.py --out live_out                 # sidecar search (default)
    python examples/live_weights/run.py --out live_out --search embedded

1. builds the stdlib demo corpus and a planted target (as ``fastmix-data demo`` does), once;
2. sidecar: starts ``fastmix-data search ... --publish tcp://127.0.0.1:0`` beside the job;
   embedded: the job's rank 0 starts the same search itself (one flag, same mechanism);
3. runs ``torchrun --standalone --nproc-per-node 2 train.py --follow URI ...``: each rank trains a
   small LM on a stream that follows the search's weights, until the search has finished and its
   final weights are served;
4. prints where every rank switched (the same global batches on both) and the final weights.

A few minutes on 2 CPU cores (the job and the search share them). Outputs under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def prepare_data(out: Path, seed: int) -> tuple[dict[str, str], Path]:
    from fastmix_data.corpus import build_corpus, build_planted_target
    from fastmix_data.demo import PLANTED, _sources

    info = build_corpus(out / "corpus", seed=seed)
    domains = list(info["domains"])
    if not (out / "target").exists():
        build_planted_target(out / "target", out / "corpus", {d: w for d, w in PLANTED.items() if d in domains},
                             n_docs=40, seed=seed)
    return _sources(out / "corpus", domains), out / "target"


def search_args(sources: dict[str, str], target: Path, args) -> list[str]:
    argv = ["--target", str(target), "--seq-len", str(args.seq_len), "--batch-size", "8", "--model", "cpu",
            "--max-tokens", str(args.max_tokens), "--outer-every", "10", "--warmup-steps", "20", "--z-lr", "0.05",
            "--progress", "false", "--plot", "false"]
    for name, path in sources.items():
        argv += ["--source", f"{name}={path}"]
    return argv


def start_sidecar(argv: list[str], out: Path) -> tuple[subprocess.Popen, str]:
    state = out / "search" / "publisher.json"
    before = state.stat().st_mtime_ns if state.exists() else -1
    log = open(out / "search.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "fastmix_data.cli", "search", *argv, "--out", str(out / "search"),
                             "--publish", "tcp://127.0.0.1:0", "--resume"], stdout=log, stderr=subprocess.STDOUT)
    while not (state.exists() and state.stat().st_mtime_ns != before):
        if proc.poll() is not None:
            raise SystemExit(f"the search exited early (code {proc.returncode}); see {out / 'search.log'}")
        time.sleep(0.2)
    return proc, json.loads(state.read_text())["uri"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="live_out")
    p.add_argument("--search", choices=("sidecar", "embedded"), default="sidecar")
    p.add_argument("--max-tokens", type=int, default=100_000, help="search budget in proxy tokens")
    p.add_argument("--steps", type=int, default=200, help="job steps at least (then until the search is done)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--step-sleep-s", type=float, default=0.05,
                   help="added to each job step: on 2 shared cores it stands for a GPU step and leaves CPU to the search")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"building the corpus in {out / 'corpus'} (once) ...", flush=True)
    sources, target = prepare_data(out, args.seed)
    argv = search_args(sources, target, args)
    job = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HERE / "train.py"),
           "--out", str(out / "job"), "--steps", str(args.steps), "--until-publisher-done", "--seq-len", str(args.seq_len),
           "--workers", str(args.workers), "--model", "tiny", "--seed", str(args.seed),
           "--step-sleep-s", str(args.step_sleep_s)]
    for name, path in sources.items():
        job += ["--source", f"{name}={path}"]
    sidecar = None
    if args.search == "sidecar":
        sidecar, uri = start_sidecar(argv, out)
        print(f"sidecar search publishing at {uri}", flush=True)
        job += ["--search", "sidecar", "--follow", uri]
    else:
        job += ["--search", "embedded", "--search-args", shlex.join(argv)]
    t0 = time.time()
    print("torchrun job (2 ranks) following the search ...", flush=True)
    with open(out / "job.log", "ab") as log:
        rc = subprocess.call(job, stdout=log, stderr=subprocess.STDOUT)
    if sidecar is not None:
        sidecar.wait()
    if rc != 0:
        raise SystemExit(f"the job failed (code {rc}); see {out / 'job.log'}")
    summarize(out, time.time() - t0)


def summarize(out: Path, seconds: float) -> None:
    finals = [json.loads((out / "job" / f"rank{r}-final.json").read_text()) for r in (0, 1)]
    found = json.loads((out / "search" / "weights.json").read_text())
    found = found.get("weights", found)
    print(f"\njob: {finals[0]['steps']} steps per rank in {seconds:.0f} s")
    for f in finals:
        print(f"rank {f['rank']} switched at global batches {f['switches']}")
    same = finals[0]["switches"] == finals[1]["switches"]
    print(f"every rank switched at the same batches: {same}")
    print("final weights served:  " + ", ".join(f"{k}={v:.3f}" for k, v in finals[0]["weights"].items()))
    print("search's final weights: " + ", ".join(f"{k}={v:.3f}" for k, v in found.items()))
    print(f"logs: {out / 'job.log'}, {out / 'search.log'}; per-batch records: {out / 'job'}/rank*.jsonl")


if __name__ == "__main__":
    main()
