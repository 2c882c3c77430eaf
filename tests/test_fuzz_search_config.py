"""Fuzz: the search config (`SearchConfig.from_dict`, every method's section), as mutations of a
valid config and as mappings of field names to arbitrary values.

Each either builds a validated config that round-trips through ``to_dict``/``from_dict``, or raises
`ConfigError` (the project's own class, also a ``ValueError``) naming a field; never a bare
``TypeError`` from a comparison inside the validator.
"""

from __future__ import annotations

import pytest
from fuzzkit import fuzz_settings, mutations, names_field, scalars
from hypothesis import given
from hypothesis import strategies as st

from fastmix_data.errors import ConfigError
from fastmix_data.search.config import METHOD_NAMES, SearchConfig
from fastmix_data.search.config_fields import walk

BASE = SearchConfig(max_tokens=1000, sources={"a": "x/a", "b": "x/b"}).to_dict()
BASE["fastmix"].update(prior={"a": 1.0}, init_weights={"a": 0.5, "b": 0.5})
BASE["target"]["path"] = {"g": "t/g"}
LEAVES = [leaf.path for leaf in walk(SearchConfig)]


def _build(d) -> SearchConfig:
    return SearchConfig.from_dict(d).validate()


def _names(msg: str, applied) -> bool:
    return any(names_field(msg, p, also=("config", "key", "section")) for p, _ in applied)


@fuzz_settings(200)
@given(data=st.data())
def test_mutated_search_config_is_refused_naming_the_field_or_round_trips(data):
    d, applied = data.draw(mutations(BASE))
    try:
        cfg = _build(d)
    except ConfigError as exc:
        assert isinstance(exc, ValueError) and "\n" not in str(exc)
        assert _names(str(exc), applied), (str(exc), applied)
        return
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg


@fuzz_settings(150)
@given(st.dictionaries(st.sampled_from([*LEAVES, "fastmix.z_lrr", "3"]), scalars(), max_size=4))
def test_arbitrary_values_for_any_field(d):
    nested: dict = {"max_tokens": 5}
    for path, value in d.items():
        *head, last = path.split(".")
        node = nested
        for h in head:
            node = node.setdefault(h, {})
        node[last] = value
    try:
        cfg = _build(nested)
    except ConfigError as exc:
        assert any(p.split(".")[-1] in str(exc) for p in d), (str(exc), d)
        return
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "d,field",
    [({"max_tokens": "lots"}, "max_tokens"), ({"max_tokens": 5, "fastmix": {"z_lr": "fast"}}, "z_lr"),
     ({"max_tokens": 5, "train": {"betas": ["a", 1]}}, "betas"), ({"max_tokens": 5, "train": {"proxy": ["cpu"]}}, "proxy"),
     ({"max_tokens": 5, "fastmix": {"floor": None}}, "floor"), ({"max_tokens": "infM"}, "max_tokens"),
     ({"max_tokens": 5, "fastmix": {"prior": 3}}, "prior"), ({"max_tokens": 5, "output": {"progress": "maybe"}}, "progress"),
     ({"max_tokens": 5, "fastmix": 3}, "fastmix"), ({"max_tokens": 5, "sources": {"a": 3}}, "sources"),
     ({"max_tokens": 5, "target": {"path": 3.5}}, "target"), ({"max_tokens": 5, "method": "regmix"}, "method")],
)  # fmt: skip
def test_wrong_types_name_the_field(d, field):
    with pytest.raises(ConfigError, match=field):
        _build(d)


@pytest.mark.parametrize("step", [0, 0.0, 1e-300, -0.1, 0.3])
def test_grid_step_that_divides_by_zero_is_named(step):
    with pytest.raises(ConfigError, match="step"):
        _build({"max_tokens": 5, "method": "grid", "grid": {"step": step}})


def test_every_method_builds_from_its_section():
    for m in METHOD_NAMES:
        assert _build({"max_tokens": 5, "method": m}).method == m
