"""Costs of a network measured on the network itself: parameter bytes and training FLOPs."""

from __future__ import annotations

import torch
from torch import nn


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer in the state dict (what a full model message carries)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def flop_counter():
    """A fresh ``torch.utils.flop_counter.FlopCounterMode`` (no display), imported on first use.

    Importing the counter imports triton (0.2 s, measured with ``python -X importtime``):
    every module that imports this one would otherwise make the driver wait for it before
    it forks the workers' server, whether or not the driver counts FLOPs itself.
    """
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> float:
    """FLOPs of one training step (forward + backward) per sample, counted by torch.

    Uses ``torch.utils.flop_counter.FlopCounterMode`` on a batch of ``batch`` zero
    inputs (batch 2, so BatchNorm runs in training mode) and divides by the batch size.
    The model's parameters are left untouched (gradients are cleared afterwards).
    """
    x = torch.zeros((batch, *input_shape))
    was_training = model.training
    model.train()
    counter = flop_counter()
    with counter:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / batch


#: Adam keeps two moment tensors per parameter; with the gradient that is 3 extra copies.
OPTIMIZER_STATE_COPIES = 2


def activation_bytes(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    """Bytes of the activations a training step keeps for backward, measured with hooks.

    Sums the outputs of every leaf module on one forward pass at ``batch_size``: an
    upper-bound estimate of what autograd saves (in-place ReLUs counted too), the usual
    approximation for on-device training memory.
    """
    total = 0

    def hook(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            model(torch.zeros((batch_size, *input_shape)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total


def training_memory_bytes(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> int:
    """Training memory at ``batch_size``: parameters, their gradients and Adam state, activations.

    ``params * (1 + 1 + OPTIMIZER_STATE_COPIES) + activation_bytes`` (buffers counted once).
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params * (2 + OPTIMIZER_STATE_COPIES) + buffers + activation_bytes(model, input_shape, batch_size)
