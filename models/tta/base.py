"""What every online test-time-adaptation baseline shares: the adapter contract and the optimisers.

The protocol (CEMA, seed 000, "Protocol" in ALGORITHMS.md) is *online*: each incoming batch is
predicted before the model adapts to it. :class:`OnlineAdapter` pins that order in one place:
``predict_then_adapt`` returns the logits of the forward pass made before any gradient update on the
batch. Normalisation statistics are the exception the references make: BN adaptation and ONDA
normalise a batch with statistics that include the batch itself (so do Tent, PL and ETA, whose
forward uses the batch's statistics).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.batchnorm import batch_norm_layers
from models.tta.settings import ADAM, NESTEROV, OPTIMIZERS

#: Adam's betas of the reference configurations (DequanWang/tent ``cifar10c.py``:
#: ``betas=(cfg.OPTIM.BETA, 0.999)`` with ``OPTIM.BETA: 0.9``; qinenergy/cotta the same).
ADAM_BETAS = (0.9, 0.999)
#: SGD momentum of the reference configurations (mr-eggplant/EATA ``main.py``; chenyaofo/CEMA
#: ``tent.py``; qinenergy/cotta ``conf.py`` ``OPTIM.MOMENTUM``).
SGD_MOMENTUM = 0.9


def require_batch_norm(model: nn.Module, method: str) -> list[_BatchNorm]:
    """The BN layers of ``model``; ValueError if there are none (BN-based methods cannot work)."""
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"method {method!r} needs BatchNorm layers but the model has none; "
                         "use 'source' or 'lame' for BN-free models")
    return layers


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimiser of a reference configuration over ``params``.

    Parameters
    ----------
    kind : {"adam", "sgd", "nesterov"}
        Adam with :data:`ADAM_BETAS`; SGD with momentum :data:`SGD_MOMENTUM`; the same with
        Nesterov momentum (no weight decay or dampening in any reference configuration).
    params : list of nn.Parameter
        What the method adapts.
    lr : float
        Step size, > 0.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {OPTIMIZERS}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if kind == ADAM:
        return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS)
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, nesterov=kind == NESTEROV)


class OnlineAdapter(ABC):
    """Base of every online test-time adapter: predict a batch first, then adapt to it.

    The adapter owns ``model`` and changes it in place (pass a copy to keep the source model).
    Subclasses implement :meth:`_predict_then_adapt` and, if they carry state beyond the model and
    the optimiser, :meth:`_method_state` / :meth:`_load_method_state`.

    Parameters
    ----------
    model : nn.Module
        The network to adapt (a classifier returning logits).
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizer: torch.optim.Optimizer | None = None
        self.batches_seen = 0

    def predict_then_adapt(self, x: Tensor) -> Tensor:
        """Logits for ``x`` computed before any update on ``x`` (module docstring); then adapt to ``x``.

        Parameters
        ----------
        x : Tensor
            A batch of inputs, shape (N, ...), N >= 1.

        Returns
        -------
        Tensor
            Detached logits of shape (N, num_classes) used to predict this batch.
        """
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a batch tensor of shape (N>=1, ...), got {shape}")
        logits = self._predict_then_adapt(x)
        self.batches_seen += 1
        return logits.detach()

    @abstractmethod
    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        """The method itself: return this batch's logits, computed before adapting on it."""

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        del state

    def state_dict(self) -> dict[str, Any]:
        """Deep copies of the model, optimiser and method state (enough to resume between batches)."""
        return copy.deepcopy({
            "model": self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "method": self._method_state(),
            "batches_seen": self.batches_seen,
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from an adapter of the same method and model)."""
        missing = {"model", "optimizer", "method", "batches_seen"} - set(state)
        if missing:
            raise ValueError(f"adapter state lacks {sorted(missing)}; pass what state_dict() returned")
        self.model.load_state_dict(state["model"])
        if (state["optimizer"] is None) != (self.optimizer is None):
            raise ValueError("adapter state's optimizer does not match this method's; "
                             "load a state saved by the same method")
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self._load_method_state(copy.deepcopy(state["method"]))
        self.batches_seen = int(state["batches_seen"])


def gradient_step(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimiser step on ``loss`` (zeroing the gradients before and after)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
