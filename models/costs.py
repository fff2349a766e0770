"""Costs of a network measured on the network itself: parameter bytes and training FLOPs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer in the state dict (what a full model message carries)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> float:
    """FLOPs of one training step (forward + backward) per sample, counted by torch.

    Uses ``torch.utils.flop_counter.FlopCounterMode`` on a batch of ``batch`` zero
    inputs (batch 2, so BatchNorm runs in training mode) and divides by the batch size.
    The model's parameters are left untouched (gradients are cleared afterwards).
    """
    x = torch.zeros((batch, *input_shape))
    was_training = model.training
    model.train()
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / batch
