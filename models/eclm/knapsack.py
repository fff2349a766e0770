"""ECLM personalized sub-model derivation: a 0/1 multi-dimensional knapsack over modules.

ECLM section 5.1: a device's sub-model maximises the summed module importance subject to
its communication, computation and memory budgets,

    max sum_i Importance(w_i | D_k) * d_i   s.t.  sum_i Resource_j(w_i) * d_i <= L_j,
    j in {Comm., Comp., Mem.},  d_i in {0, 1}.

The most important module of every module layer is taken first ("forced") so no layer is
empty; the rest is solved with ``scipy.optimize.milp`` (HiGHS branch and bound). Shared
parts (stem, head, selector) travel with every sub-model, so their cost is charged before
any module. Section 3/5.1: a device may shrink its module set locally when its load
changes -- :func:`fit_to_load`.

Exactness. What fits is decided in exact rational arithmetic on the given float costs
(:func:`fits`), never by the solver's tolerance: modules that cannot fit on their own are
left out before solving, every budget row is scaled by what remains of its budget (so
HiGHS's 1e-6 feasibility tolerance is 1e-6 of the remaining budget), the solver's answer
is checked exactly, and an answer that overruns is excluded with a no-good cut and the
problem solved again -- the result is the best set among those that truly fit.

Plain numpy/scipy: nothing of torch, Flower or the project.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

#: The three budget dimensions of ECLM 5.1, in cost-vector order, with their units.
COST_DIMENSIONS = ("comm", "comp", "mem")
COST_UNITS = ("bytes", "FLOPs", "bytes")

#: Relative slack of every budget check: a set fits when, in each dimension, the exact sum
#: of its float costs is ``<= budget * (1 + FEASIBILITY_RTOL)``. An overrun below one part
#: per million is float noise from summing costs in another order (0.1 + 0.2 > 0.3), not a
#: real overrun (measured byte/FLOP costs are nowhere near that precise).
FEASIBILITY_RTOL = 1e-6

#: HiGHS stops at a relative MIP gap of 1e-4 by default; 0 asks for the optimum.
MIP_OPTIONS = {"mip_rel_gap": 0.0, "presolve": True}

#: The objective handed to HiGHS is importance scaled so the largest is this value: its
#: absolute MIP gap (1e-6, HiGHS default ``mip_abs_gap``) is then 1e-12 of the largest
#: importance, far below any difference between two gate means that matters.
OBJECTIVE_SCALE = 1e6

#: Most solver answers that overrun a budget in exact arithmetic before giving up. Each is
#: cut off and the problem solved again; an overrun needs a set within HiGHS's tolerance
#: (1e-6 of the remaining budget) above the budget, so more than a few never happen.
MAX_NO_GOOD_CUTS = 64


class InfeasibleBudget(ValueError):
    """The forced modules plus the shared parts exceed the budget: the device sits out.

    Attributes
    ----------
    over : dict[str, float]
        For every violated dimension (``"comm"``, ``"comp"``, ``"mem"``), how much the
        forced set exceeds the budget, in that dimension's unit.
    """

    def __init__(self, message: str, over: Mapping[str, float]):
        super().__init__(message)
        self.over = dict(over)


@dataclass(frozen=True)
class Selection:
    """A sub-model: the chosen module ids, the forced ones, their importance and cost.

    Attributes
    ----------
    ids : tuple[str, ...]
        Every chosen module id (forced included), in :func:`module_order` ("l0.m2" < "l0.m10").
    forced : tuple[str, ...]
        The most important module of each layer, always part of ``ids``.
    importance : float
        Sum of the chosen modules' importance (the knapsack objective).
    cost : np.ndarray
        (3,) read-only total cost [comm bytes, comp FLOPs, mem bytes], shared parts included.
        Left out of equality and hashing (arrays do not compare to one bool).
    """

    ids: tuple[str, ...]
    forced: tuple[str, ...]
    importance: float
    cost: np.ndarray = field(compare=False)


def module_order(module_id: str) -> tuple:
    """Sort key of module ids, shared by the cloud and the devices: natural order.

    Digit runs compare as numbers, so ``"l0.m2" < "l0.m10"`` (as plain strings it would be
    the other way round). Every tie between modules of equal importance goes to the id
    that comes first in this order.
    """
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", module_id))


def forced_modules(importance: Mapping[str, float], layer_of: Mapping[str, int]) -> tuple[str, ...]:
    """The most important module of every layer (ECLM 5.1), layer by layer.

    Ties go to the first id in :func:`module_order`. The cloud (:func:`select_modules`) and
    a device adjusting its sub-model (``clients.eclm``) both call this, so they force the
    same modules.
    """
    best: dict[int, str] = {}
    for m in sorted(importance, key=module_order):  # ascending, so a strict ">" keeps the first on ties
        layer = layer_of[m]
        if layer not in best or importance[m] > importance[best[layer]]:
            best[layer] = m
    return tuple(best[layer] for layer in sorted(best))


def select_modules(
    importance: Mapping[str, float],
    layer_of: Mapping[str, int],
    costs: Mapping[str, Sequence[float]],
    shared_cost: Sequence[float],
    budget: Sequence[float],
    max_per_layer: int | None = None,
) -> Selection:
    """Derive a device's personalized sub-model (ECLM 5.1).

    Parameters
    ----------
    importance : Mapping[str, float]
        Module id -> Importance(w_i | D_k) >= 0, the mean gate probability of the module over
        the device's samples (ECLM 5.1).
    layer_of : Mapping[str, int]
        Module id -> index of its module layer. Same keys as ``importance``.
    costs : Mapping[str, Sequence[float]]
        Module id -> [comm bytes, comp FLOPs, mem bytes] (or any object with ``bytes``,
        ``flops`` and ``memory`` attributes, such as ``models.eclm.modular.ModuleCost``).
        Residual modules cost 0.
    shared_cost : Sequence[float]
        (3,) cost of the parts every sub-model carries (stem, head, selector).
    budget : Sequence[float]
        (3,) the device's budget in the same units; ``inf`` means unconstrained.
    max_per_layer : int or None
        Optional cap on chosen modules per layer (forced module included).

    Returns
    -------
    Selection
        The optimal module set: it fits (:func:`fits`) and no set holding the forced
        modules that fits has a larger importance (up to HiGHS's absolute gap, see
        :data:`OBJECTIVE_SCALE`). Forced ties go to the first id in :func:`module_order`;
        modules of zero importance are never added (they cannot raise the objective).

    Raises
    ------
    InfeasibleBudget
        If shared parts plus the forced modules exceed the budget in some dimension.
    ValueError
        On inconsistent keys, negative or non-finite numbers, or a bad ``max_per_layer``.
    """
    imp, layers, cost_of = _validated_modules(importance, layer_of, costs)
    shared, limit = _vector(shared_cost, "shared_cost"), _budget(budget)
    bad_cap = isinstance(max_per_layer, bool) or not isinstance(max_per_layer, int) or max_per_layer < 1
    if max_per_layer is not None and bad_cap:
        raise ValueError(f"max_per_layer must be None or an int >= 1, got {max_per_layer!r}")
    forced = forced_modules(imp, layers)
    rest = [m for m in imp if m not in forced]
    what = "forced modules (most important per layer) + shared parts"
    return _best_selection(forced, rest, imp, layers, cost_of, shared, limit, max_per_layer, what)


def fit_to_load(
    selection: Selection,
    importance: Mapping[str, float],
    layer_of: Mapping[str, int],
    costs: Mapping[str, Sequence[float]],
    shared_cost: Sequence[float],
    budget: Sequence[float],
) -> Selection:
    """Shrink a sub-model locally to a smaller budget (ECLM 3 and 5.1, on-demand adjustment).

    A device only holds the modules of ``selection``, so it can only drop: the result is the
    best subset of ``selection.ids`` that keeps ``selection.forced`` and fits ``budget``
    (the same exact knapsack as :func:`select_modules`, over the held modules).

    Parameters
    ----------
    selection : Selection
        The device's current sub-model (from :func:`select_modules`).
    importance, layer_of, costs, shared_cost, budget
        As in :func:`select_modules`; ``budget`` is the new, smaller one.

    Returns
    -------
    Selection
        ``selection`` itself if it already fits, else the best reduced selection.

    Raises
    ------
    InfeasibleBudget
        If even the forced modules plus the shared parts do not fit.
    ValueError
        If ``selection`` names modules missing from ``importance``.
    """
    imp, layers, cost_of = _validated_modules(importance, layer_of, costs)
    shared, limit = _vector(shared_cost, "shared_cost"), _budget(budget)
    unknown = sorted(set(selection.ids) - set(imp), key=module_order)
    if unknown or not set(selection.forced) <= set(selection.ids):
        raise ValueError(f"selection holds unknown modules {unknown} or forced ids outside its ids")
    if fits([cost_of[m] for m in selection.ids], shared, limit):
        return selection
    forced = tuple(selection.forced)
    rest = [m for m in selection.ids if m not in forced]
    return _best_selection(forced, rest, imp, layers, cost_of, shared, limit, None, "forced modules + shared parts")


def fits(module_costs: Iterable[Sequence[float]], shared: Sequence[float], limit: Sequence[float]) -> bool:
    """Whether shared parts plus ``module_costs`` fit ``limit``, decided in exact arithmetic.

    In every dimension the exact (rational) sum of the float costs must be at most
    ``limit * (1 + FEASIBILITY_RTOL)``, also taken exactly; an ``inf`` limit always holds.
    The answer does not depend on the order of the costs.
    """
    total = _exact_sum(module_costs, shared)
    return all(a is None or t <= a for t, a in zip(total, _exact_allowance(limit)))


def _best_selection(forced, rest, imp, layers, cost_of, shared, limit, cap, what) -> Selection:
    """Forced modules plus the best fitting subset of ``rest`` (raises if the forced set is over).

    Modules of zero importance, and modules that cannot fit on their own next to the forced
    set, never reach the solver.
    """
    allowance = _exact_allowance(limit)
    used = _exact_sum((cost_of[m] for m in forced), shared)
    _raise_if_over(used, allowance, limit, what)
    remaining = [None if a is None else a - u for a, u in zip(allowance, used)]
    exact = {m: [Fraction(float(c)) for c in cost_of[m]] for m in rest}
    candidates = [m for m in sorted(rest, key=module_order) if imp[m] > 0 and _fits_alone(exact[m], remaining)]
    chosen = _solve_exact(candidates, imp, layers, exact, remaining, _slots(forced, layers, cap, candidates))
    return _make_selection(list(forced) + chosen, forced, imp, cost_of, shared)


def _slots(forced, layers, cap, candidates) -> dict[int, int] | None:
    """Free places per layer under ``max_per_layer`` (the forced module holds one), or None."""
    if cap is None:
        return None
    taken = {layers[m]: 1 for m in forced}
    return {layers[m]: cap - taken.get(layers[m], 0) for m in candidates}


def _solve_exact(candidates, imp, layers, exact, remaining, slots) -> list[str]:
    """The best subset of ``candidates`` whose exact costs fit ``remaining`` (and ``slots``)."""
    if not candidates:
        return []
    rows, upper = _budget_rows(candidates, exact, remaining)
    rows, upper = rows + _slot_rows(candidates, layers, slots), upper + _slot_limits(candidates, layers, slots)
    if not rows:
        return list(candidates)  # nothing binds: every candidate fits together
    for _ in range(MAX_NO_GOOD_CUTS + 1):
        chosen = _milp_choice(candidates, imp, rows, upper)
        if _within(chosen, exact, remaining):
            return _complete(chosen, candidates, imp, layers, exact, remaining, slots)
        # HiGHS accepted an overrun inside its tolerance: forbid this set (and its supersets)
        rows.append(np.array([float(m in chosen) for m in candidates]))
        upper.append(len(chosen) - 1.0)
    raise RuntimeError(
        f"the module knapsack still overran a budget after {MAX_NO_GOOD_CUTS} no-good cuts; "
        "this is a solver problem, please report the instance"
    )


def _budget_rows(candidates, exact, remaining) -> tuple[list[np.ndarray], list[float]]:
    """One row per dimension that can bind, scaled by what remains of its budget (upper 1)."""
    rows, upper = [], []
    for j, left in enumerate(remaining):
        if left is None or sum(exact[m][j] for m in candidates) <= left:
            continue  # unconstrained, or all candidates together fit: this row never binds
        rows.append(np.array([float(exact[m][j] / left) for m in candidates]))
        upper.append(1.0)
    return rows, upper


def _slot_rows(candidates, layers, slots) -> list[np.ndarray]:
    if slots is None:
        return []
    return [np.array([float(layers[m] == layer) for m in candidates]) for layer in sorted(slots)]


def _slot_limits(candidates, layers, slots) -> list[float]:
    return [] if slots is None else [float(slots[layer]) for layer in sorted(slots)]


def _milp_choice(candidates, imp, rows, upper) -> list[str]:
    """HiGHS's optimum of the 0/1 problem ``max imp . x  s.t.  rows x <= upper``."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # 0.3-0.7 s: only runs that select modules pay it

    weights = np.array([imp[m] for m in candidates])
    result = milp(
        -weights * (OBJECTIVE_SCALE / weights.max()),
        constraints=[LinearConstraint(np.array(rows), -np.inf, np.array(upper))],
        integrality=np.ones(len(candidates)),
        bounds=Bounds(0.0, 1.0),
        options=MIP_OPTIONS,
    )
    if result.status != 0:
        raise RuntimeError(f"milp did not solve the module knapsack: {result.message}")
    return [m for m, x in zip(candidates, result.x) if x > 0.5]


def _complete(chosen, candidates, imp, layers, exact, remaining, slots) -> list[str]:
    """Add every left-out candidate that still fits, most important first (never lowers the objective).

    Catches modules whose importance is below HiGHS's gap (e.g. a free module of tiny importance).
    """
    chosen = list(chosen)
    left = [None if r is None else r - sum(exact[m][j] for m in chosen) for j, r in enumerate(remaining)]
    free = None if slots is None else {layer: n - sum(layers[m] == layer for m in chosen) for layer, n in slots.items()}
    for m in sorted(set(candidates) - set(chosen), key=lambda m: (-imp[m], module_order(m))):
        if not _fits_alone(exact[m], left) or (free is not None and free[layers[m]] < 1):
            continue
        chosen.append(m)
        left = [None if r is None else r - c for r, c in zip(left, exact[m])]
        if free is not None:
            free[layers[m]] -= 1
    return chosen


def _within(chosen, exact, remaining) -> bool:
    """Whether the exact cost of ``chosen`` is within ``remaining`` in every dimension."""
    return all(r is None or sum(exact[m][j] for m in chosen) <= r for j, r in enumerate(remaining))


def _fits_alone(exact_cost, remaining) -> bool:
    """Whether one module's exact cost fits what remains; ``None`` remaining = unconstrained."""
    return all(r is None or c <= r for c, r in zip(exact_cost, remaining))


def _exact_sum(module_costs: Iterable[Sequence[float]], shared: Sequence[float]) -> list[Fraction]:
    """Exact per-dimension sum of the shared cost and the module costs."""
    total = [Fraction(float(s)) for s in shared]
    for cost in module_costs:
        total = [t + Fraction(float(c)) for t, c in zip(total, cost)]
    return total


def _exact_allowance(limit: Sequence[float]) -> list[Fraction | None]:
    """``limit * (1 + FEASIBILITY_RTOL)`` exactly, per dimension; None for ``inf``."""
    widen = 1 + Fraction(FEASIBILITY_RTOL)
    return [None if np.isinf(l) else Fraction(float(l)) * widen for l in limit]


def _make_selection(ids, forced, imp, cost_of, shared) -> Selection:
    ordered = tuple(sorted(ids, key=module_order))
    cost = np.array([float(t) for t in _exact_sum((cost_of[m] for m in ordered), shared)])
    cost.setflags(write=False)
    return Selection(ordered, tuple(forced), float(sum(imp[m] for m in ordered)), cost)


def _raise_if_over(used, allowance, limit, what: str) -> None:
    """Raise :class:`InfeasibleBudget` naming every dimension where ``used`` exceeds the allowance."""
    over = {
        dim: float(used[j] - Fraction(float(limit[j])))
        for j, dim in enumerate(COST_DIMENSIONS)
        if allowance[j] is not None and used[j] > allowance[j]
    }
    if not over:
        return
    parts = [
        f"{dim} needs {float(used[j]):.6g} {COST_UNITS[j]} > budget {limit[j]:.6g} (over by {over[dim]:.6g})"
        for j, dim in enumerate(COST_DIMENSIONS)
        if dim in over
    ]
    raise InfeasibleBudget(f"{what} do not fit: {'; '.join(parts)}; the device cannot take part this round", over)


def _validated_modules(importance, layer_of, costs):
    """Check keys and numbers; return plain dicts (importance, layer, cost vector)."""
    if not importance:
        raise ValueError("importance is empty: pass one importance value per module id")
    keys = set(importance)
    for name, mapping in (("layer_of", layer_of), ("costs", costs)):
        if set(mapping) != keys:
            diff = sorted(keys.symmetric_difference(mapping))
            raise ValueError(f"{name} must have the same module ids as importance; differing ids: {diff}")
    imp = {m: float(v) for m, v in importance.items()}
    bad = [m for m, v in imp.items() if not np.isfinite(v) or v < 0]
    if bad:
        bad = sorted(bad, key=module_order)
        raise ValueError(f"importance must be finite and >= 0 (a mean gate probability); bad ids: {bad}")
    layers = {m: int(v) for m, v in layer_of.items()}
    return imp, layers, {m: _vector(_cost_sequence(c), f"costs[{m!r}]") for m, c in costs.items()}


def _cost_sequence(cost) -> Sequence[float]:
    """Accept [comm, comp, mem] or an object with ``bytes``/``flops``/``memory`` (ModuleCost)."""
    if all(hasattr(cost, a) for a in ("bytes", "flops", "memory")):
        return (cost.bytes, cost.flops, cost.memory)
    return cost


def _vector(values, name: str) -> np.ndarray:
    """A finite, non-negative (3,) float vector."""
    vec = np.asarray(values, dtype=float)
    if vec.shape != (3,) or not np.isfinite(vec).all() or (vec < 0).any():
        raise ValueError(f"{name} must be 3 finite numbers >= 0 [comm bytes, comp FLOPs, mem bytes], got {values!r}")
    return vec


def _budget(values) -> np.ndarray:
    """A (3,) budget: numbers >= 0, ``inf`` allowed (unconstrained), NaN not."""
    vec = np.asarray(values, dtype=float)
    if vec.shape != (3,) or np.isnan(vec).any() or (vec < 0).any():
        raise ValueError(f"budget must be 3 numbers >= 0 (inf = unconstrained) [comm, comp, mem], got {values!r}")
    return vec
