"""Fuzz: mutations of a real stream state (drop, duplicate, retype, negate, huge, NaN fields) given to
`load_state_dict`.

Each mutated state is either refused with a `StateError` naming a field on the mutated path (or the
fingerprint, for fingerprinted fields), leaving the stream as it was, or accepted, and then the
stream holds exactly what the state says (its next batch, its history) and serves batches whose
versions come from that history; a state that differs only in fields that do not determine content
(times, requested weights in user units) serves exactly what the original state serves.
"""

from __future__ import annotations

import json

import pytest
from fuzzkit import fuzz_settings, mutations, names_field
from hypothesis import event, given
from hypothesis import strategies as st
from shardgen import make_docs, write_parquet_source, write_wds_source

from fastmix_data import MixtureStream
from fastmix_data.errors import StateError

W = {"a": 0.5, "b": 0.3, "c": 0.2}
CONTENT = ("next_batch", "cursor", "history", "probes")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fs")
    write_parquet_source(root / "a", make_docs(30, seed=1, prefix="a"), shards=3)
    write_wds_source(root / "b", make_docs(20, seed=2, prefix="b"), shards=2)
    write_parquet_source(root / "c", make_docs(8, seed=3, prefix="c"), shards=1)
    srcs = {"a": str(root / "a"), "b": str(root / "b" / "*.tar"), "c": str(root / "c")}
    stream = MixtureStream(srcs, W, batch_size=3, seed=2)
    for _, _b in zip(range(4), stream):
        pass
    stream.set_weights({"a": 0.1, "b": 0.1, "c": 0.8})
    for _, _b in zip(range(3), stream):
        pass
    list(stream.probe({"a": 1, "b": 0, "c": 0}, steps=2))
    stream.set_weights([1, 2, 3])
    for _, _b in zip(range(2), stream):
        pass
    state = json.loads(json.dumps(stream.state_dict()))
    reference = _serve(_fresh(srcs, state))
    stream.close()
    return srcs, state, reference


def _fresh(srcs, state=None):
    s = MixtureStream(srcs, W, batch_size=3, seed=2)
    if state is not None:
        s.load_state_dict(state)
    return s


def _serve(stream, n=4):
    return [
        (b["batch_index"], b["weight_version"], tuple(b["source"].tolist()), tuple(b["item"].tolist()))
        for _, b in zip(range(n), stream)
    ]


def _content(state):
    """What determines the served sequence (times and user-unit weights do not)."""
    history = [{k: h.get(k) for k in ("version", "batch", "position", "weights")} for h in state["history"]]
    return state.get("next_batch"), state.get("cursor"), history


@fuzz_settings(150)
@given(data=st.data())
def test_mutated_state_is_refused_naming_the_field_or_loads_exactly(setup, data):
    srcs, state, reference = setup
    bad, applied = data.draw(mutations(state))
    stream = _fresh(srcs)
    before = stream.state_dict()
    try:
        stream.load_state_dict(bad)
    except StateError as exc:
        event("refused")
        also = ("fingerprint", "different stream", "format", "version", "state")
        assert any(names_field(str(exc), p, also=also) for p, _ in applied), (str(exc), applied)
        after = stream.state_dict()
        assert _content(after) == _content(before)  # nothing of the refused state was taken
        stream.close()
        return
    event("accepted" + (", same content" if _content(bad) == _content(state) else ", other content"))
    loaded = stream.state_dict()
    assert loaded["next_batch"] == bad["next_batch"]
    assert [h["weights"] for h in loaded["history"]] == [h["weights"] for h in bad["history"]]
    assert [(h["version"], h["batch"], h["position"]) for h in loaded["history"]] == [
        (h["version"], h["batch"], h["position"]) for h in bad["history"]
    ]
    served = _serve(stream)
    versions = {h["version"] for h in bad["history"]}
    assert all(v in versions for _, v, _, _ in served)
    if _content(bad) == _content(state):
        assert served == reference
    stream.close()


def test_an_edited_fingerprint_or_config_is_named_as_such(setup):
    srcs, state, _ = setup
    for edit in (lambda s: s.update(fingerprint="0" * 64), lambda s: s["config"].update(seed=99)):
        bad = json.loads(json.dumps(state))
        edit(bad)
        with pytest.raises(StateError, match="fingerprint does not match the state's own config"):
            _fresh(srcs).load_state_dict(bad)
