"""The shared BatchNorm utilities: layers, affine parameters, BN modes, forward swap, re-estimation."""

import pytest
import torch
from torch import nn

from models.batchnorm import (
    batch_norm_layers,
    bn_affine_parameters,
    bn_forward,
    reestimate_bn,
    train_only_bn_affine,
    use_test_batch_statistics,
)


def _tiny_net():
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.BatchNorm2d(2, affine=False))


def _samples(*values):
    """One channel, two equal pixels per sample: the batch statistics are those of ``values``."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).repeat(1, 1, 1, 2)


# --------------------------------------------------------------------------- layers and parameters
def test_batch_norm_layers_in_module_order():
    net = _tiny_net()
    assert batch_norm_layers(net) == [net[1], net[3]]
    assert batch_norm_layers(nn.Linear(2, 2)) == []


def test_bn_affine_parameters_are_the_affine_layers_weight_and_bias():
    net = _tiny_net()
    assert [id(p) for p in bn_affine_parameters(net)] == [id(net[1].weight), id(net[1].bias)]


@pytest.mark.parametrize("model", [nn.Linear(2, 2), nn.BatchNorm2d(2, affine=False)])
def test_bn_affine_parameters_refuse_a_model_without_affine_bn(model):
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        bn_affine_parameters(model)


def test_train_only_bn_affine_freezes_everything_else():
    net = _tiny_net()
    params = train_only_bn_affine(net)
    assert [id(p) for p in params] == [id(net[1].weight), id(net[1].bias)]
    assert [p.requires_grad for p in net.parameters()] == [False, False, True, True]


# --------------------------------------------------------------------------- BN modes
def test_use_test_batch_statistics_normalises_with_the_batch_and_keeps_running_statistics():
    net = _tiny_net()
    use_test_batch_statistics(net)
    assert [m.training for m in net] == [False, True, False, True]
    assert net[1].momentum == 0.0
    bn = nn.Sequential(nn.BatchNorm2d(1))
    use_test_batch_statistics(bn)
    y = bn(_samples(1.0, 3.0))  # batch mean 2, biased variance 1: outputs -1 and 1
    torch.testing.assert_close(y[:, 0, 0, 0], torch.tensor([-1.0, 1.0]), atol=1e-4, rtol=0)
    assert bn[0].running_mean.item() == 0.0 and bn[0].running_var.item() == 1.0


def test_bn_forward_swaps_every_bn_forward_and_restores_it_after_an_error():
    net = _tiny_net()
    calls = []

    def forward(layer, x):
        calls.append(layer)
        return x

    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(RuntimeError, match="inside"), bn_forward(net, forward):
        net.eval()(x)
        raise RuntimeError("inside")
    assert calls == [net[1], net[3]]
    assert "forward" not in vars(net[1]) and "forward" not in vars(net[3])


# --------------------------------------------------------------------------- re-estimation
def test_reestimate_in_one_pass_gives_the_data_statistics():
    bn = nn.Sequential(nn.BatchNorm2d(1))
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(4, 1, 1, 1)
    assert reestimate_bn(bn, x) is bn
    # one batch, momentum None: the running mean is the batch mean 3, the variance the unbiased 14/3
    assert bn[0].running_mean.item() == pytest.approx(3.0)
    assert bn[0].running_var.item() == pytest.approx(14.0 / 3.0)
    assert bn[0].momentum == 0.1 and not bn.training and int(bn[0].num_batches_tracked) == 1


@pytest.mark.parametrize("even, expected", [
    (False, (2.0 + 10.0) / 2),  # batches {0, 2, 4} and {10}: means 2 and 10
    (True, (1.0 + 7.0) / 2),    # ceil(4 / 3) = 2 equal batches {0, 2} and {4, 10}: means 1 and 7
])
def test_reestimate_averages_the_batch_statistics_of_either_split(even, expected):
    bn = nn.Sequential(nn.BatchNorm2d(1))
    bn[0].running_mean.fill_(99.0)
    reestimate_bn(bn, _samples(0.0, 2.0, 4.0, 10.0), batch_size=3, even_batches=even)
    assert bn[0].running_mean.item() == pytest.approx(expected)
    assert int(bn[0].num_batches_tracked) == 2


def test_reestimate_runs_only_the_bn_layers_in_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(1)).train()
    reestimate_bn(model, torch.ones(8, 1, 2, 2))  # dropout in train mode would give 0s and 2s
    assert model[1].running_mean.item() == pytest.approx(1.0)
    assert model[1].running_var.item() == pytest.approx(0.0)
    assert not model.training and not model[0].training


def test_reestimate_turns_tracking_on_and_keeps_each_layers_momentum():
    model = nn.Sequential(nn.BatchNorm2d(1, momentum=0.3), nn.BatchNorm2d(1, momentum=None))
    model[0].track_running_stats = False
    reestimate_bn(model, _samples(1.0, 3.0))
    assert [m.track_running_stats for m in model] == [True, True]
    assert [m.momentum for m in model] == [0.3, None]


def test_reestimate_resets_a_layer_that_was_not_tracking():
    # HeteroFL's stats() starts from a fresh tracking model: the old statistics (5, counter 3)
    # weigh nothing, one batch of mean 2 gives 2 (the old code's cumulative average gave 4.25)
    bn = nn.Sequential(nn.BatchNorm2d(1))
    bn[0].running_mean.fill_(5.0)
    bn[0].num_batches_tracked.fill_(3)
    bn[0].track_running_stats = False
    reestimate_bn(bn, _samples(1.0, 3.0))
    assert bn[0].running_mean.item() == pytest.approx(2.0)
    assert bn[0].num_batches_tracked.item() == 1


def test_reestimate_without_samples_or_bn_leaves_the_statistics():
    bn = nn.Sequential(nn.BatchNorm2d(1)).train()
    bn[0].running_mean.fill_(7.0)
    reestimate_bn(bn, torch.zeros(0, 1, 2, 2), batch_size=4, even_batches=True)
    assert bn[0].running_mean.item() == 7.0 and not bn.training
    linear = nn.Linear(2, 2).train()
    assert reestimate_bn(linear, torch.zeros(3, 2)) is linear and not linear.training


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"even_batches": True}, "needs a batch_size"),
])
def test_reestimate_rejects_bad_batching(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reestimate_bn(nn.BatchNorm2d(1), _samples(1.0, 2.0), **kwargs)


def test_reestimate_rejects_a_layer_without_running_statistics():
    with pytest.raises(ValueError, match="track_running_stats=True"):
        reestimate_bn(nn.BatchNorm2d(1, track_running_stats=False), _samples(1.0, 2.0))
