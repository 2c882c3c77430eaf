"""The search under torchrun: two gloo ranks running ``run_method`` (FastMix at its defaults, each
rank on its half of every global batch) write the outputs one process writes with the whole
global batch -- the same budget, steps, held-out batches, token counts and compute, and the same
mixture up to the order of floating-point sums. The proxy runs in float64 (``model=``) so that
the comparison can be tight; float32 differs by all-reduce rounding amplified by AdamW's first
steps (docs/proxy.md)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from search_corpus import sources, tiny_config, write_tiny_corpus

from fastmix_data.search import run_method
from fastmix_data.search.model import build_proxy, proxy_config

B, STEPS = 4, 16  # per-rank rows; micro-batches of the global batch


def _config(batch_size: int, ddp: bool, precondition: bool = False) -> dict:
    cfg = tiny_config("fastmix", steps=STEPS)
    cfg["max_tokens"] = 2 * B * 32 * STEPS  # the global batch's tokens times the steps
    cfg["train"] = {**cfg["train"], "batch_size": batch_size, "ddp": ddp}
    cfg["fastmix"] = {"warmup_steps": 4, "outer_every": 4, "precondition": precondition}
    return cfg


def _search(root, out_dir, batch_size: int, ddp: bool = False, precondition: bool = False):
    model = build_proxy(proxy_config("tiny"), seed=0).double()
    return run_method(_config(batch_size, ddp, precondition), sources=sources(root), target=str(root / "planted"),
                      out_dir=out_dir, model=model)


def _rank_main(rank, world, init_file, root, out_dir, precondition=False):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _search(root, out_dir, B, ddp=True, precondition=precondition)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("ddp_corpus"), docs=40)


@pytest.mark.parametrize("precondition", [False, True])
def test_two_ranks_write_what_one_process_writes(corpus, tmp_path, precondition):
    """Also with fastmix.precondition: every rank derives the same P from its (identical) AdamW state."""
    os.environ.pop("WORLD_SIZE", None)
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), corpus, tmp_path / "ddp", precondition), nprocs=2,
                       start_method="spawn")
    one = _search(corpus, tmp_path / "one", 2 * B, precondition=precondition)
    assert one.details["updates"] >= 2 and max(one.weights.values()) > 0.34  # the mixture moved
    read = lambda d, f: json.loads((d / f).read_text())  # noqa: E731
    w2, w1 = read(tmp_path / "ddp", "weights.json"), read(tmp_path / "one", "weights.json")
    for n in one.weights:
        assert w2["weights"][n] == pytest.approx(w1["weights"][n], rel=1e-7, abs=1e-9)
    for k in ("updates", "outer_steps", "micro_batches", "held_out_batches", "schedule"):
        assert w2["details"][k] == w1["details"][k], k
    c2, c1 = read(tmp_path / "ddp", "compute.json"), read(tmp_path / "one", "compute.json")
    assert c2["tokens"] == c1["tokens"] and c2["optimizer_steps"] == c1["optimizer_steps"]
    t2 = [json.loads(x) for x in (tmp_path / "ddp" / "trajectory.jsonl").read_text().splitlines()]
    assert len(t2) == len(one.trajectory)
    for a, b in zip(t2, one.trajectory):
        assert a["tokens"] == b["tokens"] and a["updated"] == b["updated"]
        for n in one.weights:  # None: no token of that source since the last record
            sa, sb = a["source_loss"][n], b["source_loss"][n]
            assert (sa is None and sb is None) or sa == pytest.approx(sb, rel=1e-7)
    assert json.loads((tmp_path / "ddp" / "search_config.json").read_text())["resolved"]["ranks"] == 2


def test_without_ddp_a_search_is_one_process_whatever_the_environment(corpus, monkeypatch):
    """A search started from a torchrun job's rank (an embedded search) inherits RANK/WORLD_SIZE: without
    train.ddp it must neither join a process group nor serve only that rank's rows."""
    alone = run_method(_config(B, False), sources=sources(corpus), target=str(corpus / "planted"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    inherited = run_method(_config(B, False), sources=sources(corpus), target=str(corpus / "planted"))
    assert not dist.is_initialized()
    assert inherited.weights == alone.weights and inherited.compute["tokens"] == alone.compute["tokens"]


def test_ddp_is_fastmix_only_and_not_resumed():
    from fastmix_data.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.ddp \(--ddp\): only method 'fastmix'.*'mixmin'"):
        run_method({**_config(B, True), "method": "mixmin"}, sources={"a": "x"}, target=["t"])
    with pytest.raises(ConfigError, match=r"train.ddp \(--ddp\): resume= is not supported"):
        run_method(_config(B, True), sources={"a": "x"}, target=["t"], resume=True)
