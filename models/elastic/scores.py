"""ElasticDNN filter scores from BN gradients and the top-mass filter selection (seed 003, III-B).

Step 1: one forward/backward on the target batch; a filter's score is
``||dL/dgamma||_1 + ||dL/dbeta||_1`` of its BN channel (:func:`filter_scores`). Step 2: rank every
filter of the network by score and keep the smallest top set covering 80% of the total score
(:func:`top_mass_filters`). Works on any ``nn.Module`` whose Conv2d layers are each followed (in
registration order) by a BatchNorm2d of the same width (:func:`conv_bn_pairs`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.elastic.modes import check_batch, frozen_buffers, retraining_mode
from models.elastic.objective import RetrainingObjective
from models.training import only_trainable

# ElasticDNN section III-B, Step 2: train the filters covering "e.g. 80%" of the summed gradient.
FILTER_MASS = 0.8

ConvBnPair = tuple[str, nn.Conv2d, nn.BatchNorm2d]


def conv_bn_pairs(model: nn.Module) -> list[ConvBnPair]:
    """Every Conv2d with the BatchNorm2d that follows it, in module registration order.

    A BatchNorm2d pairs with the last unpaired Conv2d registered before it when its ``num_features``
    equals the conv's ``out_channels``; BN layers with no pending conv (e.g. on the input) are
    ignored.
    Registration order is assumed to match the data flow conv -> BN (true for ResNets, VGG, and
    residual blocks with projection shortcuts registered as conv, bn).

    Parameters
    ----------
    model : nn.Module
        The network.

    Returns
    -------
    list of (str, nn.Conv2d, nn.BatchNorm2d)
        ``(conv qualified name, conv, bn)``, one per filter-bearing layer.

    Raises
    ------
    ValueError
        If a conv has no matching affine BN after it, or the model has no Conv2d.
    """
    pairs: list[ConvBnPair] = []
    pending: tuple[str, nn.Conv2d] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            _require_no_pending(pending, f"another Conv2d {name!r} comes first")
            pending = (name, module)
        elif isinstance(module, nn.BatchNorm2d) and pending is not None:
            conv_name, conv = pending
            if module.num_features != conv.out_channels:
                _require_no_pending(pending, f"BatchNorm2d {name!r} has {module.num_features} "
                                             f"channels, not {conv.out_channels}")
            if not module.affine:
                raise ValueError(f"BatchNorm2d {name!r} after conv {conv_name!r} has affine=False; "
                                 "filter scores need its gamma/beta, build it with affine=True")
            pairs.append((conv_name, conv, module))
            pending = None
    _require_no_pending(pending, "the model ends")
    if not pairs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer; surrogate retraining needs "
                         "conv-BN pairs")
    return pairs


def _require_no_pending(pending: tuple[str, nn.Conv2d] | None, reason: str) -> None:
    if pending is not None:
        raise ValueError(f"Conv2d {pending[0]!r} ({pending[1].out_channels} filters) has no "
                         f"BatchNorm2d of that width after it ({reason}); every conv needs its BN")


def filter_scores(model: nn.Module, x: Tensor, loss_fn: str | Callable[[Tensor], Tensor] = "im",
                  *, source_stats: dict[str, Tensor] | None = None,
                  feature_module: str | None = None) -> dict[str, Tensor]:
    """Per-filter gradient magnitude via BN: ``|dL/dgamma_c| + |dL/dbeta_c|`` (III-B, Step 1).

    One forward and backward of the batch loss on ``x`` (BN on batch statistics). The paper's
    ``||(1/v) sum_i grad L(y_i)||_1`` is the gradient of the batch-mean loss; IM's diversity term is
    a batch statistic, so for IM it is the gradient of the loss on the whole batch. Only the BN
    affine gradients are computed (``torch.autograd.grad``), so the model's parameters, ``.grad``
    fields, ``requires_grad`` flags, modes and buffers are left as they were.

    Parameters
    ----------
    model : nn.Module
        Network with conv-BN pairs (see :func:`conv_bn_pairs`).
    x : Tensor
        Unlabeled target batch, shape (N >= 2, ...).
    loss_fn : str or callable
        A name in :data:`models.elastic.objective.LOSSES`, or a function of the logits returning a
        scalar loss.
    source_stats, feature_module
        As in :func:`models.elastic.retrain.retrain_selected` (for the feature-based losses).

    Returns
    -------
    dict of str to Tensor
        Conv name -> scores of shape (out_channels,), in :func:`conv_bn_pairs` order.
    """
    pairs = conv_bn_pairs(model)
    check_batch(x)
    objective = RetrainingObjective(model, loss_fn, source_stats, feature_module)
    bn_params = [p for _, _, bn in pairs for p in (bn.weight, bn.bias)]
    with retraining_mode(model), frozen_buffers(model), only_trainable(model, bn_params):
        objective.refresh(x)
        loss = objective(x, torch.arange(len(x)))
        grads = torch.autograd.grad(loss, bn_params, allow_unused=True) if loss.requires_grad \
            else [None] * len(bn_params)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(bn_params, grads)]
    return {name: (grads[2 * i].abs() + grads[2 * i + 1].abs()).detach()
            for i, (name, _, _) in enumerate(pairs)}


def top_mass_filters(scores: dict[str, Tensor], mass: float = FILTER_MASS) -> dict[str, Tensor]:
    """The smallest set of filters, ranked globally by score, covering ``mass`` of the total score.

    ElasticDNN III-B, Step 2. Filters of all layers are ranked together in descending score; ties
    keep (layer order of ``scores``, filter index) order (stable sort), so the result is
    deterministic. Sums are in float64. ``mass == 1`` selects exactly the filters with a nonzero
    score (rounding cannot drop a small one).

    Parameters
    ----------
    scores : dict of str to Tensor
        Layer name -> nonnegative finite 1-D scores (e.g. from :func:`filter_scores`).
    mass : float
        Fraction of the total score to cover, in (0, 1] (paper: 0.8).

    Returns
    -------
    dict of str to Tensor
        Layer name -> bool mask of the same length (True = train this filter).
    """
    if not isinstance(mass, (int, float)) or not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass!r}; the paper uses 0.8")
    flat = _flatten_scores(scores)
    if mass == 1:
        chosen = flat > 0
    else:
        order = torch.sort(flat, descending=True, stable=True).indices
        covered = torch.cumsum(flat[order], 0)
        count = min(int(torch.searchsorted(covered, mass * covered[-1])) + 1, len(flat))
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[order[:count]] = True
    return dict(zip(scores, chosen.split([len(s) for s in scores.values()])))


def _flatten_scores(scores: dict[str, Tensor]) -> Tensor:
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict of layer name -> 1-D tensor, got "
                         f"{type(scores).__name__} {scores!r:.60}")
    for name, layer in scores.items():
        if not isinstance(layer, Tensor) or layer.dim() != 1 or len(layer) == 0:
            raise ValueError(f"scores[{name!r}] must be a non-empty 1-D tensor")
        if not torch.isfinite(layer).all() or (layer < 0).any():
            raise ValueError(f"scores[{name!r}] must be finite and >= 0, got {layer.tolist()}")
    flat = torch.cat([s.detach().to(torch.float64) for s in scores.values()])
    if flat.sum() == 0:
        raise ValueError("every score is 0: the loss has no gradient w.r.t. any BN parameter, so "
                         "no filter can be selected; check the loss and the batch")
    return flat
