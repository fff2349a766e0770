"""ECLM personalized sub-model derivation: a 0/1 multi-dimensional knapsack over modules.

ECLM section 5.1: a device's sub-model maximises the summed module importance subject to
its communication, computation and memory budgets,

    max sum_i Importance(w_i | D_k) * d_i   s.t.  sum_i Resource_j(w_i) * d_i <= L_j,
    j in {Comm., Comp., Mem.},  d_i in {0, 1}.

The most important module of every module layer is taken first ("forced") so no layer is
empty; the rest is solved exactly with ``scipy.optimize.milp`` (HiGHS branch and bound).
Shared parts (stem, head, selector) travel with every sub-model, so their cost is charged
before any module. Section 3/5.1: a device may shrink its module set locally when its load
changes -- :func:`fit_to_load`.

Plain numpy/scipy: nothing of torch, Flower or the project.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: The three budget dimensions of ECLM 5.1, in cost-vector order, with their units.
COST_DIMENSIONS = ("comm", "comp", "mem")
COST_UNITS = ("bytes", "FLOPs", "bytes")

#: Relative tolerance of every budget check: a set fits when, in each dimension,
#: ``cost <= budget * (1 + FEASIBILITY_RTOL)``. It equals HiGHS's default MIP feasibility
#: tolerance (1e-6) on our budget-scaled rows, so the solver and this module agree on what
#: fits; an overrun below one part per million is float noise from summing costs in another
#: order, not a real overrun (measured byte/FLOP costs are nowhere near that precise).
FEASIBILITY_RTOL = 1e-6

#: HiGHS stops at a relative MIP gap of 1e-4 by default; 0 makes the knapsack exact.
MIP_OPTIONS = {"mip_rel_gap": 0.0, "presolve": True}


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
        Every chosen module id (forced included), in natural id order ("l0.m2" < "l0.m10").
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
        ``flops`` and ``memory`` attributes, such as ``models.modular.ModuleCost``).
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
        The optimal module set. Ties between modules of equal importance for the forced
        pick go to the lowest id; modules of zero importance are never added (they cannot
        raise the objective). Exact up to HiGHS's absolute MIP gap (1e-6 of the largest
        importance, after scaling it to 1).

    Raises
    ------
    InfeasibleBudget
        If shared parts plus the forced modules exceed the budget in some dimension.
    ValueError
        On inconsistent keys, negative or non-finite numbers, or a bad ``max_per_layer``.
    """
    imp, layers, cost_of = _validated_modules(importance, layer_of, costs)
    shared, limit = _vector(shared_cost, "shared_cost"), _budget(budget)
    if max_per_layer is not None and (not isinstance(max_per_layer, int) or max_per_layer < 1):
        raise ValueError(f"max_per_layer must be None or an int >= 1, got {max_per_layer!r}")
    forced = _forced_modules(imp, layers)
    used = shared + sum((cost_of[m] for m in forced), np.zeros(3))
    _raise_if_over(used, limit, "forced modules (most important per layer) + shared parts")
    candidates = [m for m in _ordered(imp) if m not in forced and imp[m] > 0]
    chosen = _solve_knapsack(candidates, imp, layers, cost_of, _allowance(limit) - used, max_per_layer)
    selection = _make_selection(list(forced) + chosen, forced, imp, cost_of, shared)
    # HiGHS may accept a row violation up to its own tolerance: re-check with ours.
    return _drop_until_fits(selection, imp, cost_of, shared, limit)


def fit_to_load(
    selection: Selection,
    importance: Mapping[str, float],
    layer_of: Mapping[str, int],
    costs: Mapping[str, Sequence[float]],
    shared_cost: Sequence[float],
    budget: Sequence[float],
) -> Selection:
    """Shrink a sub-model locally to a smaller budget (ECLM 3 and 5.1, on-demand adjustment).

    A device only holds the modules of ``selection``, so it can only drop. Repeatedly drops
    the least important non-forced module whose removal lowers a still-violated dimension
    (ties: the higher id goes first), until the selection fits; modules that cost nothing in
    every violated dimension (residual bypasses) are kept since dropping them cannot help.

    Parameters
    ----------
    selection : Selection
        The device's current sub-model (from :func:`select_modules`).
    importance, layer_of, costs, shared_cost, budget
        As in :func:`select_modules`; ``budget`` is the new, smaller one.

    Returns
    -------
    Selection
        ``selection`` itself if it already fits, else the reduced selection.

    Raises
    ------
    InfeasibleBudget
        If even the forced modules plus the shared parts do not fit.
    ValueError
        If ``selection`` names modules missing from ``importance``.
    """
    imp, _layers, cost_of = _validated_modules(importance, layer_of, costs)
    shared, limit = _vector(shared_cost, "shared_cost"), _budget(budget)
    unknown = sorted(set(selection.ids) - set(imp))
    if unknown or not set(selection.forced) <= set(selection.ids):
        raise ValueError(f"selection holds unknown modules {unknown} or forced ids outside its ids")
    used = shared + sum((cost_of[m] for m in selection.forced), np.zeros(3))
    _raise_if_over(used, limit, "forced modules + shared parts")
    return _drop_until_fits(selection, imp, cost_of, shared, limit)


def _solve_knapsack(candidates, imp, layers, cost_of, residual, max_per_layer) -> list[str]:
    """Exact 0/1 multi-dimensional knapsack over ``candidates`` with ``scipy.optimize.milp``."""
    if not candidates:
        return []
    from scipy.optimize import Bounds, LinearConstraint, milp  # 0.3-0.7 s: only runs that select modules pay it

    weights = np.array([imp[m] for m in candidates])
    matrix = np.array([cost_of[m] for m in candidates]).T  # (3, n)
    rows, upper = [], []
    for j in range(3):
        if np.isinf(residual[j]) or not matrix[j].any():
            continue  # unconstrained, or nothing here costs anything in this dimension
        scale = max(residual[j], matrix[j].max())
        rows.append(matrix[j] / scale)
        upper.append(max(residual[j], 0.0) / scale)
    if max_per_layer is not None:
        for layer in sorted({layers[m] for m in candidates}):
            rows.append(np.array([float(layers[m] == layer) for m in candidates]))
            upper.append(max_per_layer - 1.0)  # the forced module already sits in this layer
    constraints = [LinearConstraint(np.array(rows), -np.inf, np.array(upper))] if rows else []
    result = milp(
        -weights / weights.max(),
        constraints=constraints,
        integrality=np.ones(len(candidates)),
        bounds=Bounds(0.0, 1.0),
        options=MIP_OPTIONS,
    )
    if result.status != 0:
        raise RuntimeError(f"milp did not solve the module knapsack: {result.message}")
    return [m for m, x in zip(candidates, result.x) if x > 0.5]


def _drop_until_fits(selection, imp, cost_of, shared, limit) -> Selection:
    """Drop least important non-forced modules that help a violated dimension until it fits."""
    kept = list(selection.ids)
    total = shared + sum((cost_of[m] for m in kept), np.zeros(3))
    while (violated := total > _allowance(limit)).any():
        helpful = [m for m in kept if m not in selection.forced and (cost_of[m][violated] > 0).any()]
        victim = min(reversed(helpful), key=lambda m: imp[m])  # kept is id-ordered: ties -> highest id
        kept.remove(victim)
        total = total - cost_of[victim]
    if len(kept) == len(selection.ids):
        return selection
    return _make_selection(kept, selection.forced, imp, cost_of, shared)


def _forced_modules(imp: Mapping[str, float], layers: Mapping[str, int]) -> tuple[str, ...]:
    """The most important module of every layer; ties go to the lowest id."""
    best: dict[int, str] = {}
    for m in _ordered(imp):  # ascending ids, so a strict ">" keeps the lowest id on ties
        layer = layers[m]
        if layer not in best or imp[m] > imp[best[layer]]:
            best[layer] = m
    return tuple(best[layer] for layer in sorted(best))


def _make_selection(ids, forced, imp, cost_of, shared) -> Selection:
    ordered = tuple(sorted(ids, key=_id_key))
    cost = shared + sum((cost_of[m] for m in ordered), np.zeros(3))
    cost.setflags(write=False)
    return Selection(ordered, tuple(forced), float(sum(imp[m] for m in ordered)), cost)


def _raise_if_over(used: np.ndarray, limit: np.ndarray, what: str) -> None:
    """Raise :class:`InfeasibleBudget` naming every dimension where ``used`` exceeds ``limit``."""
    over = {dim: float(used[j] - limit[j]) for j, dim in enumerate(COST_DIMENSIONS) if used[j] > _allowance(limit)[j]}
    if not over:
        return
    parts = [
        f"{dim} needs {used[j]:.6g} {COST_UNITS[j]} > budget {limit[j]:.6g} (over by {over[dim]:.6g})"
        for j, dim in enumerate(COST_DIMENSIONS)
        if dim in over
    ]
    raise InfeasibleBudget(f"{what} do not fit: {'; '.join(parts)}; the device cannot take part this round", over)


def _allowance(limit: np.ndarray) -> np.ndarray:
    """The budget widened by :data:`FEASIBILITY_RTOL` (``inf`` stays ``inf``)."""
    return limit * (1.0 + FEASIBILITY_RTOL)


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
        raise ValueError(f"importance must be finite and >= 0 (a mean gate probability); bad ids: {sorted(bad)}")
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


def _id_key(module_id: str) -> tuple:
    """Natural order of ids: digit runs compare as numbers, so "l0.m2" < "l0.m10"."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", module_id))


def _ordered(ids) -> list[str]:
    return sorted(ids, key=_id_key)
