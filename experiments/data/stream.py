"""Per-device index bookkeeping: which pool rows a device holds at time slot t.

Everything here is indices only (no pixels), so replaying slots 1..t is cheap and device
data at slot t is a pure function of (config, seed, device, t).

A device k draws n_k ~ U{size_min..size_max} rows of its partition (ECLM section 7.1:
50-150), stratified over the partition's classes. At every slot t >= 1 a fraction of its
positions (ECLM 2.1: 20 %; 7.3: 50 %) is replaced by fresh draws from its partition.
A replacement keeps the label of the position it replaces, so the device's label mix
(and, under label skew, its exact set of m classes) never changes: the stream varies the
samples and their domain, not the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TAG_SIZE, _TAG_DRAW, _TAG_SLOT, _TAG_TEST = 21, 22, 23, 24  # stream tags for seeded generators


@dataclass(frozen=True)
class DevicePlan:
    """Which samples a device holds at one slot, as indices.

    Attributes
    ----------
    rows : np.ndarray
        Pool row of every training position, shape (n_k,).
    draws : np.ndarray
        Draw counter of every position (unique per device: 0..n_k-1 for the first
        draws, then counting on); it seeds the sample's augmentation.
    slots : np.ndarray
        Slot in which each position's sample was drawn (its domain's slot).
    """

    rows: np.ndarray
    draws: np.ndarray
    slots: np.ndarray


def device_size(seed: int, device: int, size_min: int, size_max: int) -> int:
    """Number of training samples of a device, uniform integer in [size_min, size_max]."""
    return int(np.random.default_rng([seed, _TAG_SIZE, device]).integers(size_min, size_max + 1))


def allocate(total: int, weights: np.ndarray, minimum: int = 1) -> np.ndarray:
    """Split ``total`` into integer counts proportional to ``weights`` (largest remainder).

    Every entry first gets ``minimum`` when ``total >= minimum * len(weights)``; the rest
    is shared in proportion to ``weights``, floors first, leftovers to the largest
    fractional parts (ties to the lower index). E.g. ``allocate(10, [1, 1, 2]) = [3, 3, 4]``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    base = minimum if total >= minimum * len(weights) else 0
    rest = total - base * len(weights)
    share = weights / weights.sum() * rest
    counts = np.floor(share).astype(np.int64)
    leftover = rest - int(counts.sum())
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:leftover]] += 1
    return counts + base


def rows_by_label(indices: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    """Group indices (a partition's pool rows, the test originals) by ``labels[index]``.

    Returns
    -------
    dict
        label -> the indices with that label, in their given order; present labels only.
    """
    present = labels[indices]
    return {int(c): indices[present == c] for c in np.unique(present)}


def first_draw(
    groups: dict[int, np.ndarray], size: int, seed: int, device: int
) -> DevicePlan:
    """Draw a device's slot-0 samples, stratified over its partition's classes.

    Class c gets ``allocate(size, class counts)[c]`` samples (at least one each when
    ``size`` allows), drawn without replacement unless the class has too few rows.
    """
    rng = np.random.default_rng([seed, _TAG_DRAW, device])
    counts = allocate(size, np.array([len(rows) for rows in groups.values()]))
    picks = [
        rng.choice(rows, size=count, replace=count > len(rows))
        for rows, count in zip(groups.values(), counts)
    ]
    rows = rng.permutation(np.concatenate(picks)).astype(np.int64)
    return DevicePlan(rows=rows, draws=np.arange(size), slots=np.zeros(size, dtype=np.int64))


def replaced_count(fraction: float, size: int) -> int:
    """Positions replaced per slot: ``round(fraction * size)``, halves rounded up."""
    return int(np.floor(fraction * size + 0.5))


def advance(
    plan: DevicePlan,
    groups: dict[int, np.ndarray],
    pool_labels: np.ndarray,
    fraction: float,
    seed: int,
    device: int,
    slot: int,
) -> DevicePlan:
    """Replace ``replaced_count(fraction, n)`` random positions with fresh same-label draws.

    A replacement is a partition row of the replaced sample's label that the device does
    not hold (any row of that label when too few are left). The new samples get the next
    draw counters and ``slot`` as their slot; all other positions are left as they are.
    """
    rng = np.random.default_rng([seed, _TAG_SLOT, device, slot])
    size = len(plan.rows)
    positions = np.sort(rng.choice(size, size=replaced_count(fraction, size), replace=False))
    rows, draws, slots = plan.rows.copy(), plan.draws.copy(), plan.slots.copy()
    labels = pool_labels[rows[positions]]
    for label in np.unique(labels):
        targets = positions[labels == label]
        fresh = np.setdiff1d(groups[int(label)], plan.rows)
        candidates = fresh if len(fresh) >= len(targets) else groups[int(label)]
        replace = len(candidates) < len(targets)
        rows[targets] = rng.choice(candidates, size=len(targets), replace=replace)
    draws[positions] = int(plan.draws.max()) + 1 + np.arange(len(positions))
    slots[positions] = slot
    return DevicePlan(rows=rows, draws=draws, slots=slots)


def plan_at(
    groups: dict[int, np.ndarray],
    pool_labels: np.ndarray,
    size: int,
    fraction: float,
    seed: int,
    device: int,
    slot: int,
) -> DevicePlan:
    """Replay a device's stream from slot 0 to ``slot`` (indices only)."""
    plan = first_draw(groups, size, seed, device)
    if fraction > 0:
        for t in range(1, slot + 1):
            plan = advance(plan, groups, pool_labels, fraction, seed, device, t)
    return plan


def pick_test_originals(
    train_labels: np.ndarray,
    test_by_label: dict[int, np.ndarray],
    test_size: int,
    seed: int,
    device: int,
) -> np.ndarray:
    """Pick a device's local test originals, with the label mix of its training data.

    Class c gets ``allocate(test_size, train counts)[c]`` samples, each a random TEST
    original of class c. Drawn once per device (from its slot-0 labels, which replacement
    preserves); each slot renders the same picks in that slot's domain.
    """
    rng = np.random.default_rng([seed, _TAG_TEST, device])
    classes, counts = np.unique(train_labels, return_counts=True)
    picks = [
        test_by_label[int(c)][rng.integers(len(test_by_label[int(c)]), size=n)]
        for c, n in zip(classes, allocate(test_size, counts))
    ]
    return rng.permutation(np.concatenate(picks)).astype(np.int64)


def slot_of_round(scenario, server_round: int) -> int:
    """Time slot of a round: slot 0 for rounds 1..``scenario.slot_rounds``, then one more per ``slot_rounds``."""
    return max(server_round - 1, 0) // scenario.slot_rounds
