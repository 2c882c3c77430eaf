"""The programs the crash tests kill (``python tests/crash_programs.py KIND ARGS_JSON``).

- ``stream``: one rank of a gloo job (ranks are separate processes), streaming through
  ``stream.loader(num_workers=2)`` with live weights (a collective ``set_weights`` at fixed steps),
  logging every received batch to ``served-<rank>.jsonl`` and saving ``stream.state_dict()`` every
  few steps with an atomic write (``ckpt/step-<k>-rank-<r>.json``); with ``resume`` it first loads
  the checkpoint of step ``resume``.
- ``resample``: `resample` of a manifest with worker processes.
- ``index``: opens several sources in turn (their shard index, written to the cache atomically).
Each prints ``started <pid>`` once its setup is done, so the test kills it while it works.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _started() -> None:
    print(f"started {os.getpid()}", flush=True)


def stream(a: dict) -> None:
    import torch.distributed as dist

    from fastmix_data import MixtureStream
    from fastmix_data.io import write_json_atomic

    rank, world = a["rank"], a["world"]
    dist.init_process_group("gloo", init_method=f"file://{a['init']}", rank=rank, world_size=world)
    s = MixtureStream(a["sources"], a["weights"], batch_size=a["batch_size"], seed=a["seed"])
    step = 0
    if a.get("resume") is not None:
        step = a["resume"]
        with open(os.path.join(a["out"], "ckpt", f"step-{step}-rank-{rank}.json")) as f:
            s.load_state_dict(json.load(f))
    schedule = {int(k): v for k, v in a["schedule"].items()}
    log = open(os.path.join(a["out"], f"served-{rank}.jsonl"), "a")  # noqa: SIM115
    _started()
    for batch in s.loader(num_workers=2, prefetch_factor=2) if step < a["total"] else []:
        items = list(zip(*(batch[k].tolist() for k in ("source", "shard", "item", "epoch"))))
        log.write(json.dumps({"step": step, "batch": batch["batch_index"], "version": batch["weight_version"],
                              "items": items}) + "\n")  # fmt: skip
        log.flush()
        step += 1
        if step in schedule:
            s.set_weights(schedule[step])
        if step % a["ckpt_every"] == 0:
            write_json_atomic(os.path.join(a["out"], "ckpt", f"step-{step}-rank-{rank}.json"), s.state_dict())
        if step >= a["total"]:
            break
    with open(os.path.join(a["out"], f"final-{rank}.json"), "w") as f:
        json.dump(s.state_dict(), f)
    dist.barrier()
    dist.destroy_process_group()


def resample(a: dict) -> None:
    from fastmix_data.export import resample as run

    _started()
    run(a["manifest"], a["out"], format=a["format"], workers=a["workers"], shard_items=a["shard_items"], progress=False)


def index(a: dict) -> None:
    from fastmix_data.sources import open_source

    _started()
    for name, spec in a["sources"].items():
        time.sleep(a.get("pace", 0.0))  # a floor under each source's time, so a kill lands before the end
        open_source(name, spec, cache_dir=a["cache"])
        print(f"indexed {name}", flush=True)


if __name__ == "__main__":
    {"stream": stream, "resample": resample, "index": index}[sys.argv[1]](json.loads(sys.argv[2]))
