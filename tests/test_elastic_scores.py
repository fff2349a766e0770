"""ElasticDNN filter scores: conv-BN pairing, BN-gradient scores, top-mass selection (III-B)."""

import copy

import pytest
import torch
from torch import nn

from models.elastic.retrain import retrain_selected
from models.elastic.scores import conv_bn_pairs, filter_scores, top_mass_filters
from models.losses import entropy_loss, information_maximisation
from tests.test_elastic_retrain import RES_CONVS, PlainNet, TinyResNet, make, shifted_batch

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- conv-BN pairs
def test_conv_bn_pairs_follow_registration_order_in_a_residual_net():
    model = make(TinyResNet)
    pairs = conv_bn_pairs(model)
    assert [name for name, _, _ in pairs] == RES_CONVS
    assert pairs[-1][2] is model.block2.shortcut[1]
    assert all(bn.num_features == conv.out_channels for _, conv, bn in pairs)


@pytest.mark.parametrize("model, fragment", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), "'0'"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)), "5 channels"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)), "'2'"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), "affine=False"),
    (nn.Sequential(nn.Linear(3, 4)), "no Conv2d"),
])
def test_conv_without_bn_raises(model, fragment):
    with pytest.raises(ValueError, match=fragment):
        conv_bn_pairs(model)
    with pytest.raises(ValueError):
        retrain_selected(model, torch.randn(4, 3, 5, 5), masks={})


# ----------------------------------------------------------------------------- filter scores
def test_filter_scores_equal_independent_bn_gradients():
    model, x = make(TinyResNet), shifted_batch(16)
    reference = copy.deepcopy(model)
    reference.eval()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()
    information_maximisation(reference(x)).backward()
    scores = filter_scores(model, x, "im")
    assert list(scores) == RES_CONVS
    for (name, _, bn) in conv_bn_pairs(reference):
        expected = bn.weight.grad.abs() + bn.bias.grad.abs()
        assert torch.allclose(scores[name], expected, rtol=1e-5, atol=1e-9), name
        assert (scores[name] > 0).all()


def test_filter_scores_leave_the_model_as_it_was():
    model, x = make(PlainNet), shifted_batch(8)
    model.train()
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = filter_scores(model, x, entropy_loss)  # a callable of the logits works too
    assert set(scores) == {"conv1", "conv2"} and scores["conv2"].shape == (5,)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # parameters, running stats, counters
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "fc.weight")
    assert not model.conv1.weight.requires_grad and model.bn1.weight.requires_grad
    assert model.training and model.bn1.training


# ----------------------------------------------------------------------------- top-mass selection
def test_top_mass_hand_built():
    got = top_mass_filters({"a": torch.tensor([5.0, 3.0, 1.0, 1.0])}, 0.8)  # 5 + 3 = 8/10
    assert got["a"].tolist() == [True, True, False, False]
    got = top_mass_filters({"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([3.0, 5.0])}, 0.8)
    assert got["a"].tolist() == [False, False] and got["b"].tolist() == [True, True]
    got = top_mass_filters({"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([3.0, 5.0])}, 0.81)
    assert got["a"].tolist() == [True, False] and got["b"].tolist() == [True, True]


def test_top_mass_ties_break_by_layer_then_index():
    scores = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([2.0, 1.0])}  # total 6
    got = top_mass_filters(scores, 0.3)  # needs 1.8: one 2 suffices, a's comes first
    assert got["a"].tolist() == [False, True] and got["b"].tolist() == [False, False]
    got = top_mass_filters(scores, 0.5)  # needs 3: both 2s
    assert got["a"].tolist() == [False, True] and got["b"].tolist() == [True, False]
    got = top_mass_filters(scores, 0.7)  # needs 4.2: both 2s, then a[0] before b[1]
    assert got["a"].tolist() == [True, True] and got["b"].tolist() == [True, False]


def test_full_mass_selects_exactly_the_nonzero_filters():
    got = top_mass_filters({"a": torch.tensor([5.0, 0.0, 3.0]), "b": torch.tensor([0.0, 1e-30])},
                           1.0)
    assert got["a"].tolist() == [True, False, True] and got["b"].tolist() == [False, True]


@pytest.mark.parametrize("mass", [0.0, -0.1, 1.5, float("nan")])
def test_mass_outside_unit_interval_raises(mass):
    with pytest.raises(ValueError, match="mass"):
        top_mass_filters({"a": torch.tensor([1.0])}, mass)


@pytest.mark.parametrize("scores", [
    {}, {"a": torch.tensor([1.0, -1.0])}, {"a": torch.tensor([0.0, 0.0])},
    {"a": torch.tensor([[1.0]])}, {"a": torch.tensor([float("inf")])},
])
def test_bad_scores_raise(scores):
    with pytest.raises(ValueError):
        top_mass_filters(scores)
