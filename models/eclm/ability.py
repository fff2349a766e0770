"""ECLM module ability-enhancing training (section 4.3, Fig. 5): sub-tasks, H, the mask LP, loss.

Three steps, each a function here:

1. Define sub-tasks: groups of classes that co-occur on devices (:func:`define_subtasks`), or
   fixed consecutive groups (:func:`fixed_subtasks`).
2. Measure the sub-task -> module mapping ``H`` (T x N, one module layer; each row the
   sub-task's normalised total load, i.e. how many of its samples the top-k routing sends
   to each module, :func:`load_matrix`) and solve the linear program for the mask ``M``
   (:func:`solve_mask`); ``P = H * M`` row-normalised is the recommended routing
   ``g_label`` of each sub-task (:func:`target_gates`).
3. Fine-tune with ``CE + lambda * KL`` between selector gates and ``g_label``
   (:func:`ability_loss`).

A model with several module layers runs steps 2-3 once per layer. numpy/scipy for steps
1-2, torch for the loss; nothing of Flower or the project.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: Classes per sub-task. Assumption: ECLM 7.1 / Table 1 give CIFAR-10 devices m = 2 classes
#: (Data Partition 1), so classes co-occur in pairs.
DEFAULT_GROUP_SIZE = 2

#: kappa2, most modules one sub-task may activate. Assumption (paper gives no value): the
#: top-k of the modular models (k = 2, Shazeer et al. 2017), so a sub-task keeps exactly the
#: modules one sample is routed through.
DEFAULT_KAPPA2 = 2

#: kappa1 = None means "balanced": ceil(T * kappa2 / N), the tightest integer load that still
#: lets every sub-task take kappa2 modules. Assumption (paper gives no value): it spreads
#: sub-tasks evenly, ECLM 4.3's "prevent the overload of a given module".
DEFAULT_KAPPA1 = None

#: lambda, weight of the KL term in the fine-tuning loss. Assumption (paper gives no value):
#: 1.0, both CE and KL are in nats over distributions of similar size.
DEFAULT_LAMBDA = 1.0

#: Floor on gate probabilities inside log(): keeps KL finite when the selector gives a
#: module (numerically) zero probability. float32 resolves ~1e-38, so 1e-8 never binds
#: for an ordinary softmax output.
KL_EPS = 1e-8

#: Entries of an LP solution closer than this to 0 or 1 are snapped (simplex round-off).
SNAP_TOL = 1e-9


def fixed_subtasks(num_classes: int, group_size: int = DEFAULT_GROUP_SIZE) -> list[tuple[int, ...]]:
    """Consecutive class groups of ``group_size`` (the last may be smaller), ECLM 4.3 step 1.

    Example: ``fixed_subtasks(5, 2) == [(0, 1), (2, 3), (4,)]``.
    """
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(group_size, "group_size")
    return [tuple(range(s, min(s + group_size, num_classes))) for s in range(0, num_classes, group_size)]


def cooccurrence_matrix(device_classes: Sequence[Iterable[int]], num_classes: int) -> np.ndarray:
    """C[a, b] = number of devices holding both class a and class b (diagonal: holding a).

    ``device_classes[k]`` lists the classes (or simply all labels) of device k; duplicates
    are ignored.
    """
    _check_positive_int(num_classes, "num_classes")
    counts = np.zeros((num_classes, num_classes))
    for k, labels in enumerate(device_classes):
        present = sorted({int(c) for c in np.asarray(list(labels)).ravel()})
        if present and (present[0] < 0 or present[-1] >= num_classes):
            raise ValueError(f"device {k} has classes {present} outside [0, {num_classes}); fix num_classes")
        idx = np.array(present, dtype=int)
        counts[np.ix_(idx, idx)] += 1.0
    return counts


def define_subtasks(
    device_classes: Sequence[Iterable[int]],
    num_classes: int,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> list[tuple[int, ...]]:
    """Sub-tasks = groups of classes that usually appear together on a device (ECLM 4.3 step 1).

    Rule: greedy average-linkage agglomeration on the co-occurrence counts. Start from one
    group per class; repeatedly merge the two groups with the highest average number of
    devices holding a class of one and a class of the other, as long as that average is > 0
    and the merged group has at most ``group_size`` classes. Ties go to the pair with the
    smallest classes. Classes that never co-occur stay alone.

    Parameters
    ----------
    device_classes : Sequence[Iterable[int]]
        Per device, its classes (or its labels; duplicates ignored).
    num_classes : int
        Classes of the task; the result partitions ``range(num_classes)``.
    group_size : int
        Most classes per sub-task (default :data:`DEFAULT_GROUP_SIZE`).

    Returns
    -------
    list[tuple[int, ...]]
        Sub-tasks, each sorted, ordered by their smallest class.
    """
    _check_positive_int(group_size, "group_size")
    counts = cooccurrence_matrix(device_classes, num_classes)
    groups = [[c] for c in range(num_classes)]
    cross = counts.copy()  # cross[i, j] = summed co-occurrence between groups i and j
    while True:
        sizes = np.array([len(g) for g in groups], dtype=float)
        score = cross / np.outer(sizes, sizes)
        allowed = np.triu(np.add.outer(sizes, sizes) <= group_size, k=1)
        score = np.where(allowed, score, -np.inf)
        flat = int(np.argmax(score))  # first maximum in row-major order: the smallest pair
        i, j = divmod(flat, len(groups))
        if not score[i, j] > 0:
            break
        groups[i] += groups.pop(j)
        cross[i, :] += cross[j, :]
        cross[:, i] += cross[:, j]
        cross = np.delete(np.delete(cross, j, axis=0), j, axis=1)
    return [tuple(sorted(g)) for g in groups]


def subtask_of_class(subtasks: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """(num_classes,) index of the sub-task each class belongs to; the sub-tasks must partition the classes."""
    index = np.full(num_classes, -1, dtype=int)
    for t, group in enumerate(subtasks):
        for c in group:
            if not 0 <= c < num_classes or index[c] != -1:
                raise ValueError(f"class {c} is out of range or in two sub-tasks; sub-tasks must partition the classes")
            index[c] = t
    if (index < 0).any():
        raise ValueError(f"classes {np.flatnonzero(index < 0).tolist()} are in no sub-task; add them to one")
    return index


def load_matrix(routing, subtask_of_sample, num_subtasks: int) -> np.ndarray:
    """H (T x N): each sub-task's normalised total load over one layer's modules (ECLM 4.3 step 1).

    ECLM 4.3 calls a module's load "the amount of data samples routed to" it, and ``h_tn``
    "the normalized total load for module n from all the data samples in sub-task t",
    "the probability of mapping sub-task t to module n". So ``h_tn`` counts the samples of
    sub-task t whose routing includes module n (a nonzero top-k gate; Shazeer et al.'s
    "true load", ``_gates_to_load``), divided by the row's total, so each row sums to 1.
    With top-k routing that total is ``k * |t|``; normalising by ``|t|`` alone would scale
    every row by the same k and change neither the mask LP's optimum nor ``g_label``.

    Parameters
    ----------
    routing : np.ndarray or torch.Tensor
        (S, N) top-k gates of one module layer (a sample is routed to the modules with a
        nonzero gate) or a boolean routing mask. Gate values beyond "nonzero" do not count.
    subtask_of_sample : np.ndarray or torch.Tensor
        (S,) sub-task index of every sample, in ``[0, num_subtasks)``.
    num_subtasks : int
        T.

    Raises
    ------
    ValueError
        On mismatched shapes, negative gates, bad indices, or a sub-task none of whose
        samples is routed anywhere (no samples): give the cloud proxy data at least one
        sample per sub-task.
    """
    gates = _as_numpy(routing)
    owner = _as_numpy(subtask_of_sample).astype(int)
    _check_positive_int(num_subtasks, "num_subtasks")
    if gates.ndim != 2 or owner.shape != (gates.shape[0],):
        raise ValueError(f"need routing (S, N) and subtask_of_sample (S,), got {gates.shape} and {owner.shape}")
    if not np.isfinite(gates).all() or (gates < 0).any():
        raise ValueError("routing must be finite and >= 0 (top-k gates or a boolean routing mask)")
    if owner.size and (owner.min() < 0 or owner.max() >= num_subtasks):
        raise ValueError(f"subtask_of_sample must lie in [0, {num_subtasks}), got range [{owner.min()}, {owner.max()}]")
    load = np.zeros((num_subtasks, gates.shape[1]))
    np.add.at(load, owner, (gates > 0).astype(float))
    totals = load.sum(axis=1, keepdims=True)
    empty = np.flatnonzero(totals[:, 0] <= 0)
    if empty.size:
        raise ValueError(f"sub-tasks {empty.tolist()} route no sample (they have none); give each sub-task samples")
    return load / totals


def balanced_kappa1(num_subtasks: int, num_modules: int, kappa2: int = DEFAULT_KAPPA2) -> int:
    """ceil(T * kappa2 / N): the smallest integer module load that lets every sub-task take kappa2 modules."""
    return max(1, math.ceil(num_subtasks * min(kappa2, num_modules) / num_modules))


def solve_mask(H, kappa1: float | None = DEFAULT_KAPPA1, kappa2: int = DEFAULT_KAPPA2) -> np.ndarray:
    """The mask M of ECLM 4.3 step 2: the linear program

        max sum_tn H_tn M_tn
        s.t. sum_t M_tn <= kappa1   for every module n   (module load)
             sum_n M_tn <= kappa2   for every sub-task t (modules per sub-task)
             0 <= M_tn <= 1

    What "load" means: the paper's text for the LP is lost; it says the first constraint
    "prevent[s] the overload of a given module, that is the load should be less than
    kappa1", and the second, symmetric one counts modules per sub-task. We read the module
    load as the number of sub-tasks assigned to it (column sums of M), not the routed mass
    (column sums of H * M), because (i) the paper calls M a *mask*, and with both constraints
    counting entries the constraint matrix is that of a bipartite graph (totally unimodular),
    so for integer kappa1 the LP optimum found by simplex is exactly 0/1 -- a mask -- while a
    mass constraint would leave fractional entries; (ii) it matches the stated goal that a
    module "focus on" a few sub-tasks.

    Parameters
    ----------
    H : np.ndarray
        (T, N) non-negative mapping matrix with positive rows (from :func:`load_matrix`).
    kappa1 : float or None
        Largest module load; None -> :func:`balanced_kappa1` (T, N, kappa2).
    kappa2 : int
        Most modules per sub-task, >= 1 (values above N do not bind).

    Returns
    -------
    np.ndarray
        (T, N) mask in [0, 1]; 0/1 whenever kappa1 is an integer (HiGHS dual simplex
        returns a vertex).

    Raises
    ------
    ValueError
        On a bad H or kappa, or when kappa1 * N < T: the modules cannot give every
        sub-task even one module (raise kappa1 or merge sub-tasks).
    """
    H = _check_mapping(H, "H")
    T, N = H.shape
    _check_positive_int(kappa2, "kappa2")
    kappa1 = balanced_kappa1(T, N, kappa2) if kappa1 is None else kappa1
    if not np.isfinite(kappa1) or kappa1 <= 0:
        raise ValueError(f"kappa1 must be a finite number > 0 (largest sub-tasks per module), got {kappa1!r}")
    if kappa1 * N < T:
        raise ValueError(f"kappa1 * N = {kappa1 * N} < T = {T} sub-tasks: some sub-task gets no module; raise kappa1")
    from scipy.optimize import linprog  # 0.3-0.7 s: only runs that solve the mask pay it

    module_load = np.kron(np.ones((1, T)), np.eye(N))  # row n sums column n of M (row-major)
    per_subtask = np.kron(np.eye(T), np.ones((1, N)))  # row t sums row t of M
    result = linprog(
        -H.ravel(),
        A_ub=np.vstack([module_load, per_subtask]),
        b_ub=np.concatenate([np.full(N, float(kappa1)), np.full(T, float(kappa2))]),
        bounds=(0.0, 1.0),
        method="highs-ds",
    )
    if result.status != 0:
        raise RuntimeError(f"linprog did not solve the ECLM mask LP: {result.message}")
    mask = np.clip(result.x.reshape(T, N), 0.0, 1.0)
    mask[np.abs(mask) < SNAP_TOL] = 0.0
    mask[np.abs(mask - 1.0) < SNAP_TOL] = 1.0
    return mask


def target_gates(H, M, kappa2: int = DEFAULT_KAPPA2) -> np.ndarray:
    """g_label per sub-task: rows of P = H * M normalised to sum 1 (ECLM 4.3 step 3).

    A row with no mass (the mask kept only modules the sub-task never used) falls back to
    a uniform distribution over the sub-task's ``kappa2`` largest H entries (ties: lowest
    module index), i.e. its own end-to-end routing truncated to kappa2 modules.

    Returns
    -------
    np.ndarray
        (T, N), every row a probability vector.
    """
    H = _check_mapping(H, "H")
    M = np.asarray(M, dtype=float)
    if M.shape != H.shape or not np.isfinite(M).all() or (M < 0).any() or (M > 1).any():
        raise ValueError(f"M must be a (T, N) = {H.shape} matrix in [0, 1], got shape {M.shape}")
    _check_positive_int(kappa2, "kappa2")
    P = H * M
    for t in np.flatnonzero(P.sum(axis=1) <= 0):
        top = np.argsort(-H[t], kind="stable")[: min(kappa2, H.shape[1])]
        P[t, top] = 1.0
    return P / P.sum(axis=1, keepdims=True)


def ability_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gate_probs_per_layer: Sequence[torch.Tensor],
    target_per_layer: Sequence[torch.Tensor],
    lam: float = DEFAULT_LAMBDA,
) -> torch.Tensor:
    """ECLM 4.3 fine-tuning loss: CrossEntropy(y_hat, y) + lambda * KL(g_hat, g_label).

    KL direction: we compute KL(g_label || g_hat) = sum_n g_label,n * (log g_label,n -
    log g_hat,n), i.e. torch's ``F.kl_div(log g_hat, g_label)`` -- the paper's argument
    order KL(g_hat, g_label) is that call's (input, target) order. This reading treats
    g_label as the target (it is "an additional label") and stays finite when g_label is 0
    on masked modules; the literal KL(g_hat || g_label) would be infinite whenever the
    softmax selector gives a masked module any probability. Safe form: ``0 * log 0 = 0``
    (xlogy) and log g_hat is taken of ``max(g_hat, KL_EPS)``.

    Parameters
    ----------
    logits : Tensor
        (B, C) class logits.
    labels : Tensor
        (B,) class indices.
    gate_probs_per_layer : Sequence[Tensor]
        Per module layer, (B, N_l) selector probabilities (rows sum to 1), e.g.
        ``ModularNet.gate_probs(x)``.
    target_per_layer : Sequence[Tensor]
        Per module layer, (B, N_l) g_label of each sample (its sub-task's row of
        :func:`target_gates`).
    lam : float
        Weight of the KL term, >= 0.

    Returns
    -------
    Tensor
        Scalar: mean CE over the batch + lam * (KL summed over modules, averaged over the
        batch, then averaged over layers). The paper writes one KL between the unified
        selector's output and ``g_label`` without saying how layers combine; the mean
        over layers keeps lam's meaning independent of the number of module layers.
    """
    if len(gate_probs_per_layer) != len(target_per_layer) or not gate_probs_per_layer:
        raise ValueError(
            f"need one target per layer and at least one layer, got {len(gate_probs_per_layer)} gate and "
            f"{len(target_per_layer)} target tensors"
        )
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    kl_terms = []
    for layer, (gates, target) in enumerate(zip(gate_probs_per_layer, target_per_layer)):
        if gates.shape != target.shape or gates.ndim != 2 or gates.shape[0] != logits.shape[0]:
            raise ValueError(
                f"layer {layer}: gates {tuple(gates.shape)} and target {tuple(target.shape)} must both be (B, N) "
                f"with B = {logits.shape[0]}"
            )
        target = target.to(gates.dtype)
        per_sample = (torch.xlogy(target, target) - target * torch.log(gates.clamp_min(KL_EPS))).sum(dim=1)
        kl_terms.append(per_sample.mean())
    return F.cross_entropy(logits, labels) + lam * torch.stack(kl_terms).mean()


def _check_mapping(H, name: str) -> np.ndarray:
    """A (T, N) finite non-negative matrix whose rows all carry some mass."""
    H = np.asarray(H, dtype=float)
    if H.ndim != 2 or H.size == 0 or not np.isfinite(H).all() or (H < 0).any():
        raise ValueError(f"{name} must be a non-empty (T, N) matrix of finite values >= 0, got shape {H.shape}")
    zero_rows = np.flatnonzero(H.sum(axis=1) <= 0)
    if zero_rows.size:
        raise ValueError(f"{name} rows {zero_rows.tolist()} are all zero; every sub-task needs routing mass")
    return H


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=float)
