"""Data-parallel proxy (ProxyStep on DDP): two gloo ranks, each with half of every global batch, give the
single-process run's weights, scores and target gradient (up to float summation order).

The model runs in float64 here so that the comparison can be tight: in float32, AdamW's first
steps divide gradients of order 1e-9 by their own magnitude, and all-reduce's summation order then
moves single weights by up to ~1e-5 (measured) although every gradient agrees to 1e-7."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastmix_data.search.ddp import Ranks, init_distributed, rank_rows
from fastmix_data.search.hypergrad import SourceScores
from fastmix_data.search.model import build_proxy, proxy_config
from fastmix_data.search.proxy_step import ProxyStep

V, B, L, K, STEPS, ACCUM = 29, 8, 6, 3, 4, 2


def _data():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, V, (B, L + 1), generator=g), torch.randint(0, K, (B,), generator=g)) for _ in range(STEPS)]
    target = torch.randint(0, V, (5, L + 1), generator=g)  # 5 rows: ranks get 3 and 2
    return batches, target


def _train(ranks: Ranks, tied: bool) -> dict:
    """A miniature search through ProxyStep: the target gradient from this rank's target rows, then
    micro-steps on this rank's rows with per-source loss weights and scores, gradient accumulation."""
    model = build_proxy(proxy_config("tiny", vocab_size=V, tie_embeddings=tied), seed=0).double()
    ps = ProxyStep(model, K, lr=1e-2, grad_accum=ACCUM, ranks=ranks, chunk_tokens=7)
    batches, target = _data()
    hg = ps.head_gradient(target)
    loss_w = torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64)
    scores = SourceScores.zeros(K)
    for step, (tokens, source) in enumerate(batches, start=1):
        share = ranks.rows(B)
        scores = scores + ps.micro_step(tokens[share], source[share], loss_w, G=hg.grad).scores
        if step % ACCUM == 0:
            ps.optimizer_step(1e-2)
    scores = ranks.sum_scores(scores)
    ranks.assert_same(scores.sums, "the scores")
    return {
        "params": {k: v.detach().clone() for k, v in ps.state_dict()["model"].items()},
        "G": hg.grad, "n": hg.tokens, "loss": hg.loss,
        "sums": scores.sums, "counts": scores.counts, "loss_sums": scores.loss_sums,
    }


def _rank_main(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ranks = Ranks.current()
        assert (ranks.rank, ranks.world) == (rank, world)
        res = {tied: _train(ranks, tied) for tied in (False, True)}
        if ranks.is_main:
            torch.save(res, out)
        ranks.barrier()
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without the interpreter's teardown, where a DDP/gloo thread of a rank
    # once aborted ("terminate called without an active exception") in a loaded CI run.
    os._exit(0)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """One 2-rank gloo world (spawning costs seconds) runs both head variants."""
    tmp = tmp_path_factory.mktemp("ddp")
    os.environ.pop("WORLD_SIZE", None)
    mp.start_processes(_rank_main, args=(2, str(tmp / "init"), str(tmp / "ddp.pt")), nprocs=2, start_method="spawn")
    return torch.load(tmp / "ddp.pt")


@pytest.mark.parametrize("tied", [False, True])
def test_two_ranks_equal_one_process_with_the_global_batch(two_rank_results, tied):
    single = _train(Ranks(), tied)
    ddp = two_rank_results[tied]
    assert ddp["n"] == single["n"] == 5 * L
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-13)
    torch.testing.assert_close(ddp["G"], single["G"], rtol=1e-12, atol=1e-15)
    assert torch.equal(ddp["counts"], single["counts"])
    torch.testing.assert_close(ddp["loss_sums"], single["loss_sums"], rtol=1e-13, atol=0)
    torch.testing.assert_close(ddp["sums"], single["sums"], rtol=1e-11, atol=1e-14)
    init = build_proxy(proxy_config("tiny", vocab_size=V, tie_embeddings=tied), seed=0).double().state_dict()
    for k, v in single["params"].items():
        torch.testing.assert_close(ddp["params"][k], v, rtol=1e-9, atol=1e-11, msg=k)
        if v.dim() == 2:
            assert float((v - init[k]).abs().max()) > 1e-3  # the runs did train


def test_rows_split_any_batch_and_identity_without_ranks():
    assert [Ranks(r, 3).rows(8) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert [Ranks(r, 2).rows(1) for r in range(2)] == [slice(0, 1), slice(1, 1)]
    one = Ranks()
    sc = SourceScores.zeros(2)
    assert one.sum_scores(sc) is sc and one.is_main and one.rows(5) == slice(0, 5)
    G = torch.ones(2, 2)
    assert one.mean_gradient(G, 3, 1.5) == (G, 3, 1.5)


def test_rank_rows_and_init_without_torchrun(monkeypatch):
    batch = {"tokens": torch.arange(10).view(5, 2), "source": torch.arange(5), "name": "x", "scalar": torch.tensor(3)}
    one = rank_rows(batch, Ranks(1, 2))
    assert one["tokens"].tolist() == [[6, 7], [8, 9]] and one["source"].tolist() == [3, 4]
    assert one["name"] == "x" and int(one["scalar"]) == 3
    assert rank_rows(batch, Ranks()) is batch
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == Ranks() and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() == Ranks()
