"""Fuzz: mutations of real manifests (drop, duplicate, retype, negate, huge, NaN fields), with the
fingerprint left as it was or recomputed by the "editor".

Every entry point that takes a manifest (validate/read_manifest, manifest_plan, the converters,
stream_from_manifest, the CLI) either refuses it with a `ManifestError` naming a field on the
mutated path, or accepts it, and then: with the fingerprint untouched, it serves and converts to
exactly what the original does; with a recomputed fingerprint, its counts are what its own plan
serves (checked position by position, independently of the closed form the validator uses).
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
from fuzzkit import fuzz_settings, mutations, names_field
from hypothesis import event, given
from hypothesis import strategies as st
from shardgen import make_docs, plan_counts, write_parquet_source, write_wds_source

from fastmix_data.errors import FastMixDataError, ManifestError
from fastmix_data.export import build_manifest, manifest_plan, plan_fingerprint, validate_manifest
from fastmix_data.export.converters import (
    hf_interleave,
    megatron_args,
    megatron_blend,
    olmo_mixture,
    wids_index,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    write_parquet_source(root / "code", make_docs(60, seed=1, prefix="code"), shards=3, ids_col="input_ids")
    write_wds_source(root / "web", make_docs(40, seed=2, prefix="web"), shards=2)
    write_parquet_source(root / "tiny", make_docs(5, seed=3, prefix="tiny"), shards=1)
    return root


@pytest.fixture(scope="module")
def manifests(corpus):
    srcs = {"code": str(corpus / "code"), "web": str(corpus / "web" / "*.tar"), "tiny": str(corpus / "tiny")}
    history = [{"position": 70, "weights": {"code": 0.2, "web": 0.7, "tiny": 0.1}}]
    samples = build_manifest(
        srcs, {"code": 0.5, "web": 0.3, "tiny": 0.2}, 250, root=corpus, seed=4, history=history,
        exhaustion={"tiny": {"policy": "cap", "max_epochs": 9}},
    )  # fmt: skip
    packing = build_manifest(
        {"code": srcs["code"], "web": srcs["web"]}, {"code": 1, "web": 1}, "3k_tokens", root=corpus, seed=1,
        seq_len=31, weight_units="tokens",
    )  # fmt: skip
    return {"samples": json.loads(json.dumps(samples)), "packing": json.loads(json.dumps(packing))}


# What a refusal may name instead of the mutated key: a fingerprint that no longer matches; for a
# moved path or root, the shard file it now points at; after a recomputed fingerprint, the derived
# count that no longer matches the (changed) plan.
_PATH_MESSAGES = ("is missing", "escapes", "absolute", "outside", "empty or non-string path", "shards")
_DERIVED_MESSAGES = ("plan gives", "must be the sum", "realised share", "plan ends", "take values sum")


def _names(message: str, path: tuple, refingerprint: bool) -> bool:
    also = ["fingerprint"]
    if any(k in ("path", "root") for k in path):
        also += _PATH_MESSAGES
    if refingerprint:
        also += _DERIVED_MESSAGES
    return names_field(message, path, also=tuple(also))


def _outputs(m) -> dict:
    out = {
        "blend": megatron_blend(m),
        "blend_shards": megatron_blend(m, per_shard=True),
        "args": megatron_args(m, "blend.txt"),
        "hf": hf_interleave(m),
        "wids": wids_index(m, m["root"]),
        "plan": manifest_plan(m).plan(0, int(m["budget"]["items"])),
    }
    olmo = olmo_mixture(m)
    out["olmo"] = [(c["source_name"], c["paths"]) for c in olmo["source_configs"]]
    out["olmo_ratios"] = [c["target_ratio"] for c in olmo["source_configs"]]
    return out


def _same(a: dict, b: dict) -> None:
    for key in ("blend", "blend_shards", "args", "hf", "wids", "olmo"):
        assert a[key] == b[key], key
    assert a["olmo_ratios"] == pytest.approx(b["olmo_ratios"], abs=1e-3)
    for field in ("position", "source", "shard", "item", "epoch"):
        assert (getattr(a["plan"], field) == getattr(b["plan"], field)).all()


def _self_consistent(m) -> None:
    """The counts an accepted manifest states are what its plan serves, position by position."""
    plan = manifest_plan(m)
    n = int(m["budget"]["items"])
    brute = plan_counts(plan, n, chunk=97)
    assert [[sh["take"] for sh in s["shards"]] for s in m["sources"]] == [b.tolist() for b in brute]
    assert sum(s["take"] for s in m["sources"]) == n
    for s in m["sources"]:
        for sh in s["shards"]:
            for key in ("rows", "items", "take", "bytes", "take_tokens", "epochs"):
                assert isinstance(sh[key], int) and not isinstance(sh[key], bool) and sh[key] >= 0


@fuzz_settings(120)
@given(data=st.data(), kind=st.sampled_from(["samples", "packing"]), refingerprint=st.booleans())
def test_mutated_manifest_is_refused_naming_the_field_or_means_the_same(manifests, data, kind, refingerprint):
    original = manifests[kind]
    m, applied = data.draw(mutations(original))
    if refingerprint:
        try:
            m["fingerprint"] = plan_fingerprint(m)
        except Exception:  # the editor's tool could not hash it either: keep the old one
            pass
    try:
        validate_manifest(m, verify="size")
    except ManifestError as exc:
        event("refused")
        assert any(_names(str(exc), p, refingerprint) for p, _ in applied), (str(exc), applied)
        return
    # accepted: every other entry point accepts it too, and it means what it says
    event("accepted" + (" (fingerprint unchanged)" if m["fingerprint"] == original["fingerprint"] else ""))
    got = _outputs(m)
    if m["fingerprint"] == original["fingerprint"]:
        assert plan_fingerprint(m) == plan_fingerprint(original)
        _same(got, _outputs(original))
    else:
        _self_consistent(m)


def _edited(manifest, fn):
    m = copy.deepcopy(manifest)
    fn(m)
    m["fingerprint"] = plan_fingerprint(m)  # an editor that recomputes the fingerprint
    return m


def _set_shard(key, value):
    return lambda m: m["sources"][1]["shards"][0].update({key: value})


@pytest.mark.parametrize(
    "edit,field",
    [
        (_set_shard("take", -3), r"sources\[1\]\(web\)\.shards\[0\]\(web/shard-00000\.tar\)\.take is -3"),
        (_set_shard("items", -1), r"sources\[1\]\(web\)\.shards\[0\]\(web/shard-00000\.tar\)\.items is -1"),
        (_set_shard("rows", -5), r"\.shards\[0\]\(web/shard-00000\.tar\)\.rows is -5"),
        (_set_shard("take", 10**6), r"\.shards\[0\]\(web/shard-00000\.tar\)\.take is 1000000"),
        (lambda m: m["budget"].update(items=-250), r"budget\.items is -250"),
        (lambda m: m["history"][1].update(weights=[0.0, 0.0, 0.0]), r"history\[1\]\.weights is all zero"),
        (lambda m: m["history"][1].update(weights=[-0.5, 1.0, 0.5]), r"history\[1\]\.weights.*'code' is negative"),
        (lambda m: m["sources"][0].update(format="csv"), r"sources\[0\]\(code\)\.format is 'csv'"),
        (lambda m: m["sources"][2]["exhaustion"].update(policy="loop"), r"exhaustion\.policy is 'loop'"),
        (lambda m: m["sources"][2]["exhaustion"].update(max_epochs=0), r"exhaustion\.max_epochs is 0"),
        (lambda m: m["mode"].update(kind="streaming"), r"mode\.kind is 'streaming'"),
    ],
)
def test_nonsense_is_refused_even_with_a_recomputed_fingerprint(manifests, edit, field):
    m = _edited(manifests["samples"], edit)
    with pytest.raises(ManifestError, match=field):
        validate_manifest(m, verify="none")
    for convert in (megatron_blend, hf_interleave, olmo_mixture):
        with pytest.raises(ManifestError, match=field):
            convert(m)


def test_cli_refuses_an_edited_manifest_naming_field_and_shard(manifests, tmp_path):
    m = _edited(manifests["samples"], _set_shard("take", -3))
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(m))
    for cmd in (["convert", "--manifest", str(path), "--to", "megatron"],
                ["resample", "--manifest", str(path), "--out", str(tmp_path / "out")]):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "fastmix_data.cli", *cmd], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert "sources[1](web).shards[0](web/shard-00000.tar).take is -3" in done.stderr
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_overflowing_history_weights_plan_without_overflow(manifests):
    m = _edited(manifests["samples"], lambda m: m["history"][1].update(weights=[1e308, 1e308, 0.0]))
    from fastmix_data.export.manifest_check import plan_of

    plan = plan_of(m)  # the counts no longer match (refused below), but the plan itself is sane
    seg = plan.segments()[-1]
    assert all(math.isfinite(w) for w in seg.weights) and seg.weights.sum() == pytest.approx(1.0)
    with pytest.raises(ManifestError, match="take"):
        validate_manifest(m, verify="none")
    assert isinstance(ManifestError("x"), FastMixDataError)
