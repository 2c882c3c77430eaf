"""Trainers users plug the stream into: HF accelerate and Trainer (2 ranks, gloo), PyTorch Lightning,
torchdata's StatefulDataLoader -- each as docs/live.md shows it, with live weights where it matters."""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp
from shardgen import write_ab_sources

from fastmix_data import MixtureStream
from fastmix_data.live import Follow, WeightPublisher

B, L = 4, 16
W = {"a": 0.5, "b": 0.5}


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    return write_ab_sources(tmp_path_factory.mktemp("integrations"))


def _stream(srcs, **kw) -> MixtureStream:
    return MixtureStream(srcs, W, batch_size=B, seq_len=L, seed=1, weight_units="tokens", **kw)


def _rows(tokens: torch.Tensor) -> list[list[int]]:
    return tokens.tolist()


# ------------------------------------------------------------------ HF accelerate and Trainer, 2 ranks
def _tiny_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=L + 1, n_embd=16, n_layer=1, n_head=2))


def _hf_batches(loader):
    """The stream's packed batches as a causal LM's inputs (the model shifts the labels itself)."""
    for batch in loader:
        yield {"input_ids": batch["tokens"], "labels": batch["tokens"], "batch_index": batch["batch_index"]}


def _accelerate_rank(rank, world, port, srcs, out):
    # as under torchrun: the group meets at the store the parent hosts (no port to pick and free)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", TMPDIR=f"{out}/tmp{rank}")
    os.makedirs(os.environ["TMPDIR"], exist_ok=True)
    tempfile.tempdir = None
    from accelerate import Accelerator
    from transformers import Trainer, TrainingArguments

    acc = Accelerator(cpu=True)  # starts the gloo group from the environment, as `accelerate launch` does
    stream = _stream(srcs)
    model = _tiny_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)  # the model and optimiser only: the stream is sharded already
    right = []
    for batch, _ in zip(_hf_batches(stream.loader()), range(3)):
        batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        right.append((batch["batch_index"], _rows(batch["input_ids"])))
        acc.backward(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
        opt.step()
        opt.zero_grad()
    # the pitfall: prepare() re-shards an IterableDataset (dispatch_batches, the default for one, sends
    # rank 0's batches to every rank; without it, IterableDatasetShard keeps every world-th element)
    wrong = []
    prepared = acc.prepare(torch.utils.data.DataLoader(_TensorsOnly(_stream(srcs)), batch_size=None))
    for batch, _ in zip(prepared, range(2)):
        wrong.append((int(batch["batch_index"][0]), _rows(batch["tokens"])))

    class StreamTrainer(Trainer):
        """Trainer whose train loader is the stream's own (not re-sharded by accelerate)."""

        def get_train_dataloader(self):
            return _Recorded(_hf_batches(_stream(srcs).loader()), trainer_seen)

    trainer_seen: list = []
    args = TrainingArguments(output_dir=f"{out}/hf{rank}", max_steps=3, per_device_train_batch_size=B,
                             use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, ddp_backend="gloo")
    StreamTrainer(model=_tiny_lm(), args=args).train()
    torch.save({"right": right, "wrong": wrong, "trainer": trainer_seen}, f"{out}/acc{rank}.pt")


class _TensorsOnly(torch.utils.data.IterableDataset):
    """The stream's batches with tensors only (what accelerate's dispatcher can concatenate)."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            yield {"tokens": batch["tokens"], "batch_index": torch.full((B,), batch["batch_index"])}


class _Recorded:
    """Records what the Trainer took from the loader (and drops the bookkeeping key)."""

    def __init__(self, batches, seen: list):
        self.batches, self.seen = batches, seen

    def __iter__(self):
        for batch in self.batches:
            self.seen.append((batch.pop("batch_index"), _rows(batch["input_ids"])))
            yield batch


def _global_rows(srcs, n: int) -> dict[int, list]:
    ref = MixtureStream(srcs, W, batch_size=2 * B, seq_len=L, seed=1, weight_units="tokens", world_size=1, rank=0)
    out = {}
    for batch in ref:
        out[batch["batch_index"]] = _rows(batch["tokens"])
        if len(out) == n:
            return out


@pytest.mark.slow
def test_accelerate_and_hf_trainer_keep_the_stream_sharded_by_rank(srcs, tmp_path):
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.start_processes(_accelerate_rank, args=(2, server.port, srcs, str(tmp_path)), nprocs=2, start_method="spawn")
    r = [torch.load(tmp_path / f"acc{k}.pt") for k in (0, 1)]
    expected = _global_rows(srcs, 4)
    for key in ("right", "trainer"):
        for rank in (0, 1):  # global batch g, this rank's slice: disjoint and complete
            assert [g for g, _ in r[rank][key]] == [0, 1, 2], key
            assert [rows for _, rows in r[rank][key]] == [expected[g][rank * B:(rank + 1) * B] for g in range(3)]
    # what docs/live.md warns about: prepare() dispatches rank 0's batches 0 and 1 to ranks 0 and 1
    assert [rows for _, rows in r[0]["wrong"]] == [expected[0][:B], expected[2][:B]]
    assert [rows for _, rows in r[1]["wrong"]] == [expected[1][:B], expected[3][:B]]


# ------------------------------------------------------------------ PyTorch Lightning
def test_lightning_trains_on_a_following_stream_and_checkpoints_it(srcs, tmp_path):
    import lightning as pl

    uri = str(tmp_path / "pub")
    pub = WeightPublisher(uri, heartbeat_s=0.1)
    stream = _stream(srcs, follow=Follow(uri, poll_s=0.02))

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return stream.loader()

        def state_dict(self):  # saved in Lightning checkpoints: the stream's position and weight history
            return {"stream": stream.state_dict()}

        def load_state_dict(self, state):  # fit(ckpt_path=...) resumes the stream with it
            stream.load_state_dict(state["stream"])

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _tiny_lm()
            self.versions: list[int] = []

        def training_step(self, batch, _):
            self.versions.append(batch["weight_version"])
            if len(self.versions) == 2:
                pub.set_weights({"a": 0.9, "b": 0.1})  # a search beside the job; nothing else to do
            if batch["weight_version"] == 1:
                self.trainer.should_stop = True
            return self.model(input_ids=batch["tokens"], labels=batch["tokens"]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    lm, data = LM(), Data()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=500, use_distributed_sampler=False, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    deadline = time.monotonic() + 120
    trainer.fit(lm, datamodule=data)
    assert time.monotonic() < deadline and lm.versions[-1] == 1 and lm.versions[0] == 0
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)[type(data).__qualname__]["stream"]
    assert saved["history"][-1]["publisher"]["seq"] == 1
    resumed = _stream(srcs)
    resumed.load_state_dict(json.loads(json.dumps(saved)))
    assert resumed.weights == pytest.approx({"a": 0.9, "b": 0.1})
    stream.close()
    pub.close()


# ------------------------------------------------------------------ torchdata StatefulDataLoader
def test_stateful_dataloader_resumes_a_following_stream_exactly(srcs, tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    uri = str(tmp_path / "pub")
    pub = WeightPublisher(uri, heartbeat_s=0.1)
    stream = _stream(srcs, follow=Follow(uri, poll_s=0.02))
    loader = StatefulDataLoader(stream, batch_size=None, num_workers=2)
    it = iter(loader)
    got = [next(it) for _ in range(3)]
    pub.set_weights({"a": 0.2, "b": 0.8})
    deadline = time.monotonic() + 60
    while got[-1]["weight_version"] != 1:
        assert time.monotonic() < deadline
        got.append(next(it))
    state = loader.state_dict()
    after = [next(it) for _ in range(6)]

    again_stream = _stream(srcs, follow=Follow(uri, poll_s=0.02))
    again = StatefulDataLoader(again_stream, batch_size=None, num_workers=2)
    again.load_state_dict(state)
    rit = iter(again)
    redo = [next(rit) for _ in range(6)]
    assert [b["batch_index"] for b in redo] == [b["batch_index"] for b in after]
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(redo, after))
    assert [b["weight_version"] for b in redo] == [1] * 6
    pub.set_weights({"a": 0.6, "b": 0.4})  # and it keeps following
    while redo[-1]["weight_version"] != 2:
        assert time.monotonic() < deadline
        redo.append(next(rit))
    for s in (stream, again_stream):
        s.close()
    pub.close()
