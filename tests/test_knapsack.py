"""ECLM 5.1 sub-model derivation: hand examples, forced modules, budgets, exact feasibility.

The comparison with exhaustive search over random instances is in tests/golden/test_knapsack.py.
"""

from collections import namedtuple
from fractions import Fraction

import numpy as np
import pytest

from models.eclm.knapsack import (
    FEASIBILITY_RTOL,
    InfeasibleBudget,
    Selection,
    fit_to_load,
    fits,
    forced_modules,
    module_order,
    select_modules,
)

# A hand-made two-layer model: layer 0 has a free residual bypass (l0.m2).
IMP = {"l0.m0": 0.5, "l0.m1": 0.3, "l0.m2": 0.2, "l1.m0": 0.1, "l1.m1": 0.9}
LAYER = {m: int(m[1]) for m in IMP}
COSTS = {"l0.m0": [1, 1, 1], "l0.m1": [2, 2, 2], "l0.m2": [0, 0, 0], "l1.m0": [1, 1, 1], "l1.m1": [3, 3, 3]}
SHARED = [1, 1, 1]


def test_hand_example_and_cost_bookkeeping():
    # budget 7: forced l0.m0 + l1.m1 + shared = 5; 2 left -> l0.m1 (0.3, cost 2) beats l1.m0 (0.1, cost 1)
    sel = select_modules(IMP, LAYER, COSTS, SHARED, [7, 7, 7])
    assert sel.ids == ("l0.m0", "l0.m1", "l0.m2", "l1.m1")
    assert sel.forced == ("l0.m0", "l1.m1")
    assert sel.importance == pytest.approx(1.9)
    assert sel.cost.tolist() == [7.0, 7.0, 7.0]  # shared parts included
    with pytest.raises(ValueError):
        sel.cost[0] = 0.0  # read-only


def test_forced_module_is_kept_even_when_a_better_set_exists_without_it():
    # Without forcing, l0.m1 + l0.m2 (0.9, cost 12) beats l0.m0 (0.5, cost 10); ECLM forces l0.m0.
    imp = {"l0.m0": 0.5, "l0.m1": 0.45, "l0.m2": 0.45}
    costs = {"l0.m0": [10, 0, 0], "l0.m1": [6, 0, 0], "l0.m2": [6, 0, 0]}
    sel = select_modules(imp, dict.fromkeys(imp, 0), costs, [0, 0, 0], [12, 1, 1])
    assert sel.ids == ("l0.m0",)
    assert sel.importance == pytest.approx(0.5)


def test_forced_tie_goes_to_the_lowest_id_in_natural_order():
    imp = {"l0.m10": 0.4, "l0.m2": 0.4, "l0.m3": 0.2}
    sel = select_modules(imp, dict.fromkeys(imp, 0), {m: [1, 1, 1] for m in imp}, [0, 0, 0], [1, 1, 1])
    assert sel.forced == ("l0.m2",)  # "l0.m10" < "l0.m2" as strings, but 2 < 10
    assert sel.ids == ("l0.m2",)


def test_infeasible_budget_names_the_dimension_and_overrun():
    # forced + shared = 5 in every dimension; the compute budget is 3 -> over by 2
    with pytest.raises(InfeasibleBudget, match=r"comp needs 5 FLOPs > budget 3 \(over by 2\)") as info:
        select_modules(IMP, LAYER, COSTS, SHARED, [100, 3, 100])
    assert info.value.over == {"comp": 2.0}
    assert "comm" not in str(info.value) and isinstance(info.value, ValueError)


def test_zero_cost_modules_taken_when_useful():
    imp = {"l0.m0": 0.6, "l0.m1": 0.3, "l0.m2": 0.0, "l0.m3": 0.1}
    costs = {"l0.m0": [1, 1, 1], "l0.m1": [0, 0, 0], "l0.m2": [0, 0, 0], "l0.m3": [1, 1, 1]}
    sel = select_modules(imp, dict.fromkeys(imp, 0), costs, [0, 0, 0], [1, 1, 1])  # budget used up by forced
    assert sel.ids == ("l0.m0", "l0.m1")  # free and useful: taken; free but useless (0.0): not


def test_float_noise_does_not_flip_feasibility():
    imp = {"l0.m0": 1.0, "l0.m1": 0.5}
    costs = {"l0.m0": [0.2, 0, 0], "l0.m1": [0.0, 0, 0]}
    assert 0.1 + 0.2 > 0.3  # the classic float overshoot
    sel = select_modules(imp, dict.fromkeys(imp, 0), costs, [0.1, 0, 0], [0.3, 0, 0])
    assert sel.ids == ("l0.m0", "l0.m1")
    with pytest.raises(InfeasibleBudget, match="comm"):  # a real overrun (2 ppm) is not noise
        select_modules(imp, dict.fromkeys(imp, 0), costs, [0.1, 0, 0], [0.3 / (1 + 2e-6), 0, 0])


def test_empty_candidate_set_and_unconstrained_budget():
    imp = {"l0.m0": 0.7, "l1.m0": 0.2}
    sel = select_modules(imp, {"l0.m0": 0, "l1.m0": 1}, {m: [5, 5, 5] for m in imp}, [1, 1, 1], [np.inf] * 3)
    assert sel.ids == sel.forced == ("l0.m0", "l1.m0")
    everything = select_modules(IMP, LAYER, COSTS, SHARED, [np.inf] * 3)
    assert everything.ids == tuple(sorted(IMP))


def test_max_per_layer_caps_each_layer():
    sel = select_modules(IMP, LAYER, COSTS, SHARED, [np.inf] * 3, max_per_layer=2)
    assert sel.ids == ("l0.m0", "l0.m1", "l1.m0", "l1.m1")
    assert select_modules(IMP, LAYER, COSTS, SHARED, [np.inf] * 3, max_per_layer=1).ids == ("l0.m0", "l1.m1")


def test_accepts_module_cost_objects():
    Cost = namedtuple("Cost", "bytes flops memory")
    as_objects = {m: Cost(*c) for m, c in COSTS.items()}
    assert select_modules(IMP, LAYER, as_objects, SHARED, [7, 7, 7]) == select_modules(
        IMP, LAYER, COSTS, SHARED, [7, 7, 7]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer_of={"l0.m0": 0}), "layer_of"),
        (dict(importance={**IMP, "l0.m0": -0.1}), "importance"),
        (dict(costs={**COSTS, "l0.m1": [1, 2]}), "costs"),
        (dict(shared_cost=[1, -1, 1]), "shared_cost"),
        (dict(budget=[1, np.nan, 1]), "budget"),
        (dict(max_per_layer=0), "max_per_layer"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(importance=IMP, layer_of=LAYER, costs=COSTS, shared_cost=SHARED, budget=[7, 7, 7])
    with pytest.raises(ValueError, match=match):
        select_modules(**{**args, **kwargs})


def test_fit_to_load_keeps_the_best_subset_of_the_held_modules():
    full = select_modules(IMP, LAYER, COSTS, SHARED, [8, 8, 8])
    assert full.ids == tuple(sorted(IMP)) and full.cost.tolist() == [8, 8, 8]
    assert fit_to_load(full, IMP, LAYER, COSTS, SHARED, [8, 8, 8]) is full
    # comm budget 7: forced l0.m0 + l1.m1 + shared = 5, 2 left for l0.m1 (0.3, cost 2), l1.m0 (0.1,
    # cost 1) and the free l0.m2 (0.2): l0.m1 + l0.m2 = 0.5 beats l1.m0 + l0.m2 = 0.3
    assert fit_to_load(full, IMP, LAYER, COSTS, SHARED, [7, 8, 8]).ids == ("l0.m0", "l0.m1", "l0.m2", "l1.m1")
    # comm budget 6: 1 left: l1.m0 (0.1) + free l0.m2 (0.2) = 0.3 -> importance 1.7. Dropping the least
    # important module first (l1.m0, then l0.m1) would end at l0.m0, l0.m2, l1.m1 = 1.6.
    smaller = fit_to_load(full, IMP, LAYER, COSTS, SHARED, [6, 8, 8])
    assert smaller.ids == ("l0.m0", "l0.m2", "l1.m0", "l1.m1")
    assert smaller.forced == full.forced
    assert smaller.importance == pytest.approx(1.7) and smaller.cost.tolist() == [6, 6, 6]


def test_fit_to_load_infeasible_and_unknown_modules():
    full = select_modules(IMP, LAYER, COSTS, SHARED, [8, 8, 8])
    with pytest.raises(InfeasibleBudget, match="mem") as info:
        fit_to_load(full, IMP, LAYER, COSTS, SHARED, [8, 8, 4])
    assert info.value.over == {"mem": 1.0}
    stranger = Selection(("l0.m0", "l9.m9"), ("l0.m0",), 0.5, np.zeros(3))
    with pytest.raises(ValueError, match="l9.m9"):
        fit_to_load(stranger, IMP, LAYER, COSTS, SHARED, [8, 8, 8])


def test_module_order_is_natural_and_forced_ties_use_it():
    assert sorted(["l0.m10", "l0.m2", "l1.m0", "l10.m1", "l2.m3"], key=module_order) == [
        "l0.m2", "l0.m10", "l1.m0", "l2.m3", "l10.m1"
    ]
    imp = {"l0.m10": 0.4, "l0.m2": 0.4, "l0.m3": 0.2, "l1.m11": 0.5, "l1.m10": 0.5}
    layers = {m: int(m[1]) for m in imp}
    assert forced_modules(imp, layers) == ("l0.m2", "l1.m10")
    # the insertion order of the mapping does not matter
    assert forced_modules(dict(reversed(list(imp.items()))), layers) == ("l0.m2", "l1.m10")


def test_fits_is_exact_and_independent_of_the_order_of_the_costs():
    # 0.1 + 0.2 overshoots 0.3 by 4e-17 in floats: inside the 1 ppm slack, so it fits
    assert fits([[0.1, 0, 0], [0.2, 0, 0]], [0, 0, 0], [0.3, 0, 0])
    assert fits([[0.2, 0, 0], [0.1, 0, 0]], [0, 0, 0], [0.3, 0, 0])
    # one unit and a thousand costs of 1e-17 against a budget whose allowance is 1 + 6e-17: in floats
    # the sum is 1.0 (fits) adding left to right and 1 + 1e-14 (over) the other way round; exactly it
    # is 1 + 1e-14, over, whatever the order
    limit = 0.9999990000010001
    assert Fraction(limit) * (1 + Fraction(FEASIBILITY_RTOL)) - 1 == pytest.approx(6.1e-17, rel=0.01)
    costs = [[1.0, 0, 0]] + [[1e-17, 0, 0]] * 1000
    assert sum(c[0] for c in costs) <= limit * (1 + FEASIBILITY_RTOL) < sum(c[0] for c in costs[::-1])
    assert not fits(costs, [0, 0, 0], [limit, 0, 0]) and not fits(costs[::-1], [0, 0, 0], [limit, 0, 0])
    assert fits(costs[:1], [0, 0, 0], [limit, 0, 0])
    assert fits([[5.0, 5.0, 5.0]], [1.0, 1.0, 1.0], [np.inf, np.inf, 6.0])


def test_a_solver_answer_over_the_budget_is_cut_off_and_solved_again():
    # all four candidates cost 1.375 = the budget * (1 + 1.5e-6): 0.5 ppm over the 1 ppm slack, but
    # within HiGHS's 1e-6 tolerance on the row, so the solver's first answer takes all four. The exact
    # check rejects it; the next best drops l0.m3 (least importance per cost among the fitting sets).
    imp = {"l0.m0": 0.9, "l0.m1": 0.5, "l0.m2": 0.3, "l0.m3": 0.25, "l0.m4": 0.3125}
    costs = {"l0.m0": [0, 0, 0], "l0.m1": [0.375, 0, 0], "l0.m2": [0.125, 0, 0], "l0.m3": [0.25, 0, 0],
             "l0.m4": [0.625, 0, 0]}
    budget = [1.375 / (1 + 1.5e-6), np.inf, np.inf]
    assert not fits(costs.values(), [0, 0, 0], budget)
    sel = select_modules(imp, dict.fromkeys(imp, 0), costs, [0, 0, 0], budget)
    assert sel.ids == ("l0.m0", "l0.m1", "l0.m2", "l0.m4")
    assert fits([costs[m] for m in sel.ids], [0, 0, 0], budget)
    assert sel.importance == pytest.approx(2.0125)


def test_modules_too_costly_alone_do_not_spoil_the_rest():
    # 1 unit left after the free forced module; l0.m1 costs 1e7 (it can never fit). The best set is
    # l0.m3 + l0.m4 (1.0 + 0.5 + 0.5 = 2.0), not l0.m2 alone (1.8).
    imp = {"l0.m0": 1.0, "l0.m1": 0.9, "l0.m2": 0.8, "l0.m3": 0.5, "l0.m4": 0.5}
    costs = {"l0.m0": [0, 0, 0], "l0.m1": [1e7, 0, 0], "l0.m2": [0.9, 0, 0], "l0.m3": [0.5, 0, 0], "l0.m4": [0.5, 0, 0]}
    sel = select_modules(imp, dict.fromkeys(imp, 0), costs, [0, 0, 0], [1.0, 1.0, 1.0])
    assert sel.ids == ("l0.m0", "l0.m3", "l0.m4") and sel.importance == pytest.approx(2.0)
    # the same with the costly module 1e9 times the budget in one dimension and 1e-9 in the others
    costs["l0.m1"] = [1e9, 1e-9, 1e-9]
    assert select_modules(imp, dict.fromkeys(imp, 0), costs, [0, 0, 0], [1.0, 1.0, 1.0]).ids == sel.ids


def test_modules_of_negligible_importance_are_still_taken_when_they_fit():
    # l0.m3's importance is far below the solver's gap; it still fits beside l0.m1, so it is taken
    imp = {"l0.m0": 1.0, "l0.m1": 0.6, "l0.m2": 0.5, "l0.m3": 1e-300}
    costs = {"l0.m0": [0, 0, 0], "l0.m1": [0.6, 0, 0], "l0.m2": [0.5, 0, 0], "l0.m3": [0.3, 0, 0]}
    sel = select_modules(imp, dict.fromkeys(imp, 0), costs, [0, 0, 0], [1.0, 1.0, 1.0])
    assert sel.ids == ("l0.m0", "l0.m1", "l0.m3")
