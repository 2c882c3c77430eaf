"""The direction pilot (benchmarks/quality/direction_pilot.py): its rule and its variants' settings."""

from __future__ import annotations

import pytest
from quality_modules import quality_module

from fastmix_data.search.config import SearchConfig


@pytest.fixture(scope="module")
def dp():
    with quality_module("direction_pilot.py") as mod:
        yield mod


def _unit(cell, seed, d_default, d_full, d_serve):
    w = {"a": 0.5, "b": 0.5}
    return {"exp": cell[0], "target": cell[1], "seed": seed, "pick": {"a": 0.4, "b": 0.6},
            "weights": dict.fromkeys(("defaults", "full-hypergrad", "serve-own-export"), w),
            "l1_to_pick": {"defaults": d_default, "full-hypergrad": d_full, "serve-own-export": d_serve}}


def test_a_variant_earns_final_runs_only_if_closer_on_4_of_5_seeds_in_both_cells(dp):
    units = []
    for cell in dp.CELLS:
        for seed in range(5):
            # full-hypergrad closer on every seed of both cells; serve-own-export on 5/5 and then 3/5
            serve = 0.1 if cell == dp.CELLS[0] or seed < 3 else 0.3
            units.append(_unit(cell, seed, 0.2, 0.1, serve))
    s = dp.summarise(units)
    assert s["earns_final_runs"] == ["full-hypergrad"]
    assert [c["serve-own-export"]["closer"] for c in s["cells"].values()] == [5, 3]
    assert dp.summarise([u for u in units if u["exp"] == "stdlib-K3"])["earns_final_runs"] == []  # one cell: neither


def test_the_variants_are_valid_search_configs(dp):
    export = {"code": 0.06, "prose": 0.9, "markup": 0.04}
    for v in dp.VARIANTS:
        SearchConfig.from_dict({"method": "fastmix", "fastmix": dp.variant_overrides(v, export)})  # validates
    assert dp.variant_overrides("serve-own-export", export)["serve_weights"] == export
    with pytest.raises(ValueError, match="unknown variant"):
        dp.variant_overrides("nope", export)
