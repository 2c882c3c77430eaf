"""The direction pilot (benchmarks/quality/direction_pilot.py): its rule and its variants' settings."""

from __future__ import annotations

import pytest
from quality_modules import quality_module

from fastmix_data.search.config import SearchConfig


@pytest.fixture(scope="module")
def dp():
    with quality_module("direction_pilot.py") as mod:
        yield mod


def _unit(dp, cell, seed, l1, planted=None):
    """``l1``: each search's L1 to the pick (the defaults' and the cell's variants', in order); ``planted``:
    the L1s to the planted shares, for a planted cell."""
    w = {"a": 0.5, "b": 0.5}
    names = ("defaults", *dp.cell_variants(*cell))
    u = {"exp": cell[0], "target": cell[1], "seed": seed, "pick": {"a": 0.4, "b": 0.6}, "as_judged": seed != 0,
         "weights": dict.fromkeys(names, w), "l1_to_pick": dict(zip(names, l1, strict=True))}
    return u | ({"l1_to_planted": dict(zip(names, planted, strict=True))} if planted else {})


def test_a_variant_earns_final_runs_only_if_closer_on_4_of_5_seeds_in_both_cells(dp):
    units = []
    for cell in dp.CELLS:
        for seed in range(5):
            # full-hypergrad closer on every seed of both cells; serve-own-export on 5/5 and then 3/5;
            # adam-precond on 4/5 and 4/5 (ties are not closer)
            serve = 0.1 if cell == dp.CELLS[0] or seed < 3 else 0.3
            units.append(_unit(dp, cell, seed, (0.2, 0.1, serve, 0.2 if seed == 2 else 0.15)))
    s = dp.summarise(units)
    assert s["earns_final_runs"] == ["full-hypergrad", "adam-precond"]
    assert [c["serve-own-export"]["closer"] for c in s["cells"].values()] == [5, 3]
    assert [c["adam-precond"]["closer"] for c in s["cells"].values()] == [4, 4]
    assert s["as_judged"] == [8, 10]
    assert dp.summarise([u for u in units if u["exp"] == "stdlib-K3"])["earns_final_runs"] == []  # one cell: none


def test_the_l1_only_cell_is_reported_but_not_ruled_on(dp):
    (exp, target), = dp.L1_CELLS
    assert target == "planted" and dp.cell_variants(exp, target) == dp.L1_VARIANTS == ("adam-precond",)
    units = [_unit(dp, dp.CELLS[0], seed, (0.2, 0.1, 0.1, 0.1)) for seed in range(5)]  # only one rule cell
    # the L1-only cell: adam-precond closer to the pick on every seed, closer to planted on seeds 0-2 only
    l1_only = [_unit(dp, (exp, target), seed, (0.3, 0.1), (0.2, 0.1 if seed < 3 else 0.3)) for seed in range(5)]
    s = dp.summarise(units + l1_only)
    assert s["earns_final_runs"] == []  # the L1-only cell does not stand in for the missing rule cell
    c = s["cells"][f"{exp}/{target}"]
    assert not c["rule"] and set(c) == {"pick", "n", "rule", "defaults", "adam-precond"}
    assert c["adam-precond"]["closer_to_planted"] == 3
    assert c["adam-precond"]["l1_to_planted"] == pytest.approx([0.18, 0.10954451])  # mean, SD (ddof 1)
    assert c["defaults"]["l1_to_planted"] == pytest.approx([0.2, 0.0])


def test_make_unit_measures_l1_to_the_pick_and_to_the_planted_shares(dp):
    w = {"defaults": {"a": 0.5, "b": 0.5}, "adam-precond": {"a": 0.7, "b": 0.3}}
    u = dp.make_unit("stdlib-K3", "planted", 1, w, {"a": 0.8, "b": 0.2}, {"a": 0.65, "b": 0.35}, {"b": 0.5, "a": 0.5})
    assert u["as_judged"] and u["l1_to_pick"] == pytest.approx({"defaults": 0.6, "adam-precond": 0.2})
    assert u["l1_to_planted"] == pytest.approx({"defaults": 0.3, "adam-precond": 0.1})
    assert not dp.make_unit("stdlib-K3", "heldout", 1, w, {"a": 0.8, "b": 0.2}, None, {"a": 0.5, "b": 0.4999})["as_judged"]
    assert "l1_to_planted" not in dp.make_unit("stdlib-K3", "heldout", 1, w, {"a": 1.0, "b": 0.0}, None, None)


def test_the_variants_are_valid_search_configs(dp):
    export = {"code": 0.06, "prose": 0.9, "markup": 0.04}
    for v in dp.VARIANTS:
        SearchConfig.from_dict({"method": "fastmix", "fastmix": dp.variant_overrides(v, export)})  # validates
    assert dp.variant_overrides("serve-own-export", export)["serve_weights"] == export
    assert dp.variant_overrides("adam-precond", export) == {"precondition": True}
    with pytest.raises(ValueError, match="unknown variant"):
        dp.variant_overrides("nope", export)


def _final_unit(cell, seed, fastmix, option, pick=3.0):
    w = {"a": 0.5, "b": 0.5}
    return {"exp": cell[0], "target": cell[1], "seed": seed, "weights": {"fastmix": w, "pick": w, "opt": w},
            "losses": {"fastmix": pick + fastmix, "pick": pick, "opt": pick + option}}


def test_final_summary_pairs_the_option_with_the_defaults_and_classifies_its_regret(dp):
    seeds = dp.FINAL_SEEDS
    # regrets per cell: the option's and the defaults', per seed 1-9 (pick losses vary by seed)
    option = {0: [0.001] * 9,  # mean 0.001, SE 0: MET
              1: [0.02 + 0.001 * (s % 3) for s in seeds],  # mean 0.021, small SE: MISSED
              2: [0.005 + (0.01 if s % 2 else -0.01) for s in seeds]}  # mean 0.0061, SE 0.0035: undecided
    units = [_final_unit(cell, s, 0.01, option[i][j], pick=3.0 + 0.1 * s)
             for i, cell in enumerate(dp.FINAL_CELLS) for j, s in enumerate(seeds)]
    out = dp.final_summary(units, ["opt"])
    cells = [out[f"{e}/{t}"]["opt"] for e, t in dp.FINAL_CELLS]
    assert [c["verdict"] for c in cells] == ["MET", "MISSED", "undecided"]
    assert cells[0]["regret"]["mean"] == pytest.approx(0.001) and cells[0]["defaults_regret"]["mean"] == pytest.approx(0.01)
    assert cells[0]["diff"]["mean"] == pytest.approx(-0.009) and cells[0]["diff"]["wins"] == 9  # option − defaults
    assert cells[1]["diff"]["mean"] == pytest.approx(0.011) and cells[1]["diff"]["wins"] == 0
    assert cells[2]["regret"]["mean"] == pytest.approx(0.005 + 0.01 / 9)
    assert cells[2]["regret"]["se"] == pytest.approx(0.0035136, rel=1e-4)  # SD 0.010541 / 3
    assert cells[2]["diff"]["wins"] == 4 and cells[2]["regret"]["n"] == 9
    with pytest.raises(ValueError, match=r"system-K3/planted: final runs for seeds \[1, 2, 3, 4, 5, 6, 7, 8\]"):
        dp.final_summary([u for u in units if (u["exp"], u["target"], u["seed"]) != ("system-K3", "planted", 9)],
                         ["opt"])
    with pytest.raises(ValueError, match="stdlib-K3/heldout"):  # a seed twice is not nine seeds either
        dp.final_summary(units + units[:1], ["opt"])
