"""ElasticDNN filter-grained resource scheduler for n applications (seed 003, section III-C2).

Each application i picks one of C surrogate model sizes j_i (eq. 9) and gets the resource share

    lambda_i = s_{i,j_i} / sum_a s_{a,j_a}                                      (eq. 10)

so its retraining takes t_i = T_{i,j_i} / lambda_i, which must fit the window: t_i <= t_max (eq. 11).
The objective (eq. 8) is the summed accuracy over the retraining window.

**Eq. 8 as printed swaps its two time weights.** The paper prints
``A * (t_max - T/lambda) + Ã * T/lambda``, which credits the after-retraining accuracy Ã for the
retraining duration and so rewards *slower* retraining. The text ("the model accuracy averaged over
the retraining window, aggregating accuracies before and after the retraining", after Ekya [4])
means the old model serves at A while it retrains and the retrained one at Ã for the rest::

    value_i = A_{i,j_i} * t_i + Ã_{i,j_i} * (t_max - t_i)

which is what this module maximises. :func:`window_accuracy` is value_i / t_max.

Solvers: :func:`evolutionary_search` (the paper's: random + mutated solutions, keep the better ones,
early stop), :func:`exhaustive_search` (small cases, the reference), and the baselines of section
IV-C, :func:`uniform_schedule` and :func:`ekya_like_schedule`.

Plain numpy: nothing of torch, Flower or the project.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

#: Evolutionary search defaults. The paper (III-C2, after Once-for-All [18]) gives none of them;
#: assumptions tuned on its largest case (n = 4 apps x C = 8 sizes = 4096 plans): on 200 random
#: instances (tests' generator) these found the exhaustive optimum 199 times, ~1400 evaluations each,
#: against 168 for population 16 / mutation 0.5 / patience 20.
POPULATION = 32  # solutions kept and new candidates drawn per iteration
MUTATION_PROB = 0.8  # a candidate is a one-gene mutation of a kept solution, else fresh random
PATIENCE = 30  # early stop after this many iterations without a better solution
MAX_ITERS = 1000  # hard cap on iterations

#: Relative slack of the eq. 11 check, t_i <= t_max * (1 + rtol): float noise only.
FEASIBILITY_RTOL = 1e-9

#: exhaustive_search refuses spaces bigger than this many plans (C ** n).
EXHAUSTIVE_LIMIT = 1_000_000

#: Ekya-like baseline: shares move in steps of this size (assumption; Ekya's thief scheduler
#: reallocates in a fixed quantum Delta, NSDI 2022 section 4.2).
SHARE_STEP = 0.05


@dataclass(frozen=True)
class Schedule:
    """A scheduling plan for n applications.

    Attributes
    ----------
    choice : tuple[int, ...]
        Model size index j_i of each application (eq. 9).
    shares : np.ndarray
        (n,) resource share lambda_i of each application (sum <= 1).
    retraining_time : np.ndarray
        (n,) T_{i,j_i} / lambda_i (inf for a zero share).
    retrains : np.ndarray
        (n,) bool: the plan retrains the application. Always all True for the eq. 8-11 solvers;
        the baselines leave out apps that cannot (or need not) finish inside the window.
    objective : float
        Eq. 8 (corrected, see the module note): t_max * sum of :func:`window_accuracy`.
        ``-inf`` when the plan is infeasible.
    feasible : bool
        Every retraining application finishes inside the window (eq. 11).
    worst_overrun : float
        max_i (start_time + t_i - t_max) over retraining apps: <= 0 when feasible, the amount of
        time the worst app overruns the window when not (0 if no app retrains).
    iterations : int
        Search iterations run (evolutionary), plans evaluated (exhaustive), 0 or allocation steps
        (baselines).
    start_time : float
        Time at which retraining starts inside the window (Ekya-like: its profiling time), else 0.
    """

    choice: tuple[int, ...]
    shares: np.ndarray = field(compare=False)
    retraining_time: np.ndarray = field(compare=False)
    retrains: np.ndarray = field(compare=False)
    objective: float
    feasible: bool
    worst_overrun: float
    iterations: int
    start_time: float = 0.0


def _check_problem(A, A_tilde, T, s, t_max):
    """Validate the (n, C) tables and the window; return float arrays."""
    arrays = [np.asarray(x, dtype=float) for x in (A, A_tilde, T, s)]
    shape = arrays[0].shape
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"A must be an (n apps, C sizes) table with n, C >= 1, got shape {shape}")
    for name, array in zip(("A", "A_tilde", "T", "s"), arrays):
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape} but A has {shape}; all tables are (n apps, C sizes)")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or inf")
    a, a_tilde, times, ratios = arrays
    for name, array in (("A", a), ("A_tilde", a_tilde)):
        if np.any(array < 0) or np.any(array > 1):
            raise ValueError(f"{name} must hold accuracies in [0, 1] (fractions, not percent)")
    if np.any(times < 0):
        raise ValueError("T (retraining time at 100% of resources) must be >= 0")
    if np.any(ratios <= 0):
        raise ValueError("s (remodel ratios, eq. 10) must be > 0: a zero-size model gets no share")
    if not (np.isfinite(t_max) and t_max > 0):
        raise ValueError(f"t_max (retraining window) must be finite and > 0, got {t_max}")
    return a, a_tilde, times, ratios, float(t_max)


def _check_choice(choice, n_apps: int, n_sizes: int) -> np.ndarray:
    array = np.asarray(choice)
    if array.shape != (n_apps,) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"choice must be {n_apps} integer size indices (one per app, eq. 9), got {choice!r}")
    if np.any(array < 0) or np.any(array >= n_sizes):
        raise ValueError(f"choice {array.tolist()} has an index outside 0..{n_sizes - 1}")
    return array


def shares(choice, s) -> np.ndarray:
    """Eq. 10: lambda_i = s_{i,j_i} / sum_a s_{a,j_a}, for one choice vector."""
    ratios = np.asarray(s, dtype=float)
    picked = ratios[np.arange(ratios.shape[0]), _check_choice(choice, *ratios.shape)]
    return picked / picked.sum()


def _window_value(before, after, busy, t_max):
    """Accuracy summed over the window: ``before`` while busy (profiling + retraining), then ``after``."""
    return before * busy + after * (t_max - busy)


def _evaluate(choices: np.ndarray, a, a_tilde, times, ratios, t_max):
    """Eq. 8 (corrected) and the worst overrun for a batch of (m, n) choices, vectorised."""
    rows = np.arange(a.shape[0])
    picked_s = ratios[rows, choices]
    lam = picked_s / picked_s.sum(axis=1, keepdims=True)
    t = times[rows, choices] / lam
    overrun = (t - t_max).max(axis=1)
    value = _window_value(a[rows, choices], a_tilde[rows, choices], t, t_max).sum(axis=1)
    feasible = overrun <= FEASIBILITY_RTOL * t_max
    return np.where(feasible, value, -np.inf), overrun


def objective(choice, A, A_tilde, T, s, t_max) -> float:
    """Eq. 8 (corrected weights, see the module note) with lambda from eq. 10.

    Returns
    -------
    float
        sum_i A_{i,j_i} * t_i + Ã_{i,j_i} * (t_max - t_i) with t_i = T_{i,j_i} / lambda_i, or
        ``-inf`` if some t_i > t_max (eq. 11 violated).
    """
    a, a_tilde, times, ratios, window = _check_problem(A, A_tilde, T, s, t_max)
    picked = _check_choice(choice, *a.shape)
    value, _ = _evaluate(picked[None, :], a, a_tilde, times, ratios, window)
    return float(value[0])


def _plan(choice, a, a_tilde, times, ratios, t_max, iterations: int) -> Schedule:
    """Build the Schedule of one eq. 8-11 choice."""
    picked = np.asarray(choice, dtype=int)
    value, overrun = _evaluate(picked[None, :], a, a_tilde, times, ratios, t_max)
    lam = shares(picked, ratios)
    return Schedule(choice=tuple(int(j) for j in picked), shares=lam,
                    retraining_time=times[np.arange(a.shape[0]), picked] / lam,
                    retrains=np.ones(a.shape[0], dtype=bool), objective=float(value[0]),
                    feasible=bool(np.isfinite(value[0])), worst_overrun=float(overrun[0]),
                    iterations=int(iterations))


def _rank(choices: np.ndarray, problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique choices sorted best first: highest objective, then (infeasible) smallest overrun."""
    unique = np.unique(choices, axis=0)
    value, overrun = _evaluate(unique, *problem)
    order = np.lexsort((overrun, -value))
    return unique[order], value[order], overrun[order]


def _candidates(rng, kept: np.ndarray, count: int, n_sizes: int, mutation_prob: float) -> np.ndarray:
    """``count`` new plans: each a one-gene mutation of a kept plan (prob. mutation_prob) or random."""
    fresh = rng.integers(0, n_sizes, size=(count, kept.shape[1]))
    parents = kept[rng.integers(0, kept.shape[0], size=count)].copy()
    genes = rng.integers(0, kept.shape[1], size=count)
    shift = rng.integers(1, max(n_sizes, 2), size=count)  # a different size when C > 1
    rows = np.arange(count)
    parents[rows, genes] = (parents[rows, genes] + shift) % n_sizes
    mutate = rng.random(count) < mutation_prob
    return np.where(mutate[:, None], parents, fresh)


def _check_search(population, mutation_prob, patience, max_iters) -> None:
    if int(population) < 1 or int(patience) < 1 or int(max_iters) < 1:
        raise ValueError(f"population, patience and max_iters must be >= 1, got "
                         f"{population}, {patience}, {max_iters}")
    if not 0.0 <= mutation_prob <= 1.0:
        raise ValueError(f"mutation_prob must be in [0, 1], got {mutation_prob}")


def evolutionary_search(A, A_tilde, T, s, t_max, *, population: int = POPULATION,
                        mutation_prob: float = MUTATION_PROB, patience: int = PATIENCE,
                        max_iters: int = MAX_ITERS, seed: int = 0) -> Schedule:
    """Solve eq. 8-11 by the paper's evolutionary search (section III-C2).

    Starts from ``population`` random plans. Every iteration draws ``population`` candidates
    (a one-gene mutation of a kept plan with probability ``mutation_prob``, else a fresh random
    plan), keeps the best ``population`` distinct plans, and stops once the best plan has not
    improved for ``patience`` iterations (or after ``max_iters``).

    Parameters
    ----------
    A, A_tilde, T, s : array_like
        (n apps, C sizes) accuracy before / after retraining, retraining time at 100% of the
        resources, remodel ratio.
    t_max : float
        Retraining window.
    population, mutation_prob, patience, max_iters : int, float, int, int
        Search settings (module constants; assumptions, the paper gives none).
    seed : int
        Seeds the search (``np.random.default_rng(seed)``).

    Returns
    -------
    Schedule
        The best plan found. If no feasible plan was found, the plan with the smallest worst
        overrun, with ``feasible=False``, ``objective=-inf`` and ``worst_overrun > 0``: the
        caller must check ``feasible``.
    """
    problem = _check_problem(A, A_tilde, T, s, t_max)
    _check_search(population, mutation_prob, patience, max_iters)
    n_apps, n_sizes = problem[0].shape
    rng = np.random.default_rng(seed)
    kept, value, overrun = _rank(rng.integers(0, n_sizes, size=(int(population), n_apps)), problem)
    best, stale, iterations = (value[0], -overrun[0]), 0, 0
    while stale < int(patience) and iterations < int(max_iters):
        iterations += 1
        fresh = _candidates(rng, kept, int(population), n_sizes, mutation_prob)
        kept, value, overrun = _rank(np.vstack([kept, fresh]), problem)
        kept, value, overrun = kept[:int(population)], value[:int(population)], overrun[:int(population)]
        if (value[0], -overrun[0]) > best:
            best, stale = (value[0], -overrun[0]), 0
        else:
            stale += 1
    return _plan(kept[0], *problem, iterations=iterations)


def exhaustive_search(A, A_tilde, T, s, t_max) -> Schedule:
    """Solve eq. 8-11 exactly by enumerating all C ** n plans (small n and C only).

    Same tie and infeasibility rules as :func:`evolutionary_search`; ``iterations`` is the
    number of plans evaluated. Raises ValueError above :data:`EXHAUSTIVE_LIMIT` plans.
    """
    problem = _check_problem(A, A_tilde, T, s, t_max)
    n_apps, n_sizes = problem[0].shape
    if n_sizes ** n_apps > EXHAUSTIVE_LIMIT:
        raise ValueError(f"{n_sizes}^{n_apps} plans exceed EXHAUSTIVE_LIMIT={EXHAUSTIVE_LIMIT}; "
                         "use evolutionary_search")
    every = np.array(list(itertools.product(range(n_sizes), repeat=n_apps)), dtype=int)
    ranked, _, _ = _rank(every, problem)
    return _plan(ranked[0], *problem, iterations=len(every))


def _fixed_size_plan(size_index, lam, a, a_tilde, times, t_max, start_time, iterations) -> Schedule:
    """A baseline plan: one size for all apps, given shares; apps that cannot finish do not retrain."""
    n_apps = a.shape[0]
    rows = np.arange(n_apps)
    with np.errstate(divide="ignore"):
        t = np.where(lam > 0, times[rows, size_index] / np.where(lam > 0, lam, 1.0), np.inf)
    retrains = (lam > 0) & (start_time + t <= t_max * (1 + FEASIBILITY_RTOL))
    busy = np.where(retrains, start_time + t, t_max)
    value = _window_value(a[rows, size_index], a_tilde[rows, size_index], busy, t_max).sum()
    overrun = float((start_time + t[retrains] - t_max).max()) if retrains.any() else 0.0
    return Schedule(choice=(int(size_index),) * n_apps, shares=lam, retraining_time=t, retrains=retrains,
                    objective=float(value), feasible=True, worst_overrun=overrun,
                    iterations=int(iterations), start_time=float(start_time))


def _check_size_index(size_index, n_sizes: int) -> int:
    if isinstance(size_index, bool) or not isinstance(size_index, (int, np.integer)) \
            or not 0 <= size_index < n_sizes:
        raise ValueError(f"size_index must be an integer in 0..{n_sizes - 1}, got {size_index!r}")
    return int(size_index)


def uniform_schedule(A, A_tilde, T, s, t_max, size_index: int) -> Schedule:
    """The Uniform baseline (section IV-C): one fixed model size for all apps, equal shares 1/n.

    An app whose retraining T_{i,size}/(1/n) does not fit the window does not retrain
    (``retrains[i] = False``) and serves A_{i,size} over the whole window; its share stays idle.
    The plan is therefore always feasible; ``objective`` is eq. 8 (corrected) under these rules.
    ``s`` is only shape-checked (shares do not follow eq. 10 here).
    """
    a, a_tilde, times, _, window = _check_problem(A, A_tilde, T, s, t_max)
    index = _check_size_index(size_index, a.shape[1])
    lam = np.full(a.shape[0], 1.0 / a.shape[0])
    return _fixed_size_plan(index, lam, a, a_tilde, times, window, 0.0, 0)


def _app_value(before, after, time, units, n_units, t_max, start_time) -> float:
    """Window value of one app with ``units / n_units`` of the resources (A if it cannot finish)."""
    if units == 0:
        return before * t_max
    busy = start_time + time * n_units / units
    return _window_value(before, after, busy, t_max) if busy <= t_max * (1 + FEASIBILITY_RTOL) else before * t_max


def ekya_like_schedule(A, A_tilde, T, s, t_max, size_index: int, *, share_step: float = SHARE_STEP,
                       profiling_time: float = 0.0) -> Schedule:
    """An Ekya-like baseline (Bhardwaj et al., NSDI 2022): greedy shares by marginal accuracy gain.

    Simplifications (honest list): one fixed model size ``size_index`` for every app (Ekya
    chooses among retraining configurations); the "micro-profile" of an app's window accuracy
    versus its share is read exactly from A, Ã, T (an oracle; Ekya profiles a few epochs and
    errs); allocation starts from zero and hands out shares in steps of ``share_step`` rather
    than Ekya's thief scheduler, which starts from a fair split and steals quanta between jobs.
    Each step gives the chunk of m steps (m >= 1) with the best gain per share to its app
    (looking past the first step is needed: gain is 0 until the app can finish in the window);
    allocation ends when the budget is spent or no chunk gains. Apps left at share 0 do not
    retrain. Ekya's profiling cost can be charged with ``profiling_time``: retraining starts
    then, and apps serve A meanwhile.

    Returns
    -------
    Schedule
        Always feasible; ``iterations`` is the number of chunks allocated.
    """
    a, a_tilde, times, _, window = _check_problem(A, A_tilde, T, s, t_max)
    index = _check_size_index(size_index, a.shape[1])
    n_units = int(round(1.0 / share_step)) if 0 < share_step <= 1 else 0
    if n_units < 1 or abs(n_units * share_step - 1.0) > 1e-9:
        raise ValueError(f"share_step must divide 1 into whole steps (e.g. 0.05, 0.1), got {share_step}")
    if not (np.isfinite(profiling_time) and 0 <= profiling_time <= window):
        raise ValueError(f"profiling_time must be in [0, t_max={window}], got {profiling_time}")
    units = np.zeros(a.shape[0], dtype=int)
    steps = 0
    while units.sum() < n_units:
        best = (0.0, 0, 0)  # (gain per unit, app, extra units)
        for app in range(a.shape[0]):
            args = (a[app, index], a_tilde[app, index], times[app, index])
            now = _app_value(*args, units[app], n_units, window, profiling_time)
            for extra in range(1, n_units - units.sum() + 1):
                gain = (_app_value(*args, units[app] + extra, n_units, window, profiling_time) - now) / extra
                if gain > best[0]:
                    best = (gain, app, extra)
        if best[0] <= 0:
            break
        units[best[1]] += best[2]
        steps += 1
    return _fixed_size_plan(index, units / n_units, a, a_tilde, times, window, profiling_time, steps)


def window_accuracy(schedule: Schedule, A, A_tilde, T, s, t_max) -> np.ndarray:
    """Per-app accuracy averaged over the window: (A * busy + Ã * (t_max - busy)) / t_max.

    ``busy = start_time + T_{i,j_i} / lambda_i`` uses the schedule's own shares (so all
    schedulers are compared on equal terms). An app that does not retrain, or would finish after
    t_max (an infeasible plan), serves A_{i,j_i} over the whole window. ``s`` is only
    shape-checked (the shares come from the schedule).

    Returns
    -------
    np.ndarray
        (n,) window-averaged accuracy of each app; ``t_max * sum`` is the plan's eq. 8 value.
    """
    a, a_tilde, times, _, window = _check_problem(A, A_tilde, T, s, t_max)
    picked = _check_choice(np.asarray(schedule.choice, dtype=int), *a.shape)
    lam = np.asarray(schedule.shares, dtype=float)
    if lam.shape != (a.shape[0],):
        raise ValueError(f"schedule has {lam.shape} shares for {a.shape[0]} apps")
    rows = np.arange(a.shape[0])
    with np.errstate(divide="ignore"):
        busy = schedule.start_time + np.where(lam > 0, times[rows, picked] / np.where(lam > 0, lam, 1.0), np.inf)
    finishes = np.asarray(schedule.retrains, dtype=bool) & (busy <= window * (1 + FEASIBILITY_RTOL))
    busy = np.where(finishes, busy, window)
    return _window_value(a[rows, picked], a_tilde[rows, picked], busy, window) / window
