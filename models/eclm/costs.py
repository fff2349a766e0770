"""Costs of one part of a modular network, measured on the part itself (ECLM 5.1).

ECLM 5.1 charges every module a resource vector (communication, computation, memory) and a
sub-model the sum over its modules. Here each part is measured in isolation:

- ``bytes``: bytes of its state dict (parameters and buffers), i.e. what it adds to a message;
- ``flops``: FLOPs of one training step (forward + backward) per sample, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` at the part's own input shape, with the
  input gradient included when the part sits behind trainable layers;
- ``memory`` at batch size B::

      memory = state_bytes + (1 + ADAM_STATE_FACTOR) * trainable_param_bytes
               + B * saved_activation_bytes_per_sample

  i.e. weights and buffers, their gradients, Adam's two moments, and the tensors autograd
  saves for the backward pass (captured with ``torch.autograd.graph.saved_tensors_hooks``,
  parameters excluded, each storage counted once). Activations shared between consecutive
  parts may be counted by both, so the sum is a slight over-estimate.

Measurement runs on a deep copy in training mode, so BatchNorm statistics of the real
network never move.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from models.costs import flop_counter

#: Adam keeps two moment tensors per parameter (Kingma & Ba 2015, algorithm 1).
ADAM_STATE_FACTOR = 2
#: Probe batch for measuring; >= 2 so BatchNorm can run in training mode (as models/costs.py).
PROBE_BATCH = 2


@dataclass(frozen=True)
class ModuleCost:
    """Resource vector of a module or of a network's shared part (ECLM 5.1).

    Attributes
    ----------
    bytes : float
        Communication: bytes of the part's state dict.
    flops : float
        Computation: training FLOPs (forward + backward) per sample.
    memory : float
        Training memory in bytes at the batch size it was computed for.
    """

    bytes: float
    flops: float
    memory: float

    def __add__(self, other: "ModuleCost") -> "ModuleCost":
        """Element-wise sum (ECLM 5.1: a sub-model's cost is the sum of its parts)."""
        return ModuleCost(self.bytes + other.bytes, self.flops + other.flops, self.memory + other.memory)

    def as_tuple(self) -> tuple[float, float, float]:
        """(bytes, flops, memory): the order of ``models.eclm.knapsack.COST_DIMENSIONS``."""
        return (self.bytes, self.flops, self.memory)


#: The cost of a residual (parameter-free bypass) module, ECLM 4.1.
ZERO_COST = ModuleCost(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class PartProfile:
    """Batch-size-free measurements of one part, turned into a :class:`ModuleCost` by :meth:`cost`."""

    state_bytes: float
    trainable_bytes: float
    flops: float
    activation_bytes: float  # saved for backward, per sample

    def cost(self, batch_size: int) -> ModuleCost:
        """The part's :class:`ModuleCost` when trained with batches of ``batch_size``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        memory = (
            self.state_bytes
            + (1 + ADAM_STATE_FACTOR) * self.trainable_bytes
            + batch_size * self.activation_bytes
        )
        return ModuleCost(float(self.state_bytes), float(self.flops), float(memory))

    def __add__(self, other: "PartProfile") -> "PartProfile":
        """Element-wise sum of two profiles."""
        return PartProfile(
            self.state_bytes + other.state_bytes,
            self.trainable_bytes + other.trainable_bytes,
            self.flops + other.flops,
            self.activation_bytes + other.activation_bytes,
        )


def state_bytes(module: nn.Module) -> int:
    """Bytes of every tensor in ``module``'s state dict."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def profile_part(module: nn.Module, input_shape: tuple[int, ...], input_grad: bool) -> PartProfile:
    """Measure one part on a deep copy: FLOPs of a training step and saved activations.

    Parameters
    ----------
    module : nn.Module
        The part (a module, the trunk, the head or the selector).
    input_shape : tuple[int, ...]
        Shape of one input sample of the part.
    input_grad : bool
        Whether training back-propagates into the part's input (True for every part that
        follows trainable layers), which adds the input-gradient FLOPs.
    """
    probe = copy.deepcopy(module).train()
    params = list(probe.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    x = torch.zeros((PROBE_BATCH, *input_shape), requires_grad=input_grad)
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    counter = flop_counter()
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = probe(x)
        if out.requires_grad:
            out.sum().backward()
    return PartProfile(
        state_bytes=float(state_bytes(module)),
        trainable_bytes=float(trainable),
        flops=counter.get_total_flops() / PROBE_BATCH,
        activation_bytes=sum(saved.values()) / PROBE_BATCH,
    )
