"""Noisy top-k gating, load balancing and the unified selector (models/eclm/selector.py)."""

import math

import pytest
import torch

from models.eclm.selector import (
    NOISE_EPSILON,
    UnifiedSelector,
    cv_squared,
    load_balance_loss,
    noisy_top_k,
)

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_logits(batch=64, n=8, seed=0):
    g = _gen(seed)
    return torch.randn(batch, n, generator=g), torch.randn(batch, n, generator=g)


# ----------------------------------------------------------------------------- noisy top-k
@pytest.mark.parametrize("training", [True, False])
def test_exactly_k_nonzero_gates_rows_sum_to_one(training):
    logits, noise = _random_logits()
    gates, load, importance = noisy_top_k(logits, noise, 3, training, generator=_gen(1))
    assert ((gates != 0).sum(1) == 3).all()
    assert torch.allclose(gates.sum(1), torch.ones(64))
    assert (gates >= 0).all()
    assert torch.allclose(importance, gates.sum(0))
    assert load.shape == (8,)


def test_eval_gates_are_softmax_over_top_k_by_hand():
    # logits 1, 3, 2, 0 with k=2: modules 1 and 2 win; softmax(3, 2) = (e/(e+1), 1/(e+1)).
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    gates, load, importance = noisy_top_k(logits, None, 2, training=False)
    e = math.e
    assert torch.allclose(gates, torch.tensor([[0.0, e / (e + 1), 1 / (e + 1), 0.0]]))
    assert torch.equal(load, torch.tensor([0.0, 1.0, 1.0, 0.0]))  # eval: plain counts
    assert torch.allclose(importance, gates[0])


def test_inactive_modules_never_selected_even_with_largest_logits():
    logits, noise = _random_logits()
    logits[:, :3] += 100.0  # the inactive modules would win every time
    active = torch.tensor([False, False, False, True, True, True, True, True])
    for training in (True, False):
        gates, load, importance = noisy_top_k(logits, noise, 2, training, active, generator=_gen(2))
        assert (gates[:, :3] == 0).all()
        assert (load[:3] == 0).all() and (importance[:3] == 0).all()
        assert ((gates != 0).sum(1) == 2).all()


def test_k_larger_than_active_uses_every_active_module():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    active = torch.tensor([True, False, True])
    gates, load, _ = noisy_top_k(logits, torch.zeros_like(logits), 4, True, active, generator=_gen(0))
    assert ((gates != 0).sum(1) == 2).all() and (gates[:, 1] == 0).all()
    assert torch.equal(load, torch.tensor([2.0, 0.0, 2.0]))  # every active module takes both samples


def test_training_noise_is_deterministic_per_generator_seed():
    logits = torch.zeros(32, 6)  # only the noise decides
    noise = torch.zeros(32, 6)
    a, _, _ = noisy_top_k(logits, noise, 2, True, generator=_gen(7))
    b, _, _ = noisy_top_k(logits, noise, 2, True, generator=_gen(7))
    c, _, _ = noisy_top_k(logits, noise, 2, True, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eval_ignores_noise():
    logits, noise = _random_logits()
    a, _, _ = noisy_top_k(logits, noise, 2, False, generator=_gen(1))
    b, _, _ = noisy_top_k(logits, noise * 50, 2, False, generator=_gen(2))
    assert torch.equal(a, b)


def test_smooth_load_matches_hard_routing_when_noise_is_tiny():
    # noise std = softplus(-50) + eps ~ 0.01; logits 2 vs 0 with k=1: module 0 surely wins,
    # so P(in top-1) is 1 for module 0 and 0 for module 1 on every sample.
    logits = torch.tensor([[2.0, 0.0]]).repeat(5, 1)
    noise = torch.full((5, 2), -50.0)
    _, load, _ = noisy_top_k(logits, noise, 1, True, generator=_gen(0))
    assert torch.allclose(load, torch.tensor([5.0, 0.0]), atol=1e-4)


def test_smooth_load_of_tied_modules_is_half_the_batch_each():
    # Equal clean logits, k=1 of 2: each module is in the top-1 with probability 1/2.
    logits = torch.zeros(4000, 2, requires_grad=True)
    noise = torch.zeros(4000, 2, requires_grad=True)  # std = softplus(0) + eps
    _, load, _ = noisy_top_k(logits, noise, 1, True, generator=_gen(3))
    assert torch.allclose(load, torch.tensor([2000.0, 2000.0]), rtol=0.03)
    load[0].backward()  # differentiable w.r.t. both the logits and the noise logits
    assert logits.grad.abs().sum() > 0 and noise.grad.abs().sum() > 0


def test_smooth_load_gradients_are_finite_with_inactive_modules():
    logits, noise = _random_logits(batch=16, n=6)
    logits.requires_grad_(True)
    noise.requires_grad_(True)
    active = torch.tensor([True, False, True, True, False, True])
    gates, load, importance = noisy_top_k(logits, noise, 2, True, active, generator=_gen(4))
    (load.sum() + importance.sum() + gates.sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(noise.grad).all()
    assert (logits.grad[:, ~active] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be >= 1"),
        (dict(active=torch.zeros(4, dtype=torch.bool)), "no module"),
        (dict(active=torch.ones(3, dtype=torch.bool)), "shape"),
        (dict(active=torch.ones(4)), "bool"),
    ],
)
def test_noisy_top_k_rejects_bad_input(kwargs, match):
    args = dict(logits=torch.zeros(2, 4), noise_logits=None, k=1, training=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        noisy_top_k(**args)


def test_noisy_top_k_rejects_1d_logits():
    with pytest.raises(ValueError, match="batch, modules"):
        noisy_top_k(torch.zeros(4), None, 1, False)


# ----------------------------------------------------------------------------- load balance
def test_load_balance_loss_hand_computed():
    w = 1e-2
    # Balanced: CV^2 = 0.
    assert load_balance_loss(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(0.0)
    # [2, 0]: mean 1, population variance 1 -> CV^2 = 1 for each term -> w * (1 + 1).
    loss = load_balance_loss(torch.tensor([2.0, 0.0]), torch.tensor([2.0, 0.0]))
    assert loss.item() == pytest.approx(w * 2.0)
    # importance [3, 1]: mean 2, var 1 -> 1/4; load [2, 2] -> 0; with w = 0.5 -> 0.125.
    loss = load_balance_loss(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0]), weight=0.5)
    assert loss.item() == pytest.approx(0.125)
    # three modules [0, 0, 3]: mean 1, var (1 + 1 + 4) / 3 = 2 -> CV^2 = 2.
    assert cv_squared(torch.tensor([0.0, 0.0, 3.0])).item() == pytest.approx(2.0)


def test_cv_squared_of_single_value_is_zero():
    assert cv_squared(torch.tensor([5.0])).item() == 0.0


def test_load_balance_loss_is_differentiable():
    importance = torch.tensor([3.0, 1.0], requires_grad=True)
    load_balance_loss(importance, torch.tensor([2.0, 2.0]), weight=1.0).backward()
    # d/dx of var/mean^2 at x=(3,1): mean 2, var 1; d var/dx_i = (x_i - mean) / 1 (n=2),
    # d mean/dx_i = 1/2 -> grad_i = (x_i - 2)/4 - 2 * 1 * (1/2) / 8 = (x_i - 2)/4 - 1/8.
    assert torch.allclose(importance.grad, torch.tensor([0.125, -0.375]))


@pytest.mark.parametrize(
    "importance, load, weight, match",
    [
        (torch.ones(2), torch.ones(3), 1e-2, "equal shape"),
        (torch.ones(2, 2), torch.ones(2, 2), 1e-2, "1-d"),
        (torch.ones(2), torch.ones(2), -1.0, "weight"),
    ],
)
def test_load_balance_loss_rejects_bad_input(importance, load, weight, match):
    with pytest.raises(ValueError, match=match):
        load_balance_loss(importance, load, weight)


# ----------------------------------------------------------------------------- selector
def test_unified_selector_one_head_per_layer():
    torch.manual_seed(0)
    selector = UnifiedSelector((3, 32, 32), [4, 7], embed_dim=8)
    x = torch.randn(5, 3, 32, 32)
    logits = selector(x)
    assert [tuple(t.shape) for t in logits] == [(5, 4), (5, 7)]
    clean, noise = selector.logits_and_noise(x)
    assert all(torch.equal(a, b) for a, b in zip(clean, logits))
    # Shazeer et al. 4: W_noise starts at zero -> std = softplus(0) + eps everywhere.
    assert all((n == 0).all() for n in noise)
    std = torch.nn.functional.softplus(noise[0]) + NOISE_EPSILON
    assert torch.allclose(std, torch.full_like(std, math.log(2) + NOISE_EPSILON))


def test_unified_selector_mlp_kind_takes_flattened_images():
    selector = UnifiedSelector((3, 32, 32), [16], embed_dim=8, kind="mlp")
    assert selector.embed[1].in_features == 3 * 32 * 32
    assert selector(torch.zeros(2, 3, 32, 32))[0].shape == (2, 16)


def test_unified_selector_rejects_unknown_kind():
    with pytest.raises(ValueError, match="selector kind 'rnn'"):
        UnifiedSelector((3, 32, 32), [4], kind="rnn")
