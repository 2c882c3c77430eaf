"""The manifest: closed-form per-shard counts, budgets, fields, fingerprint, and every bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shardgen import (
    make_docs,
    overwrite,
    plan_counts,
    write_hf_source,
    write_parquet_source,
    write_wds_source,
)

from fastmix_data.errors import ManifestError, WeightsError
from fastmix_data.export import build_manifest, read_manifest, validate_manifest, write_manifest
from fastmix_data.export.from_manifest import manifest_plan
from fastmix_data.export.manifest import plan_fingerprint, summary
from fastmix_data.plan.planner import Exhaustion, MixturePlan, WeightChange
from fastmix_data.sources import ShardedSource
from fastmix_data.sources.base import ShardInfo
from fastmix_data.sources.reader import Columns


@pytest.fixture
def corpus(tmp_path):
    write_parquet_source(tmp_path / "code", make_docs(300, prefix="code"), shards=4)
    write_wds_source(tmp_path / "web", make_docs(200, prefix="web", seed=1), shards=3)
    return tmp_path


def _sources(root):
    return {"code": str(root / "code"), "web": str(root / "web")}


def _takes(m):
    return [[sh["take"] for sh in s["shards"]] for s in m["sources"]]


# --- counts: the closed form equals planning every position -------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=6), min_size=1, max_size=4),
    st.integers(0, 2**31),
    st.integers(1, 600),
    st.data(),
)
def test_shard_takes_equal_planning_every_position(sizes, seed, n, data):
    sizes = [s if sum(s) else s[:-1] + [1] for s in sizes]
    k = len(sizes)
    raw = data.draw(st.lists(st.floats(0.05, 1.0), min_size=k, max_size=k))
    w = tuple(np.asarray(raw) / sum(raw))
    history = [WeightChange(0, 0, w)]
    if data.draw(st.booleans()):
        history.append(WeightChange(1, data.draw(st.integers(1, n)), tuple(reversed(w)) if k > 1 else w))
    pols = [Exhaustion(data.draw(st.sampled_from(["repeat", "cap", "drop"])), 2) for _ in range(k)]
    pols = [Exhaustion("repeat")] + pols[1:]  # at least one source never runs out
    plan = MixturePlan([f"s{i}" for i in range(k)], sizes, seed, history, pols, True, n)
    plan.segments()
    end = plan.end
    draws = plan.draws_before(end)
    brute = plan_counts(plan, end, chunk=37)
    for src in range(k):
        take, epochs = plan.shard_takes(end)[src]
        assert take.tolist() == brute[src].tolist()
        assert ((take > 0) == (epochs > 0)).all()
        full = int(draws[src]) // max(sum(sizes[src]), 1)
        assert (epochs[np.asarray(sizes[src]) > 0] >= full).all()


def test_manifest_counts_match_the_plan(corpus):
    history = [{"position": 400, "weights": {"code": 0.9, "web": 0.1}}]
    m = build_manifest(
        _sources(corpus), {"code": 0.2, "web": 0.8}, 1500, root=corpus, seed=5, history=history
    )
    plan = manifest_plan(m)
    brute = plan_counts(plan, 1500, chunk=128)
    assert _takes(m) == [b.tolist() for b in brute]
    assert sum(s["take"] for s in m["sources"]) == m["budget"]["items"] == 1500
    web = m["sources"][1]
    assert web["epochs"] == pytest.approx(web["take"] / 200)
    assert max(sh["epochs"] for sh in web["shards"]) == -(-web["take"] // 200)
    assert [h["position"] for h in m["history"]] == [0, 400]
    assert m["weights"]["requested"] == {"code": 0.9, "web": 0.1}
    assert m["weights"]["initial"] == {"code": 0.2, "web": 0.8}


# --- fields ---------------------------------------------------------------------------------------


def test_fields_paths_and_realised_weights(corpus):
    m = build_manifest(_sources(corpus), {"code": 0.25, "web": 0.75}, "1k_samples", root=corpus, seed=1)
    assert m["format"] == "fastmix_data/manifest" and m["version"] == 1
    assert m["root"] == str(corpus) and m["seed"] == 1 and m["shuffle"] is True
    assert m["mode"] == {"kind": "samples", "tokenizer": "bytes-v1"}
    assert m["budget"]["requested"] == "1k_samples" and m["budget"]["items"] == 1000
    code, web = m["sources"]
    assert code["format"] == "parquet" and web["format"] == "webdataset"
    assert code["columns"] == {"text": "text", "ids": None, "extra": []}
    assert web["columns"]["text"] == "txt"
    assert code["exhaustion"] == {"policy": "repeat", "max_epochs": None}
    assert [sh["path"] for sh in code["shards"]] == [f"code/part-0000{i}.parquet" for i in range(4)]
    for s in m["sources"]:
        for sh in s["shards"]:
            assert not os.path.isabs(sh["path"])
            path = corpus / sh["path"]
            assert sh["bytes"] == path.stat().st_size and len(sh["sha256"]) == 64
            assert sh["items"] == sh["rows"]
    assert m["weights"]["realised_items"] == {"code": 0.25, "web": 0.75}
    assert sum(m["weights"]["realised_tokens"].values()) == pytest.approx(1.0)
    assert m["weights"]["requested_items"]["code"] == pytest.approx(0.25)
    assert "code" in summary(m)


def test_hf_and_ids_sources(tmp_path):
    write_hf_source(tmp_path / "hf", make_docs(50), shards=2)
    write_parquet_source(
        tmp_path / "ids", make_docs(40, seed=3), shards=2, text_col=None, ids_col="input_ids"
    )
    m = build_manifest({"hf": str(tmp_path / "hf"), "ids": str(tmp_path / "ids")}, [1, 1], 100, root=tmp_path)
    assert m["sources"][0]["format"] == "hf" and m["sources"][1]["columns"]["ids"] == "input_ids"
    assert _takes(m) == [b.tolist() for b in plan_counts(manifest_plan(m), 100)]


def test_default_root_is_the_common_directory(corpus):
    m = build_manifest(_sources(corpus), [1, 1], 10)
    assert m["root"] == str(corpus)


# --- budgets ---------------------------------------------------------------------------------------


def test_token_budget_packing_is_exact(corpus):
    m = build_manifest(_sources(corpus), [1, 3], "10k_tokens", root=corpus, seq_len=63)
    assert m["budget"]["units"] == "tokens" and m["budget"]["amount"] == 10_000
    assert m["budget"]["items"] == -(-10_000 // 64)
    assert m["budget"]["tokens"] == m["budget"]["items"] * 64
    assert m["mode"] == {"kind": "packing", "seq_len": 63, "tokenizer": "bytes-v1"}
    assert all(sh["take_tokens"] == sh["take"] * 64 for s in m["sources"] for sh in s["shards"])


def test_token_budget_sample_mode_is_the_smallest_item_count_reaching_it(corpus):
    m = build_manifest(_sources(corpus), {"code": 1, "web": 1}, "20k_tokens", root=corpus)
    n = m["budget"]["items"]
    plan = manifest_plan(m)
    rates = [np.array([sh["tokens"] / sh["rows"] for sh in s["shards"]]) for s in m["sources"]]

    def planned(k):
        return sum(take @ r for (take, _), r in zip(plan.shard_takes(k), rates))

    assert planned(n) >= 20_000 > planned(n - 1)
    assert 20_000 <= m["budget"]["tokens"] < 20_000 + 200
    assert m["budget"]["tokens"] == pytest.approx(sum(s["take_tokens"] for s in m["sources"]), abs=2)


def test_token_weights_convert_to_item_shares(corpus):
    m = build_manifest(_sources(corpus), {"code": 0.5, "web": 0.5}, 5000, root=corpus, weight_units="tokens")
    assert m["weight_units"] == "tokens"
    assert m["weights"]["realised_tokens"]["code"] == pytest.approx(0.5, abs=0.02)


def test_stop_policy_ends_the_budget_early(corpus):
    m = build_manifest(_sources(corpus), [0.5, 0.5], 10_000, root=corpus, exhaustion={"web": "stop"})
    assert m["budget"]["ended_early"] is True and m["budget"]["limit_requested"] == 10_000
    assert m["sources"][1]["take"] == 200 and m["budget"]["items"] < 10_000


def test_cap_policy_caps_repeats(corpus):
    m = build_manifest(
        _sources(corpus),
        [0.1, 0.9],
        3000,
        root=corpus,
        exhaustion={"web": {"policy": "cap", "max_epochs": 2}},
    )
    assert m["sources"][1]["take"] == 400
    assert max(sh["epochs"] for sh in m["sources"][1]["shards"]) == 2


@pytest.mark.parametrize("budget", ["10 apples", "0_samples", "-5", 0, True, "B_tokens"])
def test_bad_budgets(corpus, budget):
    with pytest.raises(ManifestError, match="budget"):
        build_manifest(_sources(corpus), [1, 1], budget, root=corpus)


# --- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_covers_the_plan_and_nothing_else(corpus):
    base = build_manifest(_sources(corpus), [1, 1], 100, root=corpus)
    assert base["fingerprint"] == plan_fingerprint(base)
    assert build_manifest(_sources(corpus), [1, 1], 100, root=corpus)["fingerprint"] == base["fingerprint"]
    for kw in ({"seed": 1}, {"seq_len": 31}, {"exhaustion": {"web": "drop"}}):
        assert (
            build_manifest(_sources(corpus), [1, 1], 100, root=corpus, **kw)["fingerprint"]
            != base["fingerprint"]
        )
    assert build_manifest(_sources(corpus), [1, 2], 100, root=corpus)["fingerprint"] != base["fingerprint"]
    assert build_manifest(_sources(corpus), [1, 1], 101, root=corpus)["fingerprint"] != base["fingerprint"]
    moved = dict(base, root="/elsewhere")
    assert plan_fingerprint(moved) == base["fingerprint"]


# --- writing and reading -----------------------------------------------------------------------------


def test_write_read_roundtrip_is_atomic(corpus, tmp_path):
    m = build_manifest(_sources(corpus), [1, 1], 100, root=corpus)
    out = tmp_path / "m" / "manifest.json"
    write_manifest(m, out)
    assert sorted(os.listdir(out.parent)) == ["manifest.json"]
    assert read_manifest(out) == m
    assert read_manifest(out, verify="sha256") == m
    assert json.loads(out.read_text())["sources"][0]["name"] == "code"


def test_relative_root_is_relative_to_the_manifest_file(corpus):
    m = build_manifest(_sources(corpus), [1, 1], 100, root=corpus)
    m["root"] = "."
    write_manifest(m, corpus / "manifest.json")
    assert read_manifest(corpus / "manifest.json")["root"] == str(corpus)


def test_many_synthetic_shards(tmp_path):
    """10,000 shards from index entries only (no file is read)."""
    reader = type("R", (), {"format": "parquet"})()
    sources = {}
    for k in range(2):
        shards = [
            ShardInfo(str(tmp_path / f"s{k}" / f"{i:05d}.parquet"), 100 + i % 7, 5000 + i, 4096, "0" * 64)
            for i in range(5000)
        ]
        sources[f"s{k}"] = ShardedSource(f"s{k}", "parquet", shards, reader, Columns("text", None))
    m = build_manifest(sources, [0.3, 0.7], "1B_tokens", root=tmp_path)
    assert sum(len(s["shards"]) for s in m["sources"]) == 10_000
    assert m["budget"]["tokens"] >= 10**9
    assert sum(s["take"] for s in m["sources"]) == m["budget"]["items"]


# --- bad input ---------------------------------------------------------------------------------------


@pytest.fixture
def written(corpus):
    m = build_manifest(_sources(corpus), [1, 1], 200, root=corpus)
    path = corpus / "manifest.json"
    write_manifest(m, path)
    return m, path


def _rewrite(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def test_wrong_version_and_format(written):
    _, path = written
    _rewrite(path, lambda o: o.update(version=99))
    with pytest.raises(ManifestError, match=r"version 99 is not supported"):
        read_manifest(path)
    _rewrite(path, lambda o: o.update(format="something/else"))
    with pytest.raises(ManifestError, match="not a fastmix_data manifest"):
        read_manifest(path)


def test_missing_fields_are_named(written):
    _, path = written

    def drop(o):
        del o["seed"]
        del o["sources"][1]["shards"][2]["sha256"]
        del o["sources"][0]["exhaustion"]

    _rewrite(path, drop)
    with pytest.raises(ManifestError, match="missing fields") as err:
        read_manifest(path)
    for field in ("seed", r"sources[1](web).shards[2].sha256", "sources[0](code).exhaustion"):
        assert field in str(err.value)


def test_changed_shards_are_named(written, corpus):
    m, path = written
    shard = corpus / m["sources"][0]["shards"][1]["path"]
    overwrite(shard, 10, b"XX")  # same size, different bytes
    read_manifest(path)  # size only
    with pytest.raises(ManifestError, match=r"part-00001\.parquet.*different sha256"):
        read_manifest(path, verify="sha256")
    with open(shard, "ab") as f:
        f.write(b"more")
    with pytest.raises(ManifestError, match=r"part-00001\.parquet.*bytes, the manifest says"):
        read_manifest(path)
    os.unlink(corpus / m["sources"][1]["shards"][0]["path"])
    with pytest.raises(ManifestError, match=r"shard-00000\.tar.*missing"):
        read_manifest(path)
    assert read_manifest(path, verify="none")["fingerprint"] == m["fingerprint"]


def test_unknown_and_duplicate_sources(written):
    _, path = written
    _rewrite(path, lambda o: o["weights"]["realised_items"].update(books=0.1))
    with pytest.raises(ManifestError, match=r"unknown sources \['books'\]"):
        read_manifest(path)
    _rewrite(
        path, lambda o: (o["weights"]["realised_items"].pop("books"), o["sources"].append(o["sources"][0]))
    )
    with pytest.raises(ManifestError, match=r"sources \['code'\] more than once"):
        read_manifest(path)


def test_malformed_field_types(written):
    m, _ = written
    for change in ({"sources": {"code": {}}}, {"weights": [1, 2]}, {"root": 3}):
        with pytest.raises(ManifestError, match="must be a"):
            validate_manifest(dict(m, **change), verify="none")
    bad = json.loads(json.dumps(m))
    bad["history"][0]["position"] = "zero"
    with pytest.raises(ManifestError, match=r"history\[0\]\.position is 'zero'; must be an integer"):
        validate_manifest(bad, verify="none")


def test_edited_manifest_is_refused(written):
    _, path = written
    original = path.read_text()
    # take is derived, not fingerprinted: it is recomputed from the plan
    _rewrite(path, lambda o: o["sources"][0]["shards"][0].update(take=1))
    with pytest.raises(ManifestError, match=r"sources\[0\]\(code\)\.shards\[0\]\(code/part-00000\.parquet\)\.take"):
        read_manifest(path)
    path.write_text(original)
    read_manifest(path)
    _rewrite(path, lambda o: o["history"][0].update(weights=[0.9, 0.1]))
    with pytest.raises(ManifestError, match="fingerprint .* does not match"):
        read_manifest(path)


@pytest.mark.parametrize(
    "bad", ["../outside.parquet", "/etc/passwd", "code/../../x.parquet", "code//x.parquet"]
)
def test_path_escapes_are_refused(written, bad):
    m, _ = written
    m = json.loads(json.dumps(m))
    m["sources"][0]["shards"][0]["path"] = bad
    m["fingerprint"] = plan_fingerprint(m)
    with pytest.raises(ManifestError, match=r"absolute|escapes"):
        validate_manifest(m, verify="none")


def test_symlink_out_of_root_is_refused(corpus, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (target,) = write_parquet_source(outside, make_docs(10), shards=1)
    (corpus / "code" / "zz-link.parquet").symlink_to(target)
    with pytest.raises(ManifestError, match=r"zz-link\.parquet resolves to .*outside the manifest root"):
        build_manifest(_sources(corpus), [1, 1], 10, root=corpus)
    m = build_manifest({"web": str(corpus / "web")}, [1], 10, root=corpus)
    m["sources"][0]["shards"][0]["path"] = "code/zz-link.parquet"
    m["fingerprint"] = plan_fingerprint(m)
    with pytest.raises(ManifestError, match="outside the manifest root"):
        validate_manifest(m, verify="none")


def test_symlinked_directory_out_of_root_is_refused(corpus, tmp_path_factory):
    # the directory is resolved once for all its shards (after another source's shards were checked)
    outside = tmp_path_factory.mktemp("outside-dir")
    write_parquet_source(outside, make_docs(10), shards=2)
    (corpus / "linked").symlink_to(outside, target_is_directory=True)
    sources = {"web": str(corpus / "web"), "linked": str(corpus / "linked")}
    with pytest.raises(ManifestError, match=r"linked/.*resolves to .*outside the manifest root"):
        build_manifest(sources, [1, 1], 10, root=corpus)


def test_shard_outside_root_at_build(corpus):
    with pytest.raises(ManifestError, match=r"part-00000\.parquet is outside the manifest root"):
        build_manifest(_sources(corpus), [1, 1], 10, root=corpus / "web")


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "m.json")
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "absent.json")
    with pytest.raises(ManifestError, match="verify="):
        validate_manifest({}, verify="md5")


def test_bad_weights_history_and_policies(corpus):
    with pytest.raises(WeightsError, match="negative"):
        build_manifest(_sources(corpus), {"code": -1, "web": 1}, 10, root=corpus)
    with pytest.raises(WeightsError, match="unknown sources"):
        build_manifest(_sources(corpus), {"code": 1, "web": 1, "x": 1}, 10, root=corpus)
    with pytest.raises(WeightsError, match="must increase"):
        build_manifest(
            _sources(corpus),
            [1, 1],
            10,
            root=corpus,
            history=[{"position": 5, "weights": [1, 2]}, {"position": 5, "weights": [2, 1]}],
        )
    with pytest.raises(ManifestError, match="unknown exhaustion policy"):
        build_manifest(_sources(corpus), [1, 1], 10, root=corpus, exhaustion={"web": "sometimes"})
    with pytest.raises(ManifestError, match="unknown sources"):
        build_manifest(_sources(corpus), [1, 1], 10, root=corpus, exhaustion={"books": "drop"})


def test_pipe_sources_and_zero_weights(corpus):
    from fastmix_data.sources import open_source

    tar = corpus / "web" / "shard-00000.tar"
    piped = open_source("web", f"pipe:cat {tar}", allow_unsafe=True)
    with pytest.raises(ManifestError, match="pipe:cat .* not a local file"):
        build_manifest({"web": piped}, [1], 10, root=corpus)
    m = build_manifest(_sources(corpus), {"code": 1, "web": 0}, 50, root=corpus)
    assert m["sources"][1]["take"] == 0 and all(sh["epochs"] == 0 for sh in m["sources"][1]["shards"])
    assert m["weights"]["realised_items"] == {"code": 1.0, "web": 0.0}
