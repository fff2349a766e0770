"""The shared prediction losses: entropy in both evaluations, Tent's mean entropy, SHOT's IM (values by hand)."""

import math

import pytest
import torch

from models.losses import (
    check_logits,
    entropy_loss,
    entropy_of_probabilities,
    information_maximisation,
    prediction_entropy,
)

LN2 = math.log(2)


def _uniform_over(k, c=4):
    """A logit row uniform over the first k of c classes, -inf elsewhere (entropy ln k)."""
    return [0.0] * k + [-math.inf] * (c - k)


@pytest.mark.parametrize("log_space", [False, True])
def test_entropy_of_uniform_is_ln_c_and_of_one_hot_is_zero(log_space):
    logits = torch.tensor([[0.0] * 5, [3.0] * 5, [100.0, -100.0, -100.0, -100.0, -100.0]])
    expected = torch.tensor([math.log(5), math.log(5), 0.0])
    assert torch.allclose(prediction_entropy(logits, log_space=log_space), expected, atol=1e-6)


def test_entropy_of_a_two_class_row_by_hand():
    # softmax(0, ln 3) = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623
    logits = torch.tensor([[0.0, math.log(3)]], dtype=torch.float64)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    for log_space in (False, True):
        assert prediction_entropy(logits, log_space=log_space).item() == pytest.approx(h, abs=1e-12)


def test_log_space_entropy_with_minus_inf_logits_has_finite_value_and_gradient():
    logits = torch.tensor([_uniform_over(2), _uniform_over(3)], requires_grad=True)
    ents = prediction_entropy(logits, log_space=True)
    ents.sum().backward()
    assert torch.allclose(ents, torch.tensor([LN2, math.log(3)]))
    assert torch.isfinite(logits.grad).all()


def test_softmax_entropy_with_minus_inf_logits_is_nan():
    # the reason CEMA's masked logits need log_space=True: 0 * -inf
    assert torch.isnan(prediction_entropy(torch.tensor([_uniform_over(2)]))).all()


def test_the_two_evaluations_agree_to_rounding_but_keep_their_own_bits():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    plain = prediction_entropy(logits)
    logged = prediction_entropy(logits, log_space=True)
    assert torch.allclose(plain, logged, atol=1e-5)
    assert torch.equal(plain, -(logits.softmax(1) * logits.log_softmax(1)).sum(1))
    log_p = logits.log_softmax(1)
    assert torch.equal(logged, -(log_p.exp() * log_p).sum(1))


def test_entropy_of_an_empty_batch_is_empty():
    assert prediction_entropy(torch.zeros(0, 3)).shape == (0,)


def test_entropy_rejects_non_matrix():
    with pytest.raises(ValueError, match="batch, classes"):
        prediction_entropy(torch.zeros(4))


def test_entropy_of_probabilities_takes_zero_log_zero_as_zero():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(entropy_of_probabilities(p), torch.tensor([LN2, 0.0]))


def test_entropy_loss_is_the_mean_row_entropy():
    logits = torch.tensor([[0.0, 0.0], [100.0, -100.0]])
    assert entropy_loss(logits).item() == pytest.approx(LN2 / 2, abs=1e-6)


def test_information_maximisation_by_hand():
    # rows (1/2, 1/2) and (1/4, 3/4): mean entropy (ln 2 + 0.5623) / 2; mean prediction (3/8, 5/8)
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]], dtype=torch.float64)
    mean_entropy = (LN2 - (0.25 * math.log(0.25) + 0.75 * math.log(0.75))) / 2
    diversity = -(0.375 * math.log(0.375) + 0.625 * math.log(0.625))
    assert information_maximisation(logits).item() == pytest.approx(mean_entropy - diversity, abs=1e-12)


def test_information_maximisation_reaches_minus_ln_c_on_confident_balanced_predictions():
    logits = torch.tensor([[50.0, 0.0], [0.0, 50.0]])
    assert information_maximisation(logits).item() == pytest.approx(-LN2, abs=1e-6)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(0, 3), torch.zeros(3, 1), "logits"])
def test_batch_losses_need_a_non_empty_matrix_of_at_least_two_classes(bad):
    for check in (check_logits, entropy_loss, information_maximisation):
        with pytest.raises(ValueError, match="N>=1, C>=2"):
            check(bad)
