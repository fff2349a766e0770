"""ECLM 5.1 sub-model derivation: exact knapsack vs brute force, forced modules, budgets."""

import itertools
from collections import namedtuple

import numpy as np
import pytest

from models.knapsack import (
    FEASIBILITY_RTOL,
    InfeasibleBudget,
    Selection,
    fit_to_load,
    select_modules,
)

# A hand-made two-layer model: layer 0 has a free residual bypass (l0.m2).
IMP = {"l0.m0": 0.5, "l0.m1": 0.3, "l0.m2": 0.2, "l1.m0": 0.1, "l1.m1": 0.9}
LAYER = {m: int(m[1]) for m in IMP}
COSTS = {"l0.m0": [1, 1, 1], "l0.m1": [2, 2, 2], "l0.m2": [0, 0, 0], "l1.m0": [1, 1, 1], "l1.m1": [3, 3, 3]}
SHARED = [1, 1, 1]


def _brute_force(importance, layer_of, costs, shared, budget, max_per_layer):
    """Best importance over every subset holding the forced set (the most important per layer)."""
    ids = sorted(importance)
    forced = set()
    for layer in set(layer_of.values()):
        members = sorted(m for m in ids if layer_of[m] == layer)
        forced.add(max(members, key=lambda m: (importance[m], -members.index(m))))
    free = [m for m in ids if m not in forced]
    picks = np.array(list(itertools.product([0, 1], repeat=len(free))), dtype=float).reshape(-1, len(free))
    base = np.asarray(shared, float) + sum(np.asarray(costs[m], float) for m in forced)
    totals = base + picks @ np.array([costs[m] for m in free], float).reshape(len(free), 3)
    ok = (totals <= np.asarray(budget) * (1 + FEASIBILITY_RTOL)).all(axis=1)
    if max_per_layer is not None:
        for layer in set(layer_of.values()):
            column = np.array([layer_of[m] == layer for m in free], float)
            ok &= picks @ column <= max_per_layer - 1
    values = sum(importance[m] for m in forced) + picks @ np.array([importance[m] for m in free])
    values[~ok] = -np.inf
    best = int(np.argmax(values))
    runner_up = np.sort(values)[-2] if len(values) > 1 else -np.inf
    chosen = sorted(forced | {m for m, d in zip(free, picks[best]) if d})
    return values[best], runner_up, chosen


def _random_instance(rng):
    layers, per_layer = int(rng.integers(2, 4)), int(rng.integers(3, 6))
    ids = [f"l{l}.m{i}" for l in range(layers) for i in range(per_layer)]
    importance = {m: float(rng.random()) for m in ids}
    costs = {m: (rng.random(3) * 10 * (rng.random() > 0.15)).tolist() for m in ids}  # ~15% free modules
    shared = (rng.random(3) * 2).tolist()
    total = np.asarray(shared) + sum(np.asarray(c) for c in costs.values())
    budget = (total * rng.uniform(0.35, 0.9, size=3)).tolist()
    cap = None if rng.random() < 0.6 else int(rng.integers(1, 4))
    return importance, {m: int(m.split(".")[0][1:]) for m in ids}, costs, shared, budget, cap


def test_matches_brute_force_on_random_instances():
    rng = np.random.default_rng([2024, 51])
    solved = 0
    for _ in range(40):
        imp, layer, costs, shared, budget, cap = _random_instance(rng)
        best, runner_up, best_ids = _brute_force(imp, layer, costs, shared, budget, cap)
        if not np.isfinite(best):  # the forced set alone does not fit
            with pytest.raises(InfeasibleBudget):
                select_modules(imp, layer, costs, shared, budget, max_per_layer=cap)
            continue
        sel = select_modules(imp, layer, costs, shared, budget, max_per_layer=cap)
        assert sel.importance == pytest.approx(best, abs=1e-9)
        assert (sel.cost <= np.asarray(budget) * (1 + FEASIBILITY_RTOL)).all()
        if best - runner_up > 1e-6:  # a unique optimum: the very same modules
            assert list(sel.ids) == sorted(best_ids, key=lambda m: (m.split(".")[0], int(m.split(".m")[1])))
        solved += 1
    assert solved >= 30


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


def test_fit_to_load_drops_least_important_first_and_keeps_free_modules():
    full = select_modules(IMP, LAYER, COSTS, SHARED, [8, 8, 8])
    assert full.ids == tuple(sorted(IMP)) and full.cost.tolist() == [8, 8, 8]
    assert fit_to_load(full, IMP, LAYER, COSTS, SHARED, [8, 8, 8]) is full
    # comm budget 7: drop l1.m0 (0.1) -> 7 fits
    assert fit_to_load(full, IMP, LAYER, COSTS, SHARED, [7, 8, 8]).ids == ("l0.m0", "l0.m1", "l0.m2", "l1.m1")
    # comm budget 6: drop l1.m0 (0.1), skip free l0.m2 (0.2, helps nothing), drop l0.m1 (0.3)
    smaller = fit_to_load(full, IMP, LAYER, COSTS, SHARED, [6, 8, 8])
    assert smaller.ids == ("l0.m0", "l0.m2", "l1.m1")
    assert smaller.forced == full.forced
    assert smaller.importance == pytest.approx(1.6) and smaller.cost.tolist() == [5, 5, 5]


def test_fit_to_load_infeasible_and_unknown_modules():
    full = select_modules(IMP, LAYER, COSTS, SHARED, [8, 8, 8])
    with pytest.raises(InfeasibleBudget, match="mem") as info:
        fit_to_load(full, IMP, LAYER, COSTS, SHARED, [8, 8, 4])
    assert info.value.over == {"mem": 1.0}
    stranger = Selection(("l0.m0", "l9.m9"), ("l0.m0",), 0.5, np.zeros(3))
    with pytest.raises(ValueError, match="l9.m9"):
        fit_to_load(stranger, IMP, LAYER, COSTS, SHARED, [8, 8, 8])
