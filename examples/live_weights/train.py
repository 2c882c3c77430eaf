"""A torchrun job that trains a small LM on a stream following published weights.

    torchrun --standalone --nproc-per-node 2 examples/live_weights/train.py \
        --source code=corpus/train/code --source prose='corpus/train_wds/prose/*.tar' \
        --follow tcp://127.0.0.1:29600 --out job_out --steps 300

Backend: NCCL when CUDA is present, else gloo; the stream never uses it (its coordination goes
through the job's c10d store). The search publishing the weights runs beside the job (sidecar:
start ``fastmix-data search ... --publish URI`` yourself, see run.py) or inside it (``--search
embedded``: rank 0 starts it). Nothing in the loop below touches the weights: each rank logs the
batches it trained on (``rank<r>.jsonl``: step, global batch, weight version, a digest of the
tokens), and the follower logs where each change applies.

Checkpoints (``ckpt/step-N/rank<r>.pt`` and ``ckpt/latest``, every ``--checkpoint-every`` steps)
hold the model, optimiser and the stream's state with its weight history; ``--resume`` continues
from the latest complete one and keeps following.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastmix_data import MixtureStream
from fastmix_data.live import Follow
from fastmix_data.live.embedded import EmbeddedSearch
from fastmix_data.search.model import build_proxy, proxy_config

log = logging.getLogger("live_weights")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--follow", help="publisher URI (sidecar); with --search embedded, where rank 0 publishes")
    p.add_argument("--search", choices=("sidecar", "embedded"), default="sidecar",
                   help="sidecar: follow --follow; embedded: rank 0 starts the search (--search-args) itself")
    p.add_argument("--search-args", default="", help="arguments of `fastmix-data search` for --search embedded")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300, help="training steps (optimiser steps, one batch each)")
    p.add_argument("--until-publisher-done", action="store_true",
                   help="after --steps, go on until the search has finished and its last weights are served")
    p.add_argument("--max-steps", type=int, default=100_000, help="hard stop (also for --until-publisher-done)")
    p.add_argument("--stop-file", help="stop (every rank at the same step) once this file exists")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="tiny", help="proxy preset used as the job's LM (tiny, cpu)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--poll-s", type=float, default=0.2)
    p.add_argument("--dead-after-s", type=float, default=10.0)
    p.add_argument("--step-sleep-s", type=float, default=0.0, help="extra time per step (to pace a CPU demo)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def follow_uri(args, rank: int, out: Path) -> tuple[str, EmbeddedSearch | None]:
    if args.search == "sidecar":
        if not args.follow:
            raise SystemExit("--search sidecar needs --follow URI (where the search publishes)")
        return args.follow, None
    search = EmbeddedSearch.start(shlex.split(args.search_args), out / "search", publish=args.follow or "tcp://127.0.0.1:0",
                                  log_path=out / "search.log")
    return search.uri, search


def save_checkpoint(ckpt: Path, rank: int, step: int, model, opt, stream) -> None:
    """Every rank writes ``step-N/rank<r>.pt``; once all have, rank 0 points ``latest`` at N (a job
    killed halfway through a save resumes from the previous complete one) and drops older ones."""
    folder = ckpt / f"step-{step:08d}"
    folder.mkdir(exist_ok=True)
    tmp = folder / f".rank{rank}.tmp"
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                "stream": json.dumps(stream.state_dict())}, tmp)
    os.replace(tmp, folder / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        (ckpt / ".latest.tmp").write_text(str(step))
        os.replace(ckpt / ".latest.tmp", ckpt / "latest")
        for old in ckpt.glob("step-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path, rank: int, device) -> dict | None:
    if not (ckpt / "latest").exists():
        return None
    step = int((ckpt / "latest").read_text())
    return torch.load(ckpt / f"step-{step:08d}" / f"rank{rank}.pt", map_location=device, weights_only=True)


def digest(tokens: torch.Tensor) -> str:
    return hashlib.sha1(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def publisher_done(stream) -> bool:
    """Rank 0 (the deciding rank) has seen the search finish and serves its last change."""
    follow = stream.stats()["follow"]
    last = stream.state_dict()["history"][-1]
    return follow.get("publisher") == "finished" and follow.get("seen_seq") == follow.get("applied_seq") \
        and stream._next_batch > last["batch"]


def should_stop(args, step: int, stream, device) -> bool:
    """The same answer on every rank (an all_reduce on the training group when ranks may differ:
    the loop, not the stream, decides when to stop, and DDP needs equal step counts)."""
    if step >= args.max_steps:
        return True
    local = step >= args.steps and (not args.until_publisher_done or publisher_done(stream))
    local = local or bool(args.stop_file and os.path.exists(args.stop_file))
    if not (args.stop_file or (args.until_publisher_done and step >= args.steps)):
        return local  # a step count: the same on every rank already
    flag = torch.tensor([1 if local else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = setup()
    logging.basicConfig(level=logging.INFO, format=f"rank {rank} %(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    uri, search = follow_uri(args, rank, out)
    sources = dict(s.split("=", 1) for s in args.source)
    stream = MixtureStream(sources, {n: 1.0 for n in sources}, batch_size=args.batch_size, seq_len=args.seq_len,
                           seed=args.seed, weight_units="tokens",
                           follow=Follow(uri, poll_s=args.poll_s, dead_after_s=args.dead_after_s))
    model = build_proxy(proxy_config(args.model), seed=args.seed).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    ckpt = out / "ckpt"
    step = 0
    state = load_checkpoint(ckpt, rank, device) if args.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        stream.load_state_dict(json.loads(state["stream"]))
        step = state["step"]
        log.info("resumed at step %d, next global batch %d", step, stream._next_batch)
    logf = open(out / f"rank{rank}.jsonl", "a+")  # noqa: SIM115
    if logf.tell():  # a killed run may have left half a line
        logf.write("\n")
    t0 = time.time()
    for batch in stream.loader(num_workers=args.workers, persistent_workers=args.workers > 0):
        tokens = batch["tokens"]
        x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        logf.write(json.dumps({"step": step, "batch": batch["batch_index"], "version": batch["weight_version"],
                               "digest": digest(tokens), "loss": round(loss.item(), 4), "t": time.time()}) + "\n")
        logf.flush()
        if args.step_sleep_s:
            time.sleep(args.step_sleep_s)
        if step % args.checkpoint_every == 0:
            save_checkpoint(ckpt, rank, step, model, opt, stream)
        if should_stop(args, step, stream, device):
            break
    stats = stream.stats()
    history = stream.state_dict()["history"]
    final = {"rank": rank, "steps": step, "seconds": round(time.time() - t0, 1), "history": history,
             "switches": [h["batch"] for h in history[1:]], "weights": history[-1]["requested"],
             "follow": stats["follow"], "weight_updates": stats["weight_updates"]}
    (out / f"rank{rank}-final.json").write_text(json.dumps(final, indent=1))
    log.info("done: %d steps, switches at global batches %s, final weights %s", step, final["switches"],
             final["weights"])
    stream.close()
    if search is not None:
        search.stop()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
