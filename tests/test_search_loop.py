"""The FastMix loop end to end on synthetic Markov sources: known answers at the defaults, the
reference code's defects, checkpoint/resume, the publishing hook, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastmix_data.search.fastmix.loop as loop_mod
from fastmix_data.search import SearchConfig, read_trajectory, run_method
from fastmix_data.search.model import build_proxy, proxy_config
from fastmix_data.search.proxy import ProxyTrainer
from fastmix_data.search.synthetic import SyntheticStream, markov_sources, mixture_target

K = 3
SOURCES = markov_sources(K, alphabet_size=16, seed=0)
B, L = 6, 32


def stream(seed=0, **kw):
    return SyntheticStream(SOURCES, batch_size=B, seq_len=L, seed=seed, **kw)


def target(props, seed=100, n=64):
    return mixture_target(SOURCES, props, num_seqs=n, seq_len=L, seed=seed)


def cfg(steps=60, **fastmix) -> SearchConfig:
    base = {"warmup_steps": 10, "outer_every": 5, "z_lr": 0.05, "target_batches_per_step": 1}
    base.update(fastmix)
    return SearchConfig.from_dict({"max_tokens": steps * B * L, "fastmix": base, "target": {"batch_size": 8},
                                   "train": {"proxy": "tiny", "batch_size": B, "seq_len": L, "lr_schedule": "constant",
                                             "lr_warmup_steps": 0},
                                   "output": {"progress": False, "plot": False, "checkpoint_every": 20}})


def search(data, tgt, c, **kw):
    return run_method(c, stream=data, target=tgt, **kw)


def l1(w, planted):
    return sum(abs(w[f"s{k}"] - planted[k]) for k in range(K))


# ---------------------------------------------------------------------------------------- at the defaults


def test_at_its_defaults_fastmix_moves_clearly_toward_a_planted_mixture():
    """Only the budget and the (tiny) proxy are set: schedule, step size and export are the defaults."""
    planted = [0.6, 0.3, 0.1]
    c = SearchConfig.from_dict({"max_tokens": 300 * B * L, "train": {"proxy": "tiny", "batch_size": B, "seq_len": L},
                                "output": {"progress": False, "plot": False}})
    r = search(stream(3), target(planted, seed=7, n=128), c)
    uniform = l1({f"s{k}": 1 / K for k in range(K)}, planted)
    assert l1(r.weights, planted) < 0.25 < 0.5 * uniform, r.weights  # uniform is 0.53 away
    assert r.weights["s0"] > r.weights["s1"] > r.weights["s2"]
    assert r.exported == "average" and r.details["schedule"]["updates"] >= 90


@pytest.mark.parametrize("seed", [0, 1])
def test_known_answer_target_source_rises_and_ends_highest(seed):
    r = search(stream(seed), target([1, 0, 0], seed=100 + seed), cfg(150).replace(**{"train.seed": seed}))
    w0 = [rec["weights"]["s0"] for rec in r.trajectory]
    assert r.candidates["last"]["s0"] == max(r.candidates["last"].values()) and r.candidates["last"]["s0"] > 0.6
    assert r.weights["s0"] == max(r.weights.values())
    assert w0[-1] > w0[len(w0) // 2] > w0[0] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------- defect 1


def _plain_training(model, batches, c: SearchConfig):
    """Plain uniformly weighted proxy training on the same trainer (no target, no scores, no
    outer steps, no held-out batches): what the search must not disturb."""
    tr = ProxyTrainer(c.train, 1_000, model=model, num_sources=K)
    for b in batches:
        tr.train_step(b["tokens"], b["source"], loss_w=torch.ones(K))
    return model


@pytest.mark.parametrize("hypergrad,search_batch,grad_accum",
                         [("head", "window", 1), ("head", "window", 2), ("head", "buffer", 2), ("full", "buffer", 2)])
def test_search_never_touches_proxy_training(hypergrad, search_batch, grad_accum, monkeypatch):
    """With z frozen (z_lr=0) the proxy trained by the loop -- outer steps, target passes and
    hypergradients included, some in the middle of a gradient accumulation -- is bitwise the proxy
    of plain training on the same batches (the residual signal's held-out batches are not trained on)."""
    c = cfg(12, warmup_steps=0, outer_every=3, z_lr=0.0, hypergrad=hypergrad, search_batch=search_batch,
            search_seqs_per_source=2).replace(**{"train.grad_accum": grad_accum, "train.device": "cpu"})
    trained = []
    inner = loop_mod.FastMixLoop.inner_step
    monkeypatch.setattr(loop_mod.FastMixLoop, "inner_step", lambda self, b: trained.append(b["batch_index"]) or inner(self, b))
    m_search, m_plain = build_proxy(proxy_config("tiny"), seed=0), build_proxy(proxy_config("tiny"), seed=0)
    r = search(stream(), target([1, 0, 0]), c, model=m_search)
    assert r.details["outer_steps"] == 4 and r.compute["tokens"]["scored"] > 0
    held = r.details["held_out_batches"]  # forwarded for the training gradient, never trained on
    assert len(trained) == 12 and held == (10 if hypergrad == "head" else 0)
    _plain_training(m_plain, [stream().batch(i) for i in trained], c)
    for (n, p), q in zip(m_search.named_parameters(), m_plain.parameters()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------------------------------- robustness


def test_nonfinite_hypergradient_is_skipped_and_counted(monkeypatch, tmp_path):
    real = ProxyTrainer.train_step
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        m = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 23:  # one micro-batch of the window of steps 21..25
            m.scores.sums[:] = math.nan
        return m

    monkeypatch.setattr(ProxyTrainer, "train_step", flaky)
    r = search(stream(), target([1, 0, 0]), cfg(40), out_dir=tmp_path)
    assert r.details["skipped_nonfinite_hypergrad"] == 1
    bad = [rec for rec in r.trajectory if rec["reason"] == "nonfinite"]
    assert len(bad) == 1 and not bad[0]["updated"]
    i = r.trajectory.index(bad[0])
    assert r.trajectory[i]["weights"] == r.trajectory[i - 1]["weights"]
    assert json.loads((tmp_path / "weights.json").read_text())["details"]["skipped_nonfinite_hypergrad"] == 1


class _Crashing:
    """Wraps a stream; raises after `crash_after` batches (a simulated crash of the trainer)."""

    def __init__(self, inner, crash_after=None, stateful=True):
        self.inner, self.crash_after = inner, crash_after
        self.source_names = inner.source_names
        if stateful:
            self.state_dict, self.load_state_dict = inner.state_dict, inner.load_state_dict

    def __iter__(self):
        for i, b in enumerate(self.inner):
            if self.crash_after is not None and i >= self.crash_after:
                raise RuntimeError("simulated crash")
            yield b


def _strip(traj):
    return [{k: v for k, v in rec.items() if k != "wall_s"} for rec in traj]


@pytest.mark.parametrize("stateful, precondition", [(True, False), (False, False), (True, True)])
def test_checkpoint_resume_continues_identically(tmp_path, stateful, precondition):
    """Also with fastmix.precondition: P is derived from the restored optimiser state, nothing of its own is saved."""
    c = cfg(40, target_ema=0.5, precondition=precondition).replace(**{"output.flush_every_s": 1e9})
    full = search(_Crashing(stream(), stateful=stateful), target([0.5, 0.5, 0]), c, out_dir=tmp_path / "a")
    out = tmp_path / "b"
    # the stream also feeds the residual signal 2 held-out batches at the start and at every outer step
    def consumed(step):
        return step + 2 * (1 + step // 5)

    assert full.details["held_out_batches"] == 2 * (1 + 40 // 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        search(_Crashing(stream(), crash_after=consumed(27), stateful=stateful), target([0.5, 0.5, 0]), c, out_dir=out)
    recs = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 25 and len(recs) == 6  # strict JSON Lines up to the crash
    w = json.loads((out / "weights.json").read_text())
    assert w["final"] is False and w["stopped_reason"] == "error: RuntimeError" and sum(w["weights"].values()) == pytest.approx(1)
    if stateful:
        res = search(_Crashing(stream()), target([0.5, 0.5, 0]), c, out_dir=out, resume=True)
    else:
        with pytest.warns(UserWarning, match=f"skipping the {consumed(20)} batches"):
            res = search(_Crashing(stream(), stateful=False), target([0.5, 0.5, 0]), c, out_dir=out, resume=True)
    assert res.weights == full.weights and res.candidates == full.candidates
    assert _strip(read_trajectory(out)) == _strip(read_trajectory(tmp_path / "a"))
    for p, q in zip(res.model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)
    assert json.loads((out / "weights.json").read_text())["final"] is True
    assert res.compute["tokens"] == full.compute["tokens"] and res.compute["flops"] == full.compute["flops"]


def test_resume_refuses_changed_config_and_allows_bigger_budget(tmp_path):
    search(stream(), target([1, 0, 0]), cfg(20), out_dir=tmp_path)
    with pytest.raises(ValueError, match="fastmix.z_lr"):
        search(stream(), target([1, 0, 0]), cfg(20, z_lr=0.5), out_dir=tmp_path, resume=True)
    more = search(stream(), target([1, 0, 0]), cfg(30), out_dir=tmp_path, resume="auto")
    assert more.details["micro_batches"] == 30 and [r["step"] for r in more.trajectory] == list(range(0, 31, 5))
    with pytest.raises(FileNotFoundError):
        search(stream(), target([1, 0, 0]), cfg(20), out_dir=tmp_path / "none", resume=True)


def test_every_mixture_leaves_through_the_publish_hook(tmp_path):
    sink = stream(seed=9, weights=[1, 1, 1])  # a training job's stream receiving the weights
    seen = []
    r = search(stream(), target([1, 0, 0]), cfg(40), sink=[sink, seen.append], out_dir=tmp_path)
    updates = [rec for rec in r.trajectory if rec["updated"]]
    # the constructor's weights, the starting mixture, one per update, then the exported weights
    assert len(updates) > 0 and len(sink.history) == 1 + 1 + len(updates) + 1 == len(seen) + 1
    assert all(rec["effective_batch"] == 0 for rec in r.trajectory)  # nobody consumed the sink's batches
    assert seen[-2] == pytest.approx(r.candidates["last"]) and seen[-1] == pytest.approx(r.weights)
    assert r.exported == "average" and r.weights == r.candidates["average"] != r.candidates["last"]


def test_answer_only_target_and_plain_mode():
    tgt = target([0, 1, 0], n=16)
    tgt.loss_mask = torch.zeros(len(tgt), L, dtype=torch.bool)
    tgt.loss_mask[:, L // 2 :] = True  # the "answer" half
    r = search(stream(), tgt, cfg(30, residual=False))
    assert r.compute["tokens"]["eval"] == 7 * 8 * L  # 7 target passes (start + 6 outer steps) of 8 sequences
    # the residual signal adds a pass over held-out training sequences at each of them
    assert search(stream(), tgt, cfg(30)).compute["tokens"]["eval"] > 7 * 8 * L
    assert all(math.isfinite(rec["target_loss"]) for rec in r.trajectory)
    last2 = search(stream(), tgt, cfg(30, score_last=2))
    assert last2.compute["tokens"]["scored"] == 6 * 2 * B * L  # 6 windows, 2 micro-batches each
    plain = search(stream(), None, cfg(10, hypergrad="none"))
    assert plain.weights == {f"s{k}": pytest.approx(1 / 3) for k in range(K)}
    assert plain.compute["flops"]["hypergrad"] == 0 and plain.compute["tokens"]["eval"] == 0


def _references(monkeypatch) -> list[tuple]:
    """Each call of the loop's ``_reference``: (G_T, G_train or None, the reference it returned)."""
    calls, real = [], loop_mod.FastMixLoop._reference

    def spy(self, train_grad):
        ref = real(self, train_grad)
        calls.append((self.ema.value.clone(), None if train_grad is None else train_grad.clone(), ref.clone()))
        return ref

    monkeypatch.setattr(loop_mod.FastMixLoop, "_reference", spy)
    return calls


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_residual_weight_scales_the_training_gradient_in_the_reference(weight, monkeypatch):
    calls = _references(monkeypatch)
    r = search(stream(), target([0.6, 0.3, 0.1]), cfg(30, residual_weight=weight))
    assert len(calls) == 7 and r.details["residual"] is True  # start + 6 outer steps
    for g_t, g_train, ref in calls:
        assert g_train is not None and g_train.abs().sum() > 0
        want = g_t - g_train if weight == 1.0 else g_t - weight * g_train
        assert torch.equal(ref, want)  # 1.0: exactly today's G_T - G_train
    if weight == 1.0:
        monkeypatch.undo()
        assert search(stream(), target([0.6, 0.3, 0.1]), cfg(30)).weights == r.weights  # = the default


def test_residual_weight_zero_is_the_plain_signal_without_the_training_gradient(monkeypatch):
    calls = _references(monkeypatch)
    zero = search(stream(), target([0.6, 0.3, 0.1]), cfg(30, residual_weight=0.0))
    assert calls and all(g_train is None and torch.equal(ref, g_t) for g_t, g_train, ref in calls)
    off = search(stream(), target([0.6, 0.3, 0.1]), cfg(30, residual=False))
    assert zero.details["residual"] is False and zero.weights == off.weights
    assert zero.compute["tokens"]["eval"] == off.compute["tokens"]["eval"] == 7 * 8 * L  # no held-out passes


def test_residual_weight_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"fastmix.residual_weight .*must be <= 1, got 1.5"):
        cfg(30, residual_weight=1.5).validate()
    with pytest.raises(ValueError, match=r"fastmix.residual_weight .*must be >= 0, got -0.1"):
        cfg(30, residual_weight=-0.1).validate()


def _adam_scale(trainer) -> torch.Tensor | None:
    """AdamW's step scale ``1 / (sqrt(exp_avg_sq / (1 - beta2**step)) + eps)`` for the head weight, from
    the optimiser's state as torch keeps it (None before the first step)."""
    st = trainer.opt.state.get(trainer.model.head.weight)
    if not st:
        return None
    return 1 / ((st["exp_avg_sq"] / (1 - trainer.cfg.betas[1] ** float(st["step"]))).sqrt() + 1e-8)


def test_precondition_scores_against_adams_step_scale_times_the_reference(monkeypatch):
    calls, real = [], loop_mod.FastMixLoop._reference

    def spy(self, train_grad):
        ref = real(self, train_grad)
        calls.append((self.ema.value - train_grad, _adam_scale(self.trainer), ref.clone()))
        return ref

    monkeypatch.setattr(loop_mod.FastMixLoop, "_reference", spy)
    on = search(stream(), target([0.6, 0.3, 0.1]), cfg(30, precondition=True))
    assert len(calls) == 7 and calls[0][1] is None and torch.equal(calls[0][2], calls[0][0])  # before any step: P = 1
    for plain, P, ref in calls[1:]:
        torch.testing.assert_close(ref, P * plain, rtol=1e-6, atol=0)
        assert torch.nn.functional.cosine_similarity(ref.flatten(), plain.flatten(), dim=0) < 0.99  # another direction
    monkeypatch.undo()
    assert on.weights != search(stream(), target([0.6, 0.3, 0.1]), cfg(30)).weights


def test_precondition_off_never_reads_the_optimiser_state(monkeypatch):
    """The default path does not consult P at all: the same search with the preconditioner made to fail."""
    from fastmix_data.search.proxy_step import ProxyStep

    before = search(stream(), target([0.6, 0.3, 0.1]), cfg(30))

    def boom(self):
        raise AssertionError("head_preconditioner called with fastmix.precondition off")

    monkeypatch.setattr(ProxyStep, "head_preconditioner", boom)
    after = search(stream(), target([0.6, 0.3, 0.1]), cfg(30))
    assert after.weights == before.weights and after.candidates == before.candidates


def test_precondition_needs_the_head_hypergradient_and_works_with_either_search_batch():
    with pytest.raises(ValueError, match=r"fastmix.precondition \(--fastmix-precondition\): needs hypergrad='head' "
                                         r".*got hypergrad='full'"):
        cfg(30, precondition=True, hypergrad="full", search_batch="buffer").validate()
    with pytest.raises(ValueError, match=r"fastmix.precondition .*got hypergrad='none'"):
        cfg(30, precondition=True, hypergrad="none").validate()
    buffered = search(stream(), target([0.6, 0.3, 0.1]), cfg(30, precondition=True, search_batch="buffer"))
    assert buffered.weights != search(stream(), target([0.6, 0.3, 0.1]), cfg(30, search_batch="buffer")).weights


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="no sources"):
        search(iter([]), target([1, 0, 0]), cfg())
    with pytest.raises(ValueError, match="init_weights.*missing"):
        search(stream(), target([1, 0, 0]), cfg(init_weights={"s0": 1.0}))

    class Fixed(list):
        source_names = ["a", "b", "c"]

    bad = Fixed([{"tokens": torch.zeros(2, 9, dtype=torch.long), "source": torch.tensor([0, 5])}])
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        search(bad, target([1, 0, 0]), cfg())
    big = Fixed([{"tokens": torch.full((2, 9), 300, dtype=torch.long), "source": torch.tensor([0, 1])}])
    with pytest.raises(ValueError, match="vocabulary"):
        search(big, target([1, 0, 0]), cfg())
    with pytest.raises(ValueError, match="needs a target"):
        search(stream(), None, cfg())


def test_cpu_end_to_end_smoke(tmp_path):
    """The default cpu preset, every output file, progress bar on."""
    c = SearchConfig.from_dict({"max_tokens": 40 * 8 * 64, "train": {"batch_size": 8, "seq_len": 64},
                                "fastmix": {"outer_every": 10, "warmup_steps": 10}})
    s = SyntheticStream(SOURCES, batch_size=8, seq_len=64, seed=0, names=["code", "prose", "math"])
    tgt = mixture_target(SOURCES, [0, 0, 1], num_seqs=8, seq_len=64, names=["code", "prose", "math"])
    r = search(s, tgt, c, out_dir=tmp_path)
    for f in ("weights.json", "trajectory.jsonl", "trajectory.png", "compute.json", "checkpoint.pt", "search_config.json"):
        assert (tmp_path / f).stat().st_size > 0, f
    w = json.loads((tmp_path / "weights.json").read_text())
    assert w["final"] and set(w["weights"]) == {"code", "prose", "math"} and w["exported"] == "average"
    assert w["shares"]["samples"] is None  # a synthetic stream has no shard index
    comp = json.loads((tmp_path / "compute.json").read_text())
    n = comp["n_params_flops"]
    assert comp["flops"]["train"] == 6 * n * 40 * 8 * 64
    assert comp["flops"]["eval"] == 2 * n * comp["tokens"]["eval"] > 0
    assert comp["flops"]["total"] > comp["flops"]["train"] and comp["wall_s"] > 0
    traj = read_trajectory(tmp_path)
    assert [rec["step"] for rec in traj] == [0, 10, 20, 30, 40]
    rec = traj[-1]
    assert rec["tokens"] == 40 * 8 * 64 and 0 < rec["min_weight"] <= 1 / 3 and rec["entropy"] <= math.log(3) + 1e-9
    assert r.stopped_reason == "max_tokens"
    resolved = json.loads((tmp_path / "search_config.json").read_text())["resolved"]
    assert resolved["fastmix"]["outer_every"] == 10 and resolved["micro_batches"] == 40


def test_a_budget_too_short_to_update_the_mixture_is_warned_about():
    with pytest.warns(UserWarning, match="first updated after warmup_steps=100"):
        r = search(stream(), target([1, 0, 0]), cfg(30, warmup_steps=100, outer_every=20))
    assert not any(rec["updated"] for rec in r.trajectory)
