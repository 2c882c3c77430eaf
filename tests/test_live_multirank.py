"""Two ranks x two workers following published weights, and set_weights, while the training's default
process group cannot carry CPU tensors (an NCCL stand-in) or does not exist (torchrun's store only).
Each rank has its own TMPDIR and shared-memory directory, as if on its own host."""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shardgen import write_ab_sources

from fastmix_data import MixtureStream
from fastmix_data.live import Follow, WeightPublisher

B = 4
W = {"a": 0.6, "b": 0.4}
UPDATES = [{"a": 0.1, "b": 0.9}, {"a": 0.8, "b": 0.2}]


def _items(batch):
    return list(zip(batch["source"].tolist(), batch["shard"].tolist(), batch["item"].tolist(), batch["epoch"].tolist()))


def _as_host(rank: int, out: str) -> dict:
    """Give this rank its own temp and shared-memory directories (another host's)."""
    host = {"tmp": f"{out}/host{rank}/tmp", "shm": f"{out}/host{rank}/shm"}
    for d in host.values():
        os.makedirs(d, exist_ok=True)
    os.environ["TMPDIR"], os.environ["FASTMIX_DATA_SHM"] = host["tmp"], host["shm"]
    tempfile.tempdir = None
    return host


def _join_job(mode: str, rank: int, world: int, port: int) -> str | None:
    """Start this rank as the job would; return how a CPU collective on the default group failed."""
    if mode == "no-group":  # torchrun without init_process_group: only the agent's store
        os.environ.update(TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          RANK=str(rank), WORLD_SIZE=str(world))
        return None
    import nccl_standin

    nccl_standin.register()
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group(nccl_standin.NAME, store=store, rank=rank, world_size=world)
    try:
        dist.all_reduce(torch.zeros(1))
    except RuntimeError as e:
        return str(e)
    return "a CPU all_reduce worked"


def _rank_main(rank, world, port, mode, srcs, uri, workers, out):
    host = _as_host(rank, out)
    # workers forked as under torchrun (a spawned rank would spawn them, and each re-imports torch)
    fork = {"multiprocessing_context": "fork"} if workers else {}
    refused = _join_job(mode, rank, world, port)
    report = dist.TCPStore("127.0.0.1", port, is_master=False)
    # set_weights: a collective carried by the store
    plain = MixtureStream(srcs, W, batch_size=B, seed=5)
    it = iter(plain.loader(num_workers=workers, **fork))
    for _ in range(3):
        next(it)
    effective = plain.set_weights(UPDATES[0] if rank == 0 else W)  # rank 0's weights win
    plain_history = plain.state_dict()["history"]
    plain.close()
    # following
    stream = MixtureStream(srcs, W, batch_size=B, seed=5, follow=Follow(uri, poll_s=0.02))
    loader = stream.loader(num_workers=workers, **fork)
    got, deadline = [], time.monotonic() + 120
    for batch in loader:
        got.append((batch["batch_index"], batch["weight_version"], _items(batch)))
        report.set(f"progress/{rank}", json.dumps([len(got), batch["weight_version"]]))
        done = [v for _, v, _ in got].count(len(UPDATES)) >= 3
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # a training step
    dirs = {"channel": stream.channel.dir, "ring": loader.ring.directory if loader.ring else None}
    result = {"got": got, "history": stream.state_dict()["history"], "effective": effective, "refused": refused,
              "plain_history": plain_history, "host": host, "dirs": dirs}
    stream.close()
    torch.save(result, f"{out}/rank{rank}.pt")


def _publish_when_ranks_progress(port: int, pub: WeightPublisher, procs) -> None:
    store = dist.TCPStore("127.0.0.1", port, is_master=False)

    def progress(r):
        key = f"progress/{r}"
        return json.loads(store.get(key)) if store.check([key]) else [0, 0]

    deadline = time.monotonic() + 120
    for k, weights in enumerate(UPDATES):
        # update k+1 once every rank serves version k (and has served a few batches)
        while not all(progress(r)[1] >= k and progress(r)[0] >= 3 for r in range(2)):
            assert time.monotonic() < deadline and all(p.is_alive() for p in procs.processes), "ranks stalled"
            time.sleep(0.01)
        pub.set_weights(weights)


@pytest.mark.slow
@pytest.mark.parametrize("mode, transport, workers", [("nccl-like", "tcp", 2), ("no-group", "file", 0)])
def test_two_ranks_follow_without_the_training_group(tmp_path, mode, transport, workers):
    srcs = write_ab_sources(tmp_path, 60, 40, shards_a=3)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the job's store
    pub = WeightPublisher("tcp://127.0.0.1:0" if transport == "tcp" else str(tmp_path / "pub"), units="samples")
    out = str(tmp_path)
    procs = mp.start_processes(_rank_main, args=(2, server.port, mode, srcs, pub.uri, workers, out), nprocs=2,
                               join=False, start_method="spawn")
    try:
        _publish_when_ranks_progress(server.port, pub, procs)
        procs.join()
    finally:  # a failed test leaves no rank running
        for proc in procs.processes:
            if proc.is_alive():
                proc.kill()
        pub.close(linger_s=0)
    r0, r1 = (torch.load(f"{out}/rank{r}.pt") for r in range(2))

    if mode == "nccl-like":
        assert "No backend type associated with device type cpu" in r0["refused"]
    assert r0["effective"] == r1["effective"] == 3  # agreed through the store: the first batch not received
    assert r0["plain_history"][-1]["requested"] == pytest.approx(UPDATES[0]) == r1["plain_history"][-1]["requested"]
    for r in (r0, r1):  # every temp file where that rank's "host" keeps it
        assert r["dirs"]["channel"].startswith(r["host"]["tmp"])
        assert r["dirs"]["ring"] is None or r["dirs"]["ring"].startswith(r["host"]["shm"])

    strip = lambda h: [{k: v for k, v in e.items() if k != "time"} for e in h]  # noqa: E731
    assert strip(r0["history"]) == strip(r1["history"])  # one decision per change, the same on both
    switches = [h["batch"] for h in r0["history"][1:]]
    assert len(switches) == 2 and [h["publisher"]["seq"] for h in r0["history"][1:]] == [1, 2]
    # the content is the pure function of the recorded history: one process with a global batch of 2B
    ref = MixtureStream(srcs, W, batch_size=2 * B, seed=5, world_size=1, rank=0)
    ref.load_state_dict({**ref.state_dict(), "history": r0["history"]}, allow_fingerprint_mismatch=True)
    expected = {}
    for batch in ref:
        expected[batch["batch_index"]] = (batch["weight_version"], _items(batch))
        if batch["batch_index"] >= max(len(r0["got"]), len(r1["got"])):
            break
    for rank, r in enumerate((r0, r1)):
        assert [g for g, _, _ in r["got"]] == list(range(len(r["got"])))
        for g, version, items in r["got"]:
            assert version == expected[g][0] == sum(g >= s for s in switches)
            assert items == expected[g][1][rank * B:(rank + 1) * B]
