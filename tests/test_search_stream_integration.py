"""run_search on the real MixtureStream: search stream, target stream, online sink, resume."""

from __future__ import annotations

import json

import pytest
import torch
from shardgen import write_parquet_source

from fastmix_data.search import SearchConfig, load_target, read_trajectory, run_method
from fastmix_data.search.model import BYTE_VOCAB_SIZE as MODEL_VOCAB
from fastmix_data.stream import BYTE_VOCAB_SIZE, MixtureStream


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning
    OpenMP threads make them many times slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _corpus(tmp_path):
    docs = {
        "digits": [" ".join(str((i * 7 + j) % 10) * 3 for j in range(40)) for i in range(40)],
        "letters": [" ".join("abcdefghij"[(i + j) % 10] * 2 for j in range(40)) for i in range(40)],
        "mixed": [f"item {i}: " + "xyz " * 20 for i in range(40)],
    }
    paths = {}
    for name, d in docs.items():
        write_parquet_source(tmp_path / name, d, shards=2)
        paths[name] = str(tmp_path / name / "*.parquet")
    write_parquet_source(tmp_path / "val", docs["digits"][::-1], shards=1)
    return paths, str(tmp_path / "val" / "*.parquet")


def _streams(paths, val, seed=0):
    search = MixtureStream(paths, {n: 1.0 for n in paths}, batch_size=6, seq_len=32, seed=seed)
    return search, load_target(val, 32, max_seqs=16)


def test_vocab_constants_agree():
    assert MODEL_VOCAB == BYTE_VOCAB_SIZE


def test_run_search_on_mixture_stream_with_sink_and_resume(tmp_path):
    paths, val = _corpus(tmp_path)
    cfg = SearchConfig.from_dict({"max_tokens": 40 * 6 * 32, "train": {"proxy": "tiny", "batch_size": 6, "seq_len": 32},
                                  "fastmix": {"outer_every": 5, "warmup_steps": 5, "z_lr": 0.05,
                                              "target_batches_per_step": 1},
                                  "target": {"batch_size": 4},
                                  "output": {"checkpoint_every": 20, "progress": False, "plot": False}})
    search, target = _streams(paths, val)
    job = MixtureStream(paths, {n: 1.0 for n in paths}, batch_size=4, seq_len=32, seed=5)
    full = run_method(cfg, stream=search, target=target, sink=job, out_dir=tmp_path / "a")
    assert full.stopped_reason == "max_tokens"
    assert full.weights["digits"] == max(full.weights.values())  # the target is digits text
    # the job ends on the exported (average) mixture, pushed after the last live update
    assert job.state_dict()["history"][-1]["requested"] == pytest.approx(full.weights)
    assert full.weights != full.candidates["last"]
    eff = [r["effective_batch"] for r in full.trajectory if r["updated"]]
    assert eff and all(isinstance(e, int) for e in eff)

    # crash after 27 batches, resume from the checkpoint at 20 with the stream's own state
    class Crash:
        def __init__(self, s, n):
            self.s, self.n = s, n
            self.source_names, self.state_dict, self.load_state_dict = s.source_names, s.state_dict, s.load_state_dict

        def __iter__(self):
            for i, b in enumerate(self.s):
                if i == self.n:
                    raise KeyboardInterrupt
                yield b

    search, target = _streams(paths, val)
    with pytest.raises(KeyboardInterrupt):
        run_method(cfg, stream=Crash(search, 27), target=target, out_dir=tmp_path / "b")
    assert json.loads((tmp_path / "b" / "weights.json").read_text())["final"] is False
    search, target = _streams(paths, val)
    res = run_method(cfg, stream=search, target=target, out_dir=tmp_path / "b", resume=True)
    assert res.weights == full.weights
    strip = lambda t: [{k: v for k, v in r.items() if k not in ("wall_s", "effective_batch")} for r in t]  # noqa: E731
    assert strip(read_trajectory(tmp_path / "b")) == strip(full.trajectory)
    for p, q in zip(res.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
