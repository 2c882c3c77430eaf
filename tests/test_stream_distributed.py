"""Two ranks (gloo) x two DataLoader workers each: disjoint, complete coverage of the global
sequence, and the same switch batch on every rank after `set_weights` (the first batch not received)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data import MixtureStream

B = 4
W = {"a": 0.6, "b": 0.4}
NEW = {"a": 0.1, "b": 0.9}


def _items(batch):
    return list(zip(batch["source"].tolist(), batch["shard"].tolist(), batch["item"].tolist(), batch["epoch"].tolist()))


def _rank_main(rank, world, init_file, srcs, out):
    os.environ["FASTMIX_DATA_CACHE"] = out + "-cache"
    os.environ["TMPDIR"] = f"{out}-tmp{rank}"  # each rank as on its own host
    os.makedirs(os.environ["TMPDIR"])
    tempfile.tempdir = None
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    stream = MixtureStream(srcs, W, batch_size=B, seed=5)
    assert (stream.rank, stream.world_size) == (rank, world)
    assert stream.channel.dir.startswith(os.environ["TMPDIR"])
    got, effective = [], None
    # workers forked as under torchrun (in a spawned rank the default would spawn them: slow imports)
    for batch in stream.loader(num_workers=2, prefetch_factor=2, multiprocessing_context="fork"):
        got.append((batch["batch_index"], batch["weight_version"], _items(batch)))
        if len(got) == 3:
            effective = stream.set_weights(NEW if rank == 0 else {"a": 1.0, "b": 0.0})  # rank 0 wins
        if len(got) == 14:
            break
    torch.save({"got": got, "effective": effective, "history": stream.state_dict()["history"]}, f"{out}-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_two_workers(tmp_path):
    write_parquet_source(tmp_path / "a", make_docs(60, prefix="a"), shards=3)
    write_wds_source(tmp_path / "b", make_docs(40, prefix="b"), shards=2)
    srcs = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b" / "*.tar")}
    out = str(tmp_path / "rank")
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), srcs, out), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(f"{out}-{r}.pt") for r in range(2))
    assert r0["effective"] == r1["effective"]
    effective = r0["effective"]
    # both ranks had received batches 0-2: the change applies at the next one, whatever the workers built
    assert effective == 3
    assert r0["history"][-1]["requested"] == pytest.approx(NEW) == r1["history"][-1]["requested"]

    # One process with world_size=1 and a global batch of 2*B serves the same global sequence.
    ref = MixtureStream(srcs, W, batch_size=2 * B, seed=5, world_size=1, rank=0)
    state = ref.state_dict()
    state["history"] = r0["history"]
    for h in state["history"]:
        h["position"] = h["batch"] * 2 * B
    ref.load_state_dict(state, allow_fingerprint_mismatch=True)
    for (g0, v0, items0), (g1, v1, items1), expected in zip(r0["got"], r1["got"], ref):
        assert g0 == g1 == expected["batch_index"]
        assert v0 == v1 == (1 if g0 >= effective else 0)
        assert items0 + items1 == _items(expected)  # rank 0 then rank 1: disjoint and complete
        if g0 == 13:
            break
