"""The memory a method keeps on the device while it adapts to a domain, part by part (seed 003, IV).

ElasticDNN's evaluation compares methods by their memory on the device. To compare like with
like, :class:`MemoryFootprint` counts what each method holds, measured on the tensors themselves:

* **resident** (held throughout the adaptation): the master network (ElasticDNN, ``full``), the
  domain-knowledge bank (ElasticDNN), the adapted smaller model (ElasticDNN's surrogate, the
  same-size baselines' model) and the optimizer state (SGD momentum buffers, as torch holds them:
  one per trained tensor, whole tensors even where only some filters train);
* **training peak** = resident + the larger training step's gradients (whole trained tensors)
  and the activations autograd saved for its backward (:class:`models.elastic.ledger.PassLedger`);
  an upper bound of that step's peak (both at once), transient buffers of single operations left out.

Left out for every method alike: the domain's input samples, and the copies the simulator keeps
to score the model before adaptation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from torch import nn

#: Metric names of the parts and totals (a device reply's metrics; ``train_`` + name in the round records).
PART_METRIC = "memory_{}_bytes"
RESIDENT_METRIC = "resident_memory_bytes"
PEAK_METRIC = "peak_memory_bytes"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each tensor object counted once."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (BN running statistics and counters included)."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer keeps per parameter (SGD: its momentum buffers)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes a method keeps on the device while adapting, by part (module docstring).

    Attributes
    ----------
    master, bank, model : int
        The master network, the bank, the adapted smaller model (0 where a method has none).
    optimizer : int
        Optimizer state after training (momentum buffers).
    gradients, activations : int
        Of the training step that held the most: gradients of the trained tensors, activations
        saved for its backward.
    """

    master: int = 0
    bank: int = 0
    model: int = 0
    optimizer: int = 0
    gradients: int = 0
    activations: int = 0

    def __post_init__(self) -> None:
        negative = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) < 0}
        if negative:
            raise ValueError(f"memory parts must be >= 0 bytes, got {negative}")

    @property
    def resident(self) -> int:
        """``master + bank + model + optimizer``: held throughout the adaptation."""
        return self.master + self.bank + self.model + self.optimizer

    @property
    def peak(self) -> int:
        """``resident + gradients + activations``: the training step's peak (upper bound)."""
        return self.resident + self.gradients + self.activations

    def metrics(self) -> dict[str, int]:
        """Every part as ``memory_<part>_bytes``, plus ``resident_memory_bytes`` and ``peak_memory_bytes``."""
        parts = {PART_METRIC.format(f.name): int(getattr(self, f.name)) for f in fields(self)}
        return {**parts, RESIDENT_METRIC: self.resident, PEAK_METRIC: self.peak}


#: The parts in table order.
PARTS = tuple(f.name for f in fields(MemoryFootprint))
