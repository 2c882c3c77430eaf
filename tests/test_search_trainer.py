"""run_search end to end on synthetic Markov sources: known answers, defects of the reference code,
checkpoint/resume, outputs, config handling."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import fastmix_data.search.trainer as trainer_mod
from fastmix_data.search import SearchConfig, read_trajectory, run_search
from fastmix_data.search.hypergrad import token_losses
from fastmix_data.search.model import build_proxy, proxy_config
from fastmix_data.search.synthetic import SyntheticStream, markov_sources, mixture_batches
from fastmix_data.search.trainer import loss_weights

K = 3
SOURCES = markov_sources(K, alphabet_size=16, seed=0)
B, L = 6, 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning
    OpenMP threads make them many times slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stream(seed=0, **kw):
    return SyntheticStream(SOURCES, batch_size=B, seq_len=L, seed=seed, **kw)


def target(props, seed=100, n=8):
    return mixture_batches(SOURCES, props, num_batches=n, batch_size=8, seq_len=L, seed=seed)


def cfg(**kw):
    base = dict(model="tiny", max_steps=60, outer_every=5, warmup_steps=10, z_lr=0.05, progress=False, plot=False)
    base.update(kw)
    return SearchConfig(**base)


# ---------------------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("seed", [0, 1])
def test_known_answer_target_source_rises_and_ends_highest(seed):
    r = run_search(stream(seed), target([1, 0, 0], seed=100 + seed), cfg(max_steps=150, seed=seed))
    w0 = [rec["weights"]["s0"] for rec in r.trajectory]
    assert r.last_weights["s0"] == max(r.last_weights.values()) and r.last_weights["s0"] > 0.6
    assert r.weights["s0"] == max(r.weights.values())
    assert w0[-1] > w0[len(w0) // 2] > w0[0] == pytest.approx(1 / 3)


def test_planted_mixture_weights_move_toward_it():
    planted = [0.6, 0.3, 0.1]
    r = run_search(stream(3), target(planted, seed=7), cfg(max_steps=150, seed=3))

    def l1(w):
        return sum(abs(w[f"s{k}"] - planted[k]) for k in range(K))

    uniform = l1({f"s{k}": 1 / K for k in range(K)})
    assert l1(r.average_weights) < 0.6 * uniform
    assert l1(r.last_weights) < uniform
    a = r.average_weights
    assert a["s0"] > a["s1"] > a["s2"]


# ---------------------------------------------------------------------------------------- defect 1


def _plain_training(model, batches, c: SearchConfig):
    """Plain alpha-weighted proxy training, written out by hand (no search at all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": c.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=c.lr,
        betas=c.betas,
    )
    uni = torch.full((K,), 1 / K, dtype=torch.float64)
    w = loss_weights(torch.softmax(torch.zeros(K, dtype=torch.float64), 0), uni)
    losses = []
    for i, b in enumerate(batches, start=1):
        tokens, source = b["tokens"], b["source"]
        x, y = tokens[:, :-1], tokens[:, 1:]
        logits = model.head(model.final_hidden(x))
        tl = token_losses(logits.reshape(B * L, -1), y.reshape(-1)).view(B, L)
        loss = (w[source] * tl.mean(1)).mean()
        losses.append(float(loss.detach()))
        (loss / c.grad_accum).backward()
        if i % c.grad_accum == 0:
            for g in opt.param_groups:
                g["lr"] = c.lr
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize(
    "hypergrad,search_batch,grad_accum",
    [("head", "window", 1), ("head", "window", 2), ("head", "buffer", 2), ("full", "buffer", 2)],
)
def test_search_never_touches_proxy_training(hypergrad, search_batch, grad_accum):
    """With z frozen (z_lr=0) the proxy trained by run_search -- outer steps, target passes and
    hypergradients included, some of them in the middle of a gradient accumulation -- is bitwise the
    proxy of plain training on the same batches (both on the CPU, where the reference trains)."""
    c = cfg(max_steps=12, outer_every=3, warmup_steps=0, z_lr=0.0, lr=3e-3, grad_accum=grad_accum,
            hypergrad=hypergrad, search_batch=search_batch, search_seqs_per_source=2, device="cpu")
    m_search = build_proxy(proxy_config("tiny"), seed=0)
    m_plain = build_proxy(proxy_config("tiny"), seed=0)
    r = run_search(stream(), target([1, 0, 0]), c, model=m_search)
    assert r.compute["outer_steps"] == 4 and r.compute["tokens"]["scored"] > 0
    _plain_training(m_plain, [stream().batch(i) for i in range(12)], c)
    for (n, p), q in zip(m_search.named_parameters(), m_plain.parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------------------------------- robustness


def test_nonfinite_hypergradient_is_skipped_and_counted(monkeypatch, tmp_path):
    real = trainer_mod.source_head_scores
    calls = {"n": 0}

    def flaky(*a, **kw):
        sc = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 23:  # one micro-batch of the window of steps 21..25
            sc.sums[:] = math.nan
        return sc

    monkeypatch.setattr(trainer_mod, "source_head_scores", flaky)
    r = run_search(stream(), target([1, 0, 0]), cfg(max_steps=40), out_dir=tmp_path)
    assert r.skipped_nonfinite == 1 and r.compute["skipped_nonfinite_hypergrad"] == 1
    bad = [rec for rec in r.trajectory if rec["reason"] == "nonfinite"]
    assert len(bad) == 1 and not bad[0]["updated"]
    i = r.trajectory.index(bad[0])
    assert r.trajectory[i]["weights"] == r.trajectory[i - 1]["weights"]
    assert json.loads((tmp_path / "weights.json").read_text())["skipped_nonfinite"] == 1


class _Crashing:
    """Wraps a stream; raises after `crash_after` batches (a simulated crash of the trainer)."""

    def __init__(self, inner, crash_after=None, stateful=True):
        self.inner, self.crash_after = inner, crash_after
        self.source_names = inner.source_names
        if stateful:
            self.state_dict = inner.state_dict
            self.load_state_dict = inner.load_state_dict

    def __iter__(self):
        for i, b in enumerate(self.inner):
            if self.crash_after is not None and i >= self.crash_after:
                raise RuntimeError("simulated crash")
            yield b


def _strip(traj):
    return [{k: v for k, v in rec.items() if k != "wall_s"} for rec in traj]


@pytest.mark.parametrize("stateful", [True, False])
def test_checkpoint_resume_continues_identically(tmp_path, stateful):
    c = cfg(max_steps=40, checkpoint_every=20, target_ema=0.5, flush_every_s=1e9)
    full = run_search(_Crashing(stream(), stateful=stateful), target([0.5, 0.5, 0]), c, out_dir=tmp_path / "a")

    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_search(_Crashing(stream(), crash_after=27, stateful=stateful), target([0.5, 0.5, 0]), c, out_dir=out)
    # after the crash: the trajectory is valid strict JSON Lines, the weights so far are on disk
    lines = (out / "trajectory.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert recs[-1]["step"] == 25 and len(recs) == 6
    w = json.loads((out / "weights.json").read_text())
    assert w["final"] is False and w["stopped_reason"] == "error: RuntimeError" and w["step"] == 27
    assert sum(w["weights"].values()) == pytest.approx(1.0)

    if stateful:
        res = run_search(_Crashing(stream(), stateful=True), target([0.5, 0.5, 0]), c, out_dir=out, resume=True)
    else:
        with pytest.warns(UserWarning, match="skipping the 20 batches"):
            res = run_search(_Crashing(stream(), stateful=False), target([0.5, 0.5, 0]), c, out_dir=out, resume=True)
    assert res.weights == full.weights and res.last_weights == full.last_weights
    assert _strip(res.trajectory) == _strip(full.trajectory)
    assert _strip(read_trajectory(out)) == _strip(read_trajectory(tmp_path / "a"))
    for p, q in zip(res.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
    assert json.loads((out / "weights.json").read_text())["final"] is True


def test_resume_refuses_changed_config_and_allows_bigger_budget(tmp_path):
    c = cfg(max_steps=20, checkpoint_every=10)
    run_search(stream(), target([1, 0, 0]), c, out_dir=tmp_path)
    with pytest.raises(ValueError, match="z_lr"):
        run_search(stream(), target([1, 0, 0]), cfg(max_steps=20, z_lr=0.5), out_dir=tmp_path, resume=True)
    more = run_search(stream(), target([1, 0, 0]), cfg(max_steps=30, checkpoint_every=10), out_dir=tmp_path, resume="auto")
    assert more.steps == 30 and [r["step"] for r in more.trajectory] == list(range(0, 31, 5))
    with pytest.raises(FileNotFoundError):
        run_search(stream(), target([1, 0, 0]), c, out_dir=tmp_path / "none", resume=True)


def test_token_budget_and_online_sink(tmp_path):
    sink = stream(seed=9, weights=[1, 1, 1])  # a training job's stream receiving the weights
    r = run_search(stream(), target([1, 0, 0]), cfg(max_steps=None, max_tokens=40 * B * L), sink=sink)
    assert r.stopped_reason == "max_tokens" and r.tokens == 40 * B * L
    updates = [rec for rec in r.trajectory if rec["updated"]]
    # constructor, the starting mixture, one per update, then the exported (average) weights
    assert len(updates) > 0 and len(sink.history) == 1 + 1 + len(updates) + 1
    assert all(rec["effective_batch"] == 0 for rec in r.trajectory)  # nobody consumed the sink's batches
    assert sink.history[-2][1] == pytest.approx(list(r.last_weights.values()))
    assert sink.history[-1][1] == pytest.approx(list(r.weights.values())) and r.final_effective_batch == 0
    assert r.weights == r.average_weights != r.last_weights


def test_answer_only_target_loss_mask_and_plain_mode():
    tb = target([0, 1, 0], n=2)
    for b in tb:
        m = torch.zeros(b["tokens"].shape[0], L, dtype=torch.bool)
        m[:, L // 2 :] = True  # "answer" half
        b["loss_mask"] = m
    r = run_search(stream(), tb, cfg(max_steps=30))
    assert r.compute["tokens"]["target"] == 7 * 8 * L  # 7 target passes (start + 6 outer steps) of 8 sequences
    assert all(math.isfinite(rec["target_loss"]) for rec in r.trajectory)
    last2 = run_search(stream(), tb, cfg(max_steps=30, score_last=2))
    assert last2.compute["tokens"]["scored"] == 6 * 2 * B * L  # 6 windows, 2 micro-batches each
    plain = run_search(stream(), None, cfg(max_steps=10, hypergrad="none"))
    assert plain.weights == {f"s{k}": pytest.approx(1 / 3) for k in range(K)}
    assert plain.compute["flops"]["hypergrad"] == 0 and plain.compute["tokens"]["target"] == 0


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="source names"):
        run_search(iter([]), target([1, 0, 0]), cfg())
    with pytest.raises(ValueError, match="init_weights.*missing"):
        run_search(stream(), target([1, 0, 0]), cfg(init_weights={"s0": 1.0}))
    bad = [{"tokens": torch.zeros(2, 9, dtype=torch.long), "source": torch.tensor([0, 5])}]
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        run_search(bad, target([1, 0, 0]), cfg(), source_names=["a", "b", "c"])
    big = [{"tokens": torch.full((2, 9), 300, dtype=torch.long), "source": torch.tensor([0, 1])}]
    with pytest.raises(ValueError, match="vocabulary"):
        run_search(big, target([1, 0, 0]), cfg(), source_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="target yielded no batch"):
        run_search(stream(), [], cfg())
    with pytest.raises(ValueError, match="a target is required"):
        run_search(stream(), None, cfg())


# ---------------------------------------------------------------------------------------- config


def test_config_validation_messages():
    with pytest.raises(ValueError, match="budget"):
        SearchConfig().validate()
    with pytest.raises(ValueError) as e:
        SearchConfig(max_steps=0, hypergrad="full", signal="cos", floor=1.5).validate()
    msg = str(e.value)
    for part in ("max_steps", "search_batch='buffer'", "signal", "floor"):
        assert part in msg
    with pytest.raises(ValueError, match="vocab_size"):
        SearchConfig(model="gpu", max_steps=1).validate()
    SearchConfig(model="gpu", model_args={"vocab_size": 50304}, max_steps=1).validate()


def test_config_from_yaml_dict():
    d = yaml.safe_load(
        """
        model: tiny
        max_tokens: 20M
        z_lr: 1e-2
        lr: 3e-4
        betas: [0.9, 0.99]
        floor: 0.01
        init_weights: {a: 1, b: 3}
        """
    )
    assert d["z_lr"] == "1e-2"  # YAML 1.1 reads it as a string
    c = SearchConfig.from_dict(d)
    assert c.max_tokens == 20_000_000 and c.z_lr == 0.01 and c.lr == 3e-4 and c.betas == (0.9, 0.99)
    assert SearchConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="did you mean 'outer_every'"):
        SearchConfig.from_dict({"outer_evry": 3, "max_steps": 1})
    with pytest.raises(ValueError, match="max_tokens"):
        SearchConfig.from_dict({"max_tokens": "lots"})


# ---------------------------------------------------------------------------------------- end to end


def test_cpu_end_to_end_smoke(tmp_path):
    """The default cpu preset, every output file, progress bar on."""
    c = SearchConfig(model="cpu", max_steps=40, outer_every=10, warmup_steps=10, checkpoint_every=20)
    s = SyntheticStream(SOURCES, batch_size=8, seq_len=64, seed=0, names=["code", "prose", "math"])
    r = run_search(s, mixture_batches(SOURCES, [0, 0, 1], num_batches=2, batch_size=4, seq_len=64), c, out_dir=tmp_path)
    for f in ("weights.json", "trajectory.jsonl", "trajectory.png", "compute.json", "checkpoint.pt", "search_config.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    w = json.loads((tmp_path / "weights.json").read_text())
    assert w["final"] and set(w["weights"]) == {"code", "prose", "math"} and w["mode"] == "average"
    comp = json.loads((tmp_path / "compute.json").read_text())
    n = comp["n_params_flops"]
    assert comp["flops"]["train"] == 6 * n * 40 * 8 * 64
    assert comp["flops"]["eval"] == 2 * n * comp["tokens"]["target"] > 0
    assert comp["flops"]["total"] > comp["flops"]["train"] and comp["wall_s"] > 0
    traj = read_trajectory(tmp_path)
    assert [rec["step"] for rec in traj] == [0, 10, 20, 30, 40]
    rec = traj[-1]
    for key in ("weights", "source_loss", "target_loss", "entropy", "min_weight", "tokens", "effective_batch"):
        assert key in rec
    assert rec["tokens"] == 40 * 8 * 64 and 0 < rec["min_weight"] <= 1 / 3 and rec["entropy"] <= math.log(3) + 1e-9
    assert r.stopped_reason == "max_steps"


def test_a_budget_too_short_to_update_the_mixture_is_warned_about():
    with pytest.warns(UserWarning, match="warmup_steps=100 \\+ outer_every=20"):
        r = run_search(stream(), target([1, 0, 0]), cfg(max_steps=30, warmup_steps=100, outer_every=20))
    assert not any(rec["updated"] for rec in r.trajectory)
