"""CEMA's BatchNorm modes (models/cema/tbr.py): TBR and batch statistics, values worked out by hand."""

import pytest
import torch
from torch import nn

from models.cema.tbr import (
    BATCH,
    TBR,
    bn_mode,
    reset_state_statistics,
    reset_statistics,
    statistics_set,
    tbr_batch_norm,
    without_unset_statistics,
)

torch.set_num_threads(1)


def _layer(channels=1):
    layer = nn.BatchNorm1d(channels)
    layer.num_batches_tracked.zero_()
    return layer


def test_first_batch_sets_the_statistics_and_eval_keeps_them():
    layer = _layer().eval()
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]])  # mean 3, unbiased var (4 + 1 + 0 + 9) / 3 = 14/3
    out = tbr_batch_norm(layer, x)
    assert layer.running_mean.item() == pytest.approx(3.0) and layer.running_var.item() == pytest.approx(14 / 3)
    assert statistics_set(layer) and int(layer.num_batches_tracked) == 1
    torch.testing.assert_close(out, (x - 3.0) / (14 / 3 + layer.eps) ** 0.5)
    tbr_batch_norm(layer, torch.tensor([[10.0], [20.0]]))  # eval: normalised with (3, 14/3), nothing moves
    assert layer.running_mean.item() == pytest.approx(3.0) and int(layer.num_batches_tracked) == 1


def test_train_mode_normalises_with_the_old_statistics_then_moves_them_by_the_momentum():
    layer = _layer()
    tbr_batch_norm(layer.eval(), torch.tensor([[1.0], [2.0], [3.0], [6.0]]))  # (3, 14/3)
    layer.train()
    x = torch.tensor([[10.0], [12.0]])  # batch mean 11, unbiased var 2
    out = tbr_batch_norm(layer, x)
    torch.testing.assert_close(out, (x - 3.0) / (14 / 3 + layer.eps) ** 0.5)  # value: the running statistics
    assert layer.running_mean.item() == pytest.approx(3.0 + 0.1 * (11.0 - 3.0))
    assert layer.running_var.item() == pytest.approx(14 / 3 + 0.1 * (2.0 - 14 / 3))
    assert int(layer.num_batches_tracked) == 2


def test_gradients_flow_through_the_batch_statistics():
    # y = (x - mu_B) / sigma_B * r + d with r, d constant: the sum of the outputs has zero gradient
    # (shifting every x moves mu_B with it), unlike a normalisation by constant running statistics.
    layer = _layer()
    tbr_batch_norm(layer.eval(), torch.tensor([[0.0], [1.0], [5.0]]))
    x = torch.tensor([[2.0], [3.0], [7.0]], requires_grad=True)
    tbr_batch_norm(layer.train(), x).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x), atol=1e-6, rtol=0)


def test_batch_mode_uses_the_batch_and_leaves_statistics_alone():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    with bn_mode(net, BATCH, train=False) as model:
        assert not net[2].training and not net[1].training
        out = model(x)
    h = net[0](x)
    expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net[1].eps) * net[1].weight + net[1].bias
    torch.testing.assert_close(out, expected)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.training and net[2].training and "forward" not in vars(net[1])  # restored


def test_markers_reset_travel_and_filter():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    for layer in (net[1], net[3]):
        layer.num_batches_tracked.fill_(7)
    reset = reset_state_statistics(net.state_dict(), net)
    assert int(reset["1.num_batches_tracked"]) == int(reset["3.num_batches_tracked"]) == 0
    assert int(net[1].num_batches_tracked) == 7  # the model itself is untouched
    received = {**net.state_dict(), "1.num_batches_tracked": torch.tensor(0)}
    kept = without_unset_statistics(received, net)
    assert "1.running_mean" not in kept and "1.running_var" not in kept and "1.num_batches_tracked" not in kept
    assert "1.weight" in kept and "3.running_mean" in kept and "0.weight" in kept
    reset_statistics(net)
    assert not statistics_set(net[1]) and not statistics_set(net[3])


def test_tbr_needs_running_statistics_and_a_momentum():
    with pytest.raises(ValueError, match="track_running_stats"):
        with bn_mode(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), TBR, train=True):
            pass
    with pytest.raises(ValueError, match="momentum=None"):
        with bn_mode(nn.Sequential(nn.BatchNorm1d(2, momentum=None)), TBR, train=True):
            pass
    with pytest.raises(ValueError, match="choose one of"):
        with bn_mode(nn.Sequential(nn.BatchNorm1d(2)), "eval", train=True):
            pass
