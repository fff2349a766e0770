"""ECLM 4.3 module ability-enhancing pieces against hand-worked values."""

import itertools
import math

import numpy as np
import pytest
import torch

from models.eclm.ability import (
    ability_loss,
    balanced_kappa1,
    cooccurrence_matrix,
    define_subtasks,
    fixed_subtasks,
    load_matrix,
    solve_mask,
    subtask_of_class,
    target_gates,
)

# Devices 0-1 hold {0, 1}, devices 2-3 hold {2, 3}, device 4 bridges {1, 2}; class 4 is never seen.
DEVICES = [{0, 1}, {0, 1}, {2, 3}, {2, 3}, {1, 2}]
H_HAND = np.array([[0.5, 0.4, 0.1], [0.45, 0.25, 0.3]])


def test_fixed_subtasks():
    assert fixed_subtasks(5, 2) == [(0, 1), (2, 3), (4,)]
    assert fixed_subtasks(3, 5) == [(0, 1, 2)]
    with pytest.raises(ValueError, match="group_size"):
        fixed_subtasks(5, 0)


def test_cooccurrence_matrix_hand_built():
    counts = cooccurrence_matrix(DEVICES, 5)
    assert counts[0, 1] == counts[1, 0] == 2 and counts[1, 2] == 1 and counts[0, 2] == 0
    assert counts[1, 1] == 3 and counts[4].sum() == 0
    with pytest.raises(ValueError, match="device 1"):
        cooccurrence_matrix([{0}, {0, 7}], 5)


def test_define_subtasks_merges_most_cooccurring_classes():
    # pairs (0,1) and (2,3) co-occur on 2 devices each -> merged; 4 never co-occurs -> alone
    assert define_subtasks(DEVICES, 5, group_size=2) == [(0, 1), (2, 3), (4,)]
    # with room for 4: {0,1} and {2,3} link through device 4 (average 1/4 > 0) -> one group
    assert define_subtasks(DEVICES, 5, group_size=4) == [(0, 1, 2, 3), (4,)]
    assert define_subtasks(DEVICES, 5, group_size=1) == [(0,), (1,), (2,), (3,), (4,)]
    # per-sample label arrays work too (duplicates ignored)
    labels = [np.array([0, 0, 1, 1, 1]), np.array([1, 0]), np.array([2, 3, 3]), np.array([3, 2]), np.array([1, 2])]
    assert define_subtasks(labels, 5, group_size=2) == [(0, 1), (2, 3), (4,)]


def test_define_subtasks_tie_goes_to_smallest_classes():
    # (0,1), (1,2), (2,3) each co-occur once: merge (0,1) first, then (2,3)
    assert define_subtasks([{0, 1}, {1, 2}, {2, 3}], 4, group_size=2) == [(0, 1), (2, 3)]


def test_subtask_of_class():
    assert subtask_of_class([(0, 1), (2, 3), (4,)], 5).tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match="class 1"):
        subtask_of_class([(0, 1), (1, 2)], 3)
    with pytest.raises(ValueError, match=r"\[2\]"):
        subtask_of_class([(0, 1)], 3)


def test_load_matrix_counts_routed_samples_hand_computed():
    # top-2 gates: a sample counts once for every module it is routed to, whatever the gate value
    gates = np.array([[0.9, 0.1, 0.0], [0.0, 0.6, 0.4], [0.0, 0.3, 0.7]])
    owner = np.array([0, 0, 1])
    H = load_matrix(gates, owner, 2)
    np.testing.assert_allclose(H, [[0.25, 0.5, 0.25], [0.0, 0.5, 0.5]])  # row 0: [1, 2, 1] / 4
    np.testing.assert_allclose(load_matrix(torch.tensor(gates), torch.tensor(owner), 2), H)
    np.testing.assert_allclose(load_matrix(gates > 0, owner, 2), H)  # a boolean routing mask works too
    with pytest.raises(ValueError, match=r"sub-tasks \[2\]"):
        load_matrix(gates, owner, 3)
    with pytest.raises(ValueError, match="subtask_of_sample"):
        load_matrix(gates, np.array([0, 0, 5]), 2)
    with pytest.raises(ValueError, match=">= 0"):
        load_matrix(-gates, owner, 2)
    with pytest.raises(ValueError, match=r"routing \(S, N\)"):
        load_matrix(gates[0], owner, 2)


def test_solve_mask_hand_worked_2x3():
    # kappa1 = kappa2 = 1: one module per sub-task, one sub-task per module. Options:
    # t0-m0 + t1-m2 = 0.8, t0-m1 + t1-m0 = 0.85 (best), t0-m0 + t1-m1 = 0.75, ...
    # Greedy on the largest entry (t0-m0 = 0.5) would reach only 0.8.
    M = solve_mask(H_HAND, kappa1=1, kappa2=1)
    np.testing.assert_array_equal(M, [[0, 1, 0], [1, 0, 0]])
    # kappa1 = 1, kappa2 = 2: every module to its preferred sub-task, row 0 takes m0 + m1
    np.testing.assert_array_equal(solve_mask(H_HAND, kappa1=1, kappa2=2), [[1, 1, 0], [0, 0, 1]])


def _best_binary_mask_value(H, kappa1, kappa2):
    T, N = H.shape
    best = -np.inf
    for bits in itertools.product([0, 1], repeat=T * N):
        M = np.array(bits, float).reshape(T, N)
        if (M.sum(axis=0) <= kappa1).all() and (M.sum(axis=1) <= kappa2).all():
            best = max(best, float((H * M).sum()))
    return best


def test_solve_mask_respects_kappas_and_is_a_binary_optimum_on_random_h():
    rng = np.random.default_rng([43, 2])
    for _ in range(12):
        T, N = int(rng.integers(2, 4)), 3
        H = rng.random((T, N))
        H /= H.sum(axis=1, keepdims=True)
        kappa1, kappa2 = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        if kappa1 * N < T:
            continue
        M = solve_mask(H, kappa1, kappa2)
        assert set(np.unique(M)) <= {0.0, 1.0}  # totally unimodular: a true mask
        assert (M.sum(axis=0) <= kappa1).all() and (M.sum(axis=1) <= kappa2).all()
        assert (H * M).sum() == pytest.approx(_best_binary_mask_value(H, kappa1, kappa2), abs=1e-9)
    H = rng.random((10, 16))
    M = solve_mask(H / H.sum(axis=1, keepdims=True), kappa1=1.5, kappa2=2)
    assert (M.sum(axis=0) <= 1.5 + 1e-9).all() and (M.sum(axis=1) <= 2 + 1e-9).all()


def test_balanced_kappa1_default():
    assert balanced_kappa1(10, 16, 2) == 2  # ceil(20 / 16)
    assert balanced_kappa1(3, 16, 2) == 1
    M = solve_mask(np.full((10, 16), 1 / 16), kappa2=2)  # kappa1 = None -> balanced = 2
    assert M.sum(axis=0).max() <= 2 and (M.sum(axis=1) == 2).all()


@pytest.mark.parametrize(
    "H, kappa1, kappa2, match",
    [
        (H_HAND, 0.0, 1, "kappa1"),
        (H_HAND, 1, 0, "kappa2"),
        (np.ones((4, 3)), 1, 1, "kappa1 \\* N = 3 < T = 4"),
        (-H_HAND, 1, 1, "H must"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), 1, 1, r"rows \[1\]"),
    ],
)
def test_solve_mask_bad_input(H, kappa1, kappa2, match):
    with pytest.raises(ValueError, match=match):
        solve_mask(H, kappa1, kappa2)


def test_target_gates_hand_computed_and_fallback():
    P = target_gates(H_HAND, [[1, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(P, [[5 / 9, 4 / 9, 0], [0, 0, 1]])
    # row 0's mask only keeps a module with H = 0 -> uniform over its top-2 H entries
    P = target_gates(np.array([[0.6, 0.4, 0.0], [0.2, 0.3, 0.5]]), [[0, 0, 1], [0, 1, 1]], kappa2=2)
    np.testing.assert_allclose(P, [[0.5, 0.5, 0.0], [0.0, 0.375, 0.625]])
    rng = np.random.default_rng([7])
    H = rng.random((5, 8))
    np.testing.assert_allclose(target_gates(H, solve_mask(H, 2, 2)).sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="M must"):
        target_gates(H_HAND, np.ones((3, 3)))


def test_ability_loss_hand_computed():
    logits, labels = torch.zeros(1, 2), torch.tensor([0])  # CE = ln 2
    gates = [torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])]
    targets = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.25, 0.75]])]
    # layer 0: KL(target || gates) = 1 * ln(1 / 0.5) = ln 2 (finite though target is 0 on m1);
    # layer 1: 0; averaged over layers: ln 2 / 2
    loss = ability_loss(logits, labels, gates, targets, lam=0.5)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * math.log(2) / 2)
    assert ability_loss(logits, labels, gates, targets, lam=0.0).item() == pytest.approx(math.log(2))


def test_ability_loss_is_safe_and_differentiable_at_zero_gates():
    logits = torch.zeros(1, 2, requires_grad=True)
    raw = torch.tensor([[0.0, -200.0]], requires_grad=True)  # softmax underflows to exactly 0
    gates = torch.softmax(raw, dim=1)
    assert gates[0, 1].item() == 0.0
    loss = ability_loss(logits, torch.tensor([1]), [gates], [torch.tensor([[0.5, 0.5]])], lam=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(raw.grad).all()


def test_ability_loss_bad_input():
    logits, labels = torch.zeros(2, 3), torch.tensor([0, 1])
    gate = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="one target per layer"):
        ability_loss(logits, labels, [gate, gate], [gate])
    with pytest.raises(ValueError, match="layer 0"):
        ability_loss(logits, labels, [gate], [torch.full((2, 3), 1 / 3)])
    with pytest.raises(ValueError, match="lam"):
        ability_loss(logits, labels, [gate], [gate], lam=-1.0)
