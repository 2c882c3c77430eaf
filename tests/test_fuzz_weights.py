"""Fuzz: weight dicts and weight histories, as users pass them (normalize_weights, set_weights,
build_manifest(history=...)).

Every input either works as documented (finite shares summing to 1 in the given proportions, even
for values whose sum overflows) or raises `WeightsError` / `ManifestError` naming the source, the
entry or the problem; never a bare exception, never a silent coercion of a string or a boolean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest
from fuzzkit import fuzz_settings, scalars
from hypothesis import given
from hypothesis import strategies as st
from shardgen import make_docs, write_parquet_source

from fastmix_data import MixtureStream
from fastmix_data.errors import FastMixDataError, ManifestError, WeightsError
from fastmix_data.export import build_manifest, validate_manifest
from fastmix_data.plan.weights import normalize_weights

NAMES = ["a", "b", "c"]
KEYS = st.sampled_from([*NAMES, "zz", "A", ""])
WEIGHTS = st.one_of(
    st.dictionaries(KEYS, scalars(), max_size=5),
    st.fixed_dictionaries({n: scalars() for n in NAMES}),
    st.lists(scalars(), max_size=4),
    scalars(),
)


def _as_float(v):
    if getattr(v, "ndim", None) == 0:
        v = v.item()
    return v


def _real(v) -> bool:
    v = _as_float(v)
    return isinstance(v, (int, float, np.integer, np.floating)) or type(v).__name__ == "Fraction"


def _check_result(weights, out: np.ndarray) -> None:
    values = [weights[n] for n in NAMES] if isinstance(weights, Mapping) else list(weights)
    assert all(_real(v) and not isinstance(_as_float(v), (bool, np.bool_)) for v in values), values
    f = [float(_as_float(v)) for v in values]
    assert all(math.isfinite(x) and x >= 0 for x in f) and max(f) > 0
    assert out.dtype == np.float64 and np.isfinite(out).all() and (out >= 0).all()
    assert abs(out.sum() - 1.0) < 1e-12
    top = int(np.argmax(f))
    for i, x in enumerate(f):  # the given proportions, even when the sum overflows
        assert math.isclose(out[i] / out[top], x / f[top], rel_tol=1e-12, abs_tol=1e-300)


@fuzz_settings(400)
@given(WEIGHTS)
def test_normalize_weights_works_or_names_the_problem(weights):
    try:
        out = normalize_weights(weights, NAMES)
    except WeightsError as exc:
        msg = str(exc)
        assert any(s in msg for s in ("'a'", "'b'", "'c'", "unknown sources", "missing", "all weights are zero",
                                      "weights for 3 sources", "must be a mapping")), msg
        return
    _check_result(weights, out)


@pytest.mark.parametrize(
    "weights,expected",
    [
        ({"a": 1e308, "b": 1e308, "c": 0}, [0.5, 0.5, 0.0]),
        ([1e308, 1e308, 1e308], [1 / 3] * 3),
        ({"a": 5e-324, "b": 0, "c": 5e-324}, [0.5, 0.0, 0.5]),
    ],
)
def test_sums_that_overflow_are_normalised(weights, expected):
    assert normalize_weights(weights, NAMES) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    "bad,field",
    [({"a": "0.5", "b": 1, "c": 1}, "'a' is '0.5' \\(str\\)"), ({"a": 1, "b": True, "c": 1}, "'b' is True \\(bool\\)"),
     ({"a": 1, "b": 1, "c": None}, "'c' is None"), ({"a": 10**400, "b": 1, "c": 1}, "'a' is too large"),
     ("abc", "must be a mapping")],
)  # fmt: skip
def test_non_numeric_weights_are_refused(bad, field):
    with pytest.raises(WeightsError, match=field):
        normalize_weights(bad, NAMES)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    for n in NAMES:
        write_parquet_source(root / n, make_docs(12, prefix=n), shards=2)
    s = MixtureStream({n: str(root / n) for n in NAMES}, {n: 1 for n in NAMES}, batch_size=2)
    yield s
    s.close()


@fuzz_settings(60)
@given(WEIGHTS)
def test_set_weights_changes_everything_or_nothing(stream, weights):
    before = (stream.weights, len(stream.state_dict()["history"]))
    try:
        effective = stream.set_weights(weights)
    except WeightsError:
        assert (stream.weights, len(stream.state_dict()["history"])) == before  # nothing lost
        return
    expected = normalize_weights(weights, NAMES)
    assert stream.weights == pytest.approx(dict(zip(NAMES, expected)), rel=1e-12)
    assert stream.state_dict()["history"][-1]["batch"] == effective


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("h")
    for n in NAMES:
        write_parquet_source(root / n, make_docs(20, prefix=n), shards=2)
    return {n: str(root / n) for n in NAMES}


HISTORY_ENTRY = st.fixed_dictionaries(
    {"position": st.one_of(st.integers(-3, 200), scalars()), "weights": WEIGHTS}
) | st.one_of(st.dictionaries(st.sampled_from(["position", "weights", "x"]), scalars(), max_size=3), scalars())


@fuzz_settings(40)
@given(st.lists(HISTORY_ENTRY, max_size=3))
def test_manifest_histories_work_or_name_the_entry(corpus, history):
    try:
        m = build_manifest(corpus, {n: 1 for n in NAMES}, 120, history=history)
    except (WeightsError, ManifestError) as exc:
        assert isinstance(exc, FastMixDataError)
        assert any(s in str(exc) for s in ("history", "weight", "position", "'a'", "'b'", "'c'", "sources")), str(exc)
        return
    validate_manifest(m, verify="size")
    positions = [h["position"] for h in m["history"]]
    assert positions == sorted(set(positions)) and positions[0] == 0
    given_positions = [int(h["position"]) for h in history]
    assert positions[-len(history):] == given_positions if history else positions == [0]
