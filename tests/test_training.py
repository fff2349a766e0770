"""The shared training helpers of models.training that no family test covers directly."""

import pytest
import torch
from torch import nn

from models.training import only_trainable


def test_only_trainable_freezes_the_rest_inside_and_restores_every_flag():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    net[1].bias.requires_grad_(False)  # a flag set before the block comes back as it was
    with only_trainable(net, [net[0].bias]):
        assert [p.requires_grad for p in net.parameters()] == [False, True, False, False]
        net(torch.ones(1, 2)).sum().backward()
    assert net[0].weight.grad is None and net[0].bias.grad is not None
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]


def test_only_trainable_restores_the_flags_after_an_error():
    net = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="inside"), only_trainable(net, []):
        raise RuntimeError("inside")
    assert all(p.requires_grad for p in net.parameters())
