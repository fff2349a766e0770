"""ECLM 4.3 module ability-enhancing training on a hand-worked example (there is no official ECLM code).

The paper (section 4.3, Fig. 5), step by step, on one module layer of N = 4 modules, top-2
routing, T = 3 sub-tasks:

(1) ``h_tn`` is "the normalized total load for module n from all the data samples in sub-task
t", a module's load being "the amount of data samples routed to" it. Ten samples are routed:

==========  ====================================  =====================  ==================
sub-task    samples routed to (top-2)              load on m0 m1 m2 m3    H row (/ k |t|)
==========  ====================================  =====================  ==================
0           {m0, m1} x3, {m0, m2} x1               4  3  1  0             .5 .375 .125 0
1           {m1, m2} x2, {m1, m3} x1               0  3  2  1             0 1/2 1/3 1/6
2           {m2, m3} x2, {m0, m3} x2               2  0  2  4             .25 0 .25 .5
==========  ====================================  =====================  ==================

The routed gate values (0.9 on the first module, 0.1 on the second) do not enter H: it counts
samples. (Summing gate values instead would give row 0 = [3.6, .3, .1, 0] / 4 = [.9, .075, .025, 0]
-- not the paper's load.)

(2) The mask LP ``max sum(H * M)`` s.t. at most kappa1 sub-tasks per module and kappa2 modules
per sub-task. With kappa1 = 1, kappa2 = 2 every module goes to one sub-task, best to the one
that loads it most: m0 -> t0 (.5 > .25), m1 -> t1 (.5 > .375), m2 -> t1 (1/3 > .25 > .125),
m3 -> t2 (.5 > 1/6); t1 then has 2 modules (allowed). Objective .5 + .5 + 1/3 + .5 = 11/6.
With kappa1 = kappa2 = 1 (one module each): t0-m0, t1-m1, t2-m3 = 1.5; the runner-up
t0-m0, t1-m2, t2-m3 = 4/3.

(3) ``g_label`` = rows of P = H * M normalised (kappa1 = 1, kappa2 = 2):
t0 [1, 0, 0, 0]; t1 [0, .5, 1/3, 0] / (5/6) = [0, .6, .4, 0]; t2 [0, 0, 0, 1].

Fine-tuning loss ``CE + lambda * KL(g, g_label)``: a sample of t1 with gates g = [.1, .5, .3, .1]
and class logits [0, ln 3] of label 1 (p = [1/4, 3/4]): CE = ln(4/3), KL(g_label || g) =
.6 ln(.6/.5) + .4 ln(.4/.3) = .6 ln 1.2 + .4 ln(4/3). A sample of t0 with g = [.5, .25, .25, 0],
logits [ln 3, 0], label 0: CE = ln(4/3), KL = 1 * ln(1 / .5) = ln 2. The batch loss with
lambda = .5 is ln(4/3) + .5 * (.6 ln 1.2 + .4 ln(4/3) + ln 2) / 2.
"""

import itertools
import math

import numpy as np
import torch

from models.eclm.ability import ability_loss, load_matrix, solve_mask, target_gates
from tests.golden.fixture import COMPARISONS, Comparison, assert_close

JUDGE = "hand-worked example (ECLM 4.3, Fig. 5)"
#: float64 for H, M and g_label; float32 for the loss.
TOLERANCE, LOSS_TOLERANCE = 1e-12, 1e-6
#: (sub-task, the two modules the sample is routed to, first one gets 0.9), per sample.
ROUTED = [(0, (0, 1))] * 3 + [(0, (0, 2))] + [(1, (1, 2))] * 2 + [(1, (1, 3))] + [(2, (2, 3))] * 2 + [(2, (0, 3))] * 2
H_HAND = np.array([[0.5, 0.375, 0.125, 0.0], [0.0, 1 / 2, 1 / 3, 1 / 6], [0.25, 0.0, 0.25, 0.5]])
M_HAND = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=float)  # kappa1 = 1, kappa2 = 2
G_LABEL_HAND = np.array([[1.0, 0, 0, 0], [0, 0.6, 0.4, 0], [0, 0, 0, 1.0]])


def routing_gates() -> tuple[np.ndarray, np.ndarray]:
    """(10, 4) top-2 gates (0.9 / 0.1) and the (10,) sub-task of each sample."""
    gates = np.zeros((len(ROUTED), 4))
    for row, (_, (first, second)) in enumerate(ROUTED):
        gates[row, first], gates[row, second] = 0.9, 0.1
    return gates, np.array([t for t, _ in ROUTED])


def _record(name: str, what: str, diff: float, tolerance: float) -> None:
    COMPARISONS.append(Comparison(f"eclm-ability-{name}", JUDGE, what, diff, tolerance))


def test_load_matrix_counts_routed_samples():
    gates, owner = routing_gates()
    H = load_matrix(gates, owner, 3)
    diff = assert_close(H, H_HAND, TOLERANCE, "H")
    _record("H", "load matrix H (routed-sample counts, row-normalised)", diff, TOLERANCE)


def _brute_force_mask(H, kappa1, kappa2):
    """Best 0/1 mask by exhaustive search over all 2^(T N) masks; (value, mask, number of optima)."""
    T, N = H.shape
    best, best_mask, ties = -np.inf, None, 0
    for bits in itertools.product([0.0, 1.0], repeat=T * N):
        M = np.array(bits).reshape(T, N)
        if (M.sum(axis=0) <= kappa1).all() and (M.sum(axis=1) <= kappa2).all():
            value = float((H * M).sum())
            if value > best + 1e-12:
                best, best_mask, ties = value, M, 1
            elif abs(value - best) <= 1e-12:
                ties += 1
    return best, best_mask, ties


def test_mask_lp_matches_the_hand_optimum_and_exhaustive_search():
    M = solve_mask(H_HAND, kappa1=1, kappa2=2)
    _record("M", "mask LP optimum, kappa1=1 kappa2=2", assert_close(M, M_HAND, 0.0, "M"), 0.0)
    assert abs(float((H_HAND * M).sum()) - 11 / 6) <= TOLERANCE
    one_each = solve_mask(H_HAND, kappa1=1, kappa2=1)
    np.testing.assert_array_equal(one_each, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    worst = 0.0
    for kappa1, kappa2 in itertools.product((1, 2, 3), (1, 2, 3)):
        best, best_mask, ties = _brute_force_mask(H_HAND, kappa1, kappa2)
        M = solve_mask(H_HAND, kappa1=kappa1, kappa2=kappa2)
        assert set(np.unique(M)) <= {0.0, 1.0}
        assert (M.sum(axis=0) <= kappa1).all() and (M.sum(axis=1) <= kappa2).all()
        worst = max(worst, abs(float((H_HAND * M).sum()) - best))
        if ties == 1:
            np.testing.assert_array_equal(M, best_mask)
    assert worst <= TOLERANCE
    _record("M-search", "mask LP objective vs all 0/1 masks, kappa1, kappa2 in 1..3", worst, TOLERANCE)


def test_target_gates_normalise_the_masked_rows():
    diff = assert_close(target_gates(H_HAND, M_HAND, kappa2=2), G_LABEL_HAND, TOLERANCE, "g_label")
    _record("g_label", "g_label = rows of H * M normalised", diff, TOLERANCE)


def test_fine_tuning_loss_is_ce_plus_lambda_kl():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    labels = torch.tensor([1, 0])
    gates = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.5, 0.25, 0.25, 0.0]])
    target = torch.as_tensor(G_LABEL_HAND[[1, 0]], dtype=torch.float32)
    kl = (0.6 * math.log(1.2) + 0.4 * math.log(4 / 3) + math.log(2.0)) / 2
    expected = math.log(4 / 3) + 0.5 * kl
    loss = ability_loss(logits, labels, [gates], [target], lam=0.5)
    diff = assert_close(loss.item(), expected, LOSS_TOLERANCE, "CE + lambda KL")
    assert_close(ability_loss(logits, labels, [gates], [target], lam=0.0).item(), math.log(4 / 3), LOSS_TOLERANCE, "CE")
    _record("loss", "fine-tuning loss CE + lambda * KL(g_label || g)", diff, LOSS_TOLERANCE)
