"""Filter masks -> the tensor rows ElasticDNN retrains, and the gradient masking (seed 003, III-B).

A selected filter trains its conv weight row (and bias entry) and its BN gamma/beta; every other
row is frozen by zeroing its gradient before each SGD step (after weight decay is added by hand),
so its momentum buffer stays 0 and the row stays bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.elastic.scores import ConvBnPair


@dataclass
class TrainedTensor:
    """A parameter being retrained; ``rows`` masks its dim 0 (filters), None = the whole tensor."""

    param: nn.Parameter
    rows: Tensor | None

    def numel(self) -> int:
        """Number of elements actually trained (selected rows only)."""
        if self.rows is None:
            return self.param.numel()
        return int(self.rows.sum()) * (self.param.numel() // self.param.shape[0])


def checked_masks(masks: dict[str, Tensor], pairs: list[ConvBnPair]) -> dict[str, Tensor]:
    """Validate filter masks against the conv-BN pairs; layers left out get an all-False mask.

    Parameters
    ----------
    masks : dict of str to Tensor
        Conv name -> bool mask of shape (out_channels,).
    pairs : list of (str, nn.Conv2d, nn.BatchNorm2d)
        The model's conv-BN pairs (:func:`models.elastic.scores.conv_bn_pairs`).

    Returns
    -------
    dict of str to Tensor
        One mask per pair, in pair order.

    Raises
    ------
    ValueError
        If ``masks`` is not a dict, names an unknown conv, or holds a mask of the wrong dtype/shape.
    """
    if not isinstance(masks, dict):
        raise ValueError(f"masks must be a dict of conv name -> bool tensor, got "
                         f"{type(masks).__name__}")
    widths = {name: conv.out_channels for name, conv, _ in pairs}
    unknown = sorted(set(masks) - set(widths))
    if unknown:
        raise ValueError(f"masks name unknown conv layers {unknown}; known: {list(widths)}")
    checked = {}
    for name, width in widths.items():
        mask = masks.get(name, torch.zeros(width, dtype=torch.bool))
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (width,):
            raise ValueError(f"masks[{name!r}] must be a bool tensor of shape ({width},), got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        checked[name] = mask
    return checked


def trained_tensors(model: nn.Module, pairs: list[ConvBnPair], masks: dict[str, Tensor],
                    train_other: bool) -> list[TrainedTensor]:
    """The parameters (and rows) to train for the selected filters.

    Parameters
    ----------
    model : nn.Module
        The network.
    pairs : list of (str, nn.Conv2d, nn.BatchNorm2d)
        Its conv-BN pairs.
    masks : dict of str to Tensor
        One bool mask per pair (:func:`checked_masks`).
    train_other : bool
        Also train every parameter outside the conv-BN pairs, whole.

    Returns
    -------
    list of TrainedTensor
        Conv weight/bias and BN gamma/beta of every layer with a selected filter (``rows`` None
        when all its filters are selected), then the other parameters if ``train_other``.

    Raises
    ------
    ValueError
        If nothing would be trained.
    """
    trained: list[TrainedTensor] = []
    for name, conv, bn in pairs:
        rows = masks[name]
        if not rows.any():
            continue
        for param in (conv.weight, conv.bias, bn.weight, bn.bias):
            if param is not None:
                trained.append(TrainedTensor(param, None if rows.all() else rows.clone()))
    if train_other:
        in_pairs = {id(p) for _, conv, bn in pairs for p in (*conv.parameters(), *bn.parameters())}
        trained += [TrainedTensor(p, None) for p in model.parameters() if id(p) not in in_pairs]
    if not trained:
        raise ValueError("masks select no filter (and train_other_parameters is False): nothing "
                         "to train; select at least one filter, e.g. with top_mass_filters")
    return trained


def mask_gradients(trained: list[TrainedTensor], weight_decay: float) -> None:
    """Add weight decay by hand, then zero the gradient rows of unselected filters.

    Parameters
    ----------
    trained : list of TrainedTensor
        The trained tensors, after ``backward``; their ``.grad`` is changed in place.
    weight_decay : float
        L2 coefficient added to the gradient (SGD's own weight decay would move frozen rows).
    """
    for tensor in trained:
        grad = tensor.param.grad
        if grad is None:
            continue
        if weight_decay:
            grad.add_(tensor.param.detach(), alpha=weight_decay)
        if tensor.rows is not None:
            grad[~tensor.rows] = 0
