"""Fuzz: search and method configs (`SearchConfig.from_dict`, `build_config` for every method), as
mutations of valid configs and as mappings of field names to arbitrary values.

Each either builds a validated config that round-trips through ``to_dict``/``from_dict``, or raises
`ConfigError` (the project's own class, also a ``ValueError``) naming a field; never a bare
``TypeError`` from a comparison inside the validator.
"""

from __future__ import annotations

import dataclasses

import pytest
from fuzzkit import fuzz_settings, mutations, names_field, scalars
from hypothesis import given
from hypothesis import strategies as st

from fastmix_data.errors import ConfigError
from fastmix_data.search.methods import METHODS, build_config
from fastmix_data.search.trainer import SearchConfig

BASE = SearchConfig(max_steps=10, prior={"a": 1.0}, init_weights={"a": 0.5, "b": 0.5}).to_dict()
FIELDS = [f.name for f in dataclasses.fields(SearchConfig)]


def _method_base(name: str) -> dict:
    return {"train": {"model": "tiny", "seq_len": 16, "batch_size": 2, "max_tokens": 64}, "progress": False,
            name: dataclasses.asdict(METHODS[name].config()) | {"train": {}}}  # fmt: skip


def _names(msg: str, applied) -> bool:
    return any(names_field(msg, p, also=("config", "key")) for p, _ in applied)


@fuzz_settings(200)
@given(data=st.data())
def test_mutated_search_config_is_refused_naming_the_field_or_round_trips(data):
    d, applied = data.draw(mutations(BASE))
    try:
        cfg = SearchConfig.from_dict(d)
    except ConfigError as exc:
        assert isinstance(exc, ValueError)
        assert _names(str(exc), applied), (str(exc), applied)
        return
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg


@fuzz_settings(150)
@given(st.dictionaries(st.sampled_from([*FIELDS, "z_lrr", 3]), scalars(), max_size=4))
def test_arbitrary_values_for_search_config_fields(d):
    try:
        cfg = SearchConfig.from_dict({"max_steps": 5, **d})
    except ConfigError as exc:
        assert any(str(k) in str(exc) for k in d) or "budget" in str(exc), (str(exc), d)
        return
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg


@fuzz_settings(40)
@given(data=st.data(), method=st.sampled_from(sorted(METHODS)))
def test_mutated_method_config_is_refused_naming_the_field_or_valid(data, method):
    base = _method_base(method)
    d, applied = data.draw(mutations(base))
    try:
        cfg = build_config(method, d)
    except ConfigError as exc:
        assert _names(str(exc), applied) or method in str(exc), (str(exc), applied)
        return
    assert isinstance(cfg, METHODS[method].config)
    assert type(cfg).from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "d,field",
    [({"max_steps": "lots"}, "max_steps"), ({"max_steps": 5, "z_lr": "fast"}, "z_lr"), ({"max_steps": 5, "betas": ["a", 1]}, "betas"),
     ({"max_steps": 5, "model": ["cpu"]}, "model"), ({"max_steps": 5, "floor": None}, "floor"), ({"max_steps": "infM"}, "max_steps"),
     ({"max_steps": 5, "prior": 3}, "prior"), ({"max_steps": 5, "progress": "yes"}, "progress")],
)  # fmt: skip
def test_wrong_types_name_the_field(d, field):
    with pytest.raises(ConfigError, match=field):
        SearchConfig.from_dict(d)


@pytest.mark.parametrize("step", [0, 0.0, 1e-300, -0.1, 0.3])
def test_grid_step_that_divides_by_zero_is_named(step):
    with pytest.raises(ConfigError, match="step"):
        build_config("grid", {"grid": {"step": step}})
