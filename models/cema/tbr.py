"""How CEMA's models normalise: Test-time Batch Renormalization (TBR) or plain batch statistics.

CEMA's official code (chenyaofo/CEMA, ``codebase/core/tta/cema.py``, conf ``is_tbr: true``)
drops every BatchNorm layer's source running statistics (``prepare_model_for_tent_tta``) and,
with TBR on, replaces each BN forward by ``tbr_bn_forward_impl`` (``codebase/core/tta/tbr.py``),
a test-time form of Batch Renormalization (Ioffe, NeurIPS 2017, eq. in Algorithm 1):

* the running statistics are (re-)initialised from the first batch the layer sees;
* the output is ``((x - mu_B) / sigma_B) * r + d`` with ``r = sg(sigma_B) / sigma`` and
  ``d = (sg(mu_B) - mu) / sigma`` (``sg``: no gradient), i.e. in value the input normalised with
  the running statistics ``(mu, sigma)``, while gradients flow through the batch statistics;
  ``sigma_B^2`` is the unbiased batch variance, ``sigma = sqrt(var + eps)``;
* in train mode the running statistics then move by the layer's momentum
  (``mu += momentum * (mu_B - mu)``); in eval mode they stay.

With TBR off the official layers have no running statistics at all, so every forward, train
or eval, normalises with the batch's own statistics (:data:`BATCH`).

The project keeps the statistics in the layers' ``running_mean``/``running_var`` buffers, so
they travel in state dicts and checkpoints like any BN entry. ``num_batches_tracked == 0`` is
the marker "no statistics yet: take them from the next batch" (:func:`reset_statistics`); the
first TBR forward sets it to 1 and every train-mode forward adds 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.batchnorm import batch_norm_layers, bn_forward

#: TBR forward (official conf ``is_tbr: true``).
TBR = "tbr"
#: Batch statistics in train and eval mode (official with ``is_tbr: false``).
BATCH = "batch"
#: The BatchNorm modes a CEMA model can run in.
BN_MODES = (TBR, BATCH)
#: State-dict entries of a BN layer that are statistics, not parameters.
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def reset_statistics(model: nn.Module) -> None:
    """Mark every BN layer of ``model`` as having no statistics: the next TBR forward sets them.

    The official code drops the source statistics of both CEMA models before adaptation
    (``prepare_model_for_tent_tta``); the values stay in the buffers but are never used.
    """
    for layer in _tbr_layers(model):
        layer.num_batches_tracked.zero_()


def reset_state_statistics(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of state dict ``state`` of ``model`` whose BN layers carry the reset marker."""
    out = dict(state)
    for prefix in _bn_prefixes(model):
        key = prefix + "num_batches_tracked"
        if key in out:
            out[key] = torch.zeros_like(out[key])
    return out


def statistics_set(layer: _BatchNorm) -> bool:
    """Whether ``layer``'s running statistics come from a batch (its marker is not 0)."""
    return layer.num_batches_tracked is not None and int(layer.num_batches_tracked) > 0


def without_unset_statistics(received: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``received`` without the statistics of BN layers whose marker says "not set yet".

    A device keeps the statistics it initialised from its own first test batch until the
    cloud's copy has statistics of its own (the cloud's student sets them on its first
    uploaded batch); affine parameters and every other entry load as received.
    """
    out = dict(received)
    for prefix in _bn_prefixes(model):
        marker = received.get(prefix + "num_batches_tracked")
        if marker is not None and int(marker) == 0:
            for name in STATISTICS:
                out.pop(prefix + name, None)
    return out


def tbr_batch_norm(layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """One BN layer's TBR forward (module docstring; official ``tbr_bn_forward_impl``).

    Works on any BatchNorm input ``(N, C, ...)``: statistics over every dimension but 1.
    Sets the layer's statistics from ``x`` when its marker is 0; moves them in train mode.
    """
    dims = [d for d in range(x.dim()) if d != 1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    batch_var, batch_mean = torch.var_mean(x, dim=dims, keepdim=True)
    batch_std = torch.sqrt(batch_var + layer.eps)
    if not statistics_set(layer):
        with torch.no_grad():
            layer.running_mean.copy_(batch_mean.detach().view(-1))
            layer.running_var.copy_(batch_var.detach().view(-1))
            layer.num_batches_tracked.fill_(1)
    mean, var = layer.running_mean.view(shape), layer.running_var.view(shape)
    r = batch_std.detach() / torch.sqrt(var + layer.eps)
    d = (batch_mean.detach() - mean) / torch.sqrt(var + layer.eps)
    y = ((x - batch_mean) / batch_std) * r + d
    if layer.training:
        with torch.no_grad():
            mean += layer.momentum * (batch_mean.detach() - mean)
            var += layer.momentum * (batch_var.detach() - var)
            layer.num_batches_tracked.add_(1)
    if layer.affine:
        y = layer.weight.view(shape) * y + layer.bias.view(shape)
    return y


def batch_statistics_norm(layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """One BN layer normalised with ``x``'s own statistics, running statistics untouched."""
    return F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)


@contextmanager
def bn_mode(model: nn.Module, mode: str, *, train: bool) -> Iterator[nn.Module]:
    """Run ``model``'s BN layers in ``mode`` (:data:`TBR` or :data:`BATCH`) inside the block.

    Parameters
    ----------
    model : nn.Module
        A CEMA model (changed in place inside the block, restored afterwards).
    mode : {"tbr", "batch"}
        How the BN layers normalise (module docstring).
    train : bool
        The BN layers' training flag (TBR moves its statistics only in train mode). Every
        other module runs in eval mode (the official code keeps dropout in eval mode).
    """
    if mode not in BN_MODES:
        raise ValueError(f"bn mode {mode!r}; choose one of {BN_MODES} (algorithm.cema.tbr true/false)")
    layers = _tbr_layers(model) if mode == TBR else batch_norm_layers(model)
    forward = tbr_batch_norm if mode == TBR else batch_statistics_norm
    modes = {module: module.training for module in model.modules()}
    model.eval()
    for layer in layers:
        layer.train(train)
    try:
        with bn_forward(model, forward):
            yield model
    finally:
        for module, flag in modes.items():
            module.training = flag


def _tbr_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BN layers of ``model``; ValueError if one cannot hold TBR statistics."""
    layers = batch_norm_layers(model)
    for layer in layers:
        if layer.running_mean is None or layer.num_batches_tracked is None:
            raise ValueError(
                f"{type(layer).__name__} has no running statistics (track_running_stats=False); TBR keeps "
                "its statistics there: build the model with track_running_stats=True or set algorithm.cema.tbr=false"
            )
        if layer.momentum is None:
            raise ValueError(
                f"{type(layer).__name__} has momentum=None (cumulative average); TBR moves its statistics "
                "by the layer's momentum: give the layer a momentum (PyTorch's default 0.1)"
            )
    return layers


def _bn_prefixes(model: nn.Module) -> list[str]:
    """State-dict prefixes (``"features.1."``) of every BN layer of ``model``."""
    return [f"{name}." if name else "" for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
