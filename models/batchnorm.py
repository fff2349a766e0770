"""BatchNorm utilities every adaptation family uses: find the layers, their affine parameters,
how they normalise, and re-estimating their running statistics on new data.

Family-specific normalisation stays with its family (CEMA's test-time batch renormalisation in
:mod:`models.cema.tbr`, the statistics-only TTA baselines in :mod:`models.tta.norm`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

#: A replacement BN forward: ``forward(layer, x) -> y`` (see :func:`bn_forward`).
BnForward = Callable[[_BatchNorm, Tensor], Tensor]


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (1d/2d/3d) of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def bn_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weight and bias of every affine BatchNorm layer of ``model``, in module order.

    What Tent (Wang et al., ICLR 2021, section 3), ETA/EATA, PL and CEMA adapt at test time.

    Raises
    ------
    ValueError
        If ``model`` has no affine BatchNorm layer (nothing for these methods to train).
    """
    params = [p for layer in batch_norm_layers(model) if layer.affine for p in (layer.weight, layer.bias)]
    if not params:
        raise ValueError(f"{type(model).__name__} has no affine BatchNorm layer, so there are no BN weights "
                         "and biases to adapt: use a model with affine BatchNorm layers, or a method that "
                         "adapts statistics only (e.g. 'bn_adapt')")
    return params


def train_only_bn_affine(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except the BN affine ones; return those (Tent, section 3)."""
    params = bn_affine_parameters(model)
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    return params


def use_test_batch_statistics(model: nn.Module) -> None:
    """Put ``model`` in eval mode except its BN layers, which normalise with the test batch's statistics.

    Tent sets ``track_running_stats=False`` and drops the buffers; here the BN layers are in train mode
    with ``momentum=0``, which normalises with the batch statistics identically but leaves the running
    statistics untouched, so the state dict keeps the source model's keys (shippable as is).
    Dropout and other layers stay in eval mode (as chenyaofo/CEMA ``prepare_model_for_tent_tta``; the
    official Tent, EATA and CoTTA put the whole model in train mode, which differs only for layers such
    as dropout). ``num_batches_tracked`` still counts test batches, and the layers keep ``momentum=0``
    afterwards (the caller owns the model).
    """
    model.eval()
    for layer in batch_norm_layers(model):
        layer.train()
        layer.momentum = 0.0


@contextmanager
def bn_forward(model: nn.Module, forward: BnForward) -> Iterator[nn.Module]:
    """Inside the block every BN layer of ``model`` computes ``forward(layer, x)`` instead of its own forward.

    The reference baselines replace the BN forward the same way (chenyaofo/CEMA
    ``replace_bn_forward_with``); the layers' parameters and buffers, hence state dicts, are untouched.
    """
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.forward = partial(forward, layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: Tensor, batch_size: int | None = None, *,
                  even_batches: bool = False) -> nn.Module:
    """Replace every BN layer's running statistics by those of ``x``; return ``model`` in eval mode.

    A network whose BN layers now see other inputs than the ones their statistics describe (a
    path of a supernet, a width-cut sub-model, a pruned surrogate, a new domain) is evaluated with
    statistics recomputed on data: once-for-all (Cai et al., ICLR 2020, section 3.3), HeteroFL's
    static BN (Diao et al., ICLR 2021, section 3.2), BN adaptation (Schneider et al., NeurIPS 2020).
    The statistics are reset (torch's ``reset_running_stats``), then accumulated as the cumulative
    average (``momentum=None``) of the per-batch mean and unbiased variance; only the BN layers run
    in training mode (every other module as at inference). Afterwards the layers track running
    statistics (``track_running_stats=True``) and keep their own momentum. With no samples or no
    BN layer the statistics stay as they are.

    A layer that does not track statistics when called (``track_running_stats=False``, the width
    family's training regime) is reset too: tracking is turned on before the reset, which torch's
    ``reset_running_stats`` would otherwise skip. HeteroFL's ``stats()`` does the same: it loads
    the trained weights into a fresh tracking model, whose statistics start empty.

    Parameters
    ----------
    model : nn.Module
        The network; changed in place and left in eval mode.
    x : Tensor
        Inputs, shape (N, ...).
    batch_size : int or None
        Samples per forward pass (>= 1); None: all of ``x`` in one pass.
    even_batches : bool
        Split ``x`` into ``ceil(N / batch_size)`` batches of nearly equal size
        (``torch.tensor_split``, the width family's static BN) instead of batches of
        ``batch_size`` and a smaller last one. Needs ``batch_size``.

    Raises
    ------
    ValueError
        For a batch size below 1, ``even_batches`` without a batch size, or a BN layer without
        running statistics (built with ``track_running_stats=False``).
    """
    batches = _batches(x, batch_size, even_batches)
    layers = batch_norm_layers(model)
    _require_running_statistics(layers)
    model.eval()
    if len(x) == 0 or not layers:
        return model
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum, layer.track_running_stats = None, True
        layer.reset_running_stats()  # after tracking is on: torch skips the reset of a non-tracking layer
        layer.train()
    for batch in batches:
        model(batch)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    return model.eval()


def _batches(x: Tensor, batch_size: int | None, even_batches: bool) -> tuple[Tensor, ...]:
    """``x`` cut as :func:`reestimate_bn` describes."""
    if batch_size is None:
        if even_batches:
            raise ValueError("even_batches=True needs a batch_size; pass one or drop even_batches")
        return (x,)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None for one pass), got {batch_size}")
    if even_batches:
        return torch.tensor_split(x, -(-len(x) // batch_size)) if len(x) else ()
    return torch.split(x, batch_size)


def _require_running_statistics(layers: list[_BatchNorm]) -> None:
    for layer in layers:
        if layer.running_mean is None or layer.running_var is None:
            raise ValueError(f"{type(layer).__name__} has no running statistics to re-estimate "
                             "(track_running_stats=False at construction): build it with "
                             "track_running_stats=True")
