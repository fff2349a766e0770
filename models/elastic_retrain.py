"""ElasticDNN surrogate retraining: score filters by BN gradients, train only the top-mass filters.

Seed 003, section III-B, "Surrogate DNN retraining": (1) one forward/backward on the target batch;
a filter's score is ``||dL/dgamma||_1 + ||dL/dbeta||_1`` of its BN channel; (2) rank every filter of
the network by score and train only the smallest top set covering 80% of the total score, with an
unsupervised loss (information maximisation by default). Works on any ``nn.Module`` whose Conv2d
layers are each followed (in registration order) by a BatchNorm2d of the same width.

BN mode: while scoring and retraining, BN layers normalise with the *batch* statistics (train mode)
and every other module is in eval mode (no dropout); during retraining the BN running statistics
follow the target batches with the layer's own momentum, as SHOT's ``netF.train()`` does, so the
surrogate is ready for eval-mode inference afterwards. Scoring and loss evaluations leave buffers
untouched. Running statistics are buffers, not trained parameters: they move for every channel.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.elastic_losses import (
    channel_statistics,
    entropy_loss,
    feature_alignment,
    information_maximisation,
    shot_loss,
    shot_pseudo_labels,
)

# ElasticDNN section IV, "Online DA settings": 100 unlabeled samples per target domain.
SAMPLES_PER_DOMAIN = 100
# ElasticDNN section III-B, Step 2: train the filters covering "e.g. 80%" of the summed gradient.
FILTER_MASS = 0.8
# SHOT (tim-learn/SHOT uda_digit.py train_target + lr_scheduler): SGD lr 1e-2 on the whole feature
# extractor, momentum 0.9, Nesterov, weight decay 1e-3, batch 64. SHOT's poly lr decay is left out.
RETRAIN_LR = 1e-2
RETRAIN_MOMENTUM = 0.9
RETRAIN_NESTEROV = True
RETRAIN_WEIGHT_DECAY = 1e-3
RETRAIN_BATCH_SIZE = 64
# House choice for a CPU retraining window: 10 passes over the 100 samples = 20 SGD steps at batch
# 64 (SHOT runs 15-30 epochs over thousands of target samples on a GPU).
RETRAIN_EPOCHS = 10
# Loss names accepted by retrain_selected / adapt_full / filter_scores (paper: IM default).
LOSSES = ("im", "tent", "feature_alignment", "shot")
# BN in train mode cannot normalise one sample; SHOT skips batches of size 1 the same way.
MIN_BATCH = 2

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
    a batch statistic, so for IM it is the gradient of the loss on the whole batch. Only the BN affine gradients are computed (``torch.autograd.grad``), so the model's
    parameters, ``.grad`` fields, ``requires_grad`` flags, modes and buffers are left as they were.

    Parameters
    ----------
    model : nn.Module
        Network with conv-BN pairs (see :func:`conv_bn_pairs`).
    x : Tensor
        Unlabeled target batch, shape (N >= 2, ...).
    loss_fn : str or callable
        A name in :data:`LOSSES`, or a function of the logits returning a scalar loss.
    source_stats, feature_module
        As in :func:`retrain_selected` (for the feature-based losses).

    Returns
    -------
    dict of str to Tensor
        Conv name -> scores of shape (out_channels,), in :func:`conv_bn_pairs` order.
    """
    pairs = conv_bn_pairs(model)
    _check_batch(x)
    objective = _Objective(model, loss_fn, source_stats, feature_module)
    bn_params = [p for _, _, bn in pairs for p in (bn.weight, bn.bias)]
    with _retraining_mode(model), _frozen_buffers(model), _only_trainable(model, bn_params):
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


@dataclass
class _TrainedTensor:
    """A parameter being retrained; ``rows`` masks its dim 0 (filters), None = the whole tensor."""

    param: nn.Parameter
    rows: Tensor | None

    def numel(self) -> int:
        """Number of elements actually trained (selected rows only)."""
        if self.rows is None:
            return self.param.numel()
        return int(self.rows.sum()) * (self.param.numel() // self.param.shape[0])


def retrain_selected(model: nn.Module, x: Tensor, *, masks: dict[str, Tensor], loss: str = "im",
                     epochs: int = RETRAIN_EPOCHS, lr: float = RETRAIN_LR,
                     momentum: float = RETRAIN_MOMENTUM,
                     weight_decay: float = RETRAIN_WEIGHT_DECAY,
                     batch_size: int = RETRAIN_BATCH_SIZE, seed: int = 0,
                     source_stats: dict[str, Tensor] | None = None,
                     feature_module: str | None = None,
                     train_other_parameters: bool = False) -> dict[str, Any]:
    """Train only the selected filters of ``model``, in place, with an unsupervised loss (III-B).

    Trained: for each selected filter, its conv weight row (and bias entry) and its BN gamma/beta.
    Everything else is frozen: its tensors get no gradient, and in a tensor with some selected rows
    the unselected rows' gradients (after adding weight decay by hand) are zeroed before every step,
    so their SGD momentum buffers stay 0 and the rows stay bit-identical. Parameters outside the
    conv-BN pairs (the classifier head, ...) stay frozen unless ``train_other_parameters``; SHOT
    freezes its classifier too ("source hypothesis", tim-learn/SHOT ``netC`` requires_grad False).
    Optimiser: SGD with SHOT's momentum and Nesterov; mini-batches drawn by a seeded permutation
    each epoch; batches of one sample are skipped (BN). ``requires_grad`` flags and module modes are
    restored afterwards; the trained tensors' ``.grad`` is left None.

    Parameters
    ----------
    model : nn.Module
        Network with conv-BN pairs (see :func:`conv_bn_pairs`); changed in place.
    x : Tensor
        The domain's unlabeled samples, shape (N >= 2, ...) (paper: :data:`SAMPLES_PER_DOMAIN`).
    masks : dict of str to Tensor
        Conv name -> bool mask (out_channels,) of filters to train (e.g. :func:`top_mass_filters`).
        Layers left out train nothing.
    loss : str
        One of :data:`LOSSES`: ``"im"`` (SHOT information maximisation, the paper's default),
        ``"tent"`` (entropy), ``"feature_alignment"`` (needs ``source_stats``), ``"shot"`` (IM +
        0.3 * CE on SHOT pseudo-labels, refreshed at the start of every epoch as in SHOT).
    epochs, lr, momentum, weight_decay, batch_size : int, float, float, float, int
        Passes over ``x`` and SGD settings (defaults: module constants, with sources).
    seed : int
        Seeds the mini-batch order (the only random draw).
    source_stats : dict, optional
        ``{"mean": (D,), "var": (D,)}`` of the source features (:func:`feature_statistics`).
    feature_module : str, optional
        Name of the module whose *input* is the feature vector; default: the last ``nn.Linear``.
    train_other_parameters : bool
        Also train every parameter outside the conv-BN pairs, whole.

    Returns
    -------
    dict
        ``loss``, ``initial_loss`` / ``final_loss`` (full batch, before / after), ``loss_history``
        (one per step), ``steps``, ``trained_filters``, ``total_filters``, ``trained_fraction``,
        ``trained_parameters`` (elements), ``peak_memory_bytes`` (see
        :func:`training_memory_bytes`) and ``wall_time_s`` (the training loop).
    """
    pairs = conv_bn_pairs(model)
    _check_batch(x)
    _check_training(epochs, lr, momentum, weight_decay, batch_size)
    masks = _checked_masks(masks, pairs)
    trained = _trained_tensors(model, pairs, masks, train_other_parameters)
    objective = _Objective(model, loss, source_stats, feature_module)
    with _retraining_mode(model), _only_trainable(model, [t.param for t in trained]):
        initial = _full_batch_loss(objective, x)
        start = time.perf_counter()
        history = _train(objective, x, trained, epochs=epochs, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, batch_size=batch_size, seed=seed)
        wall_time = time.perf_counter() - start
        final = _full_batch_loss(objective, x)
    trained_filters = sum(int(m.sum()) for m in masks.values())
    total_filters = sum(conv.out_channels for _, conv, _ in pairs)
    return {
        "loss": objective.name, "initial_loss": initial, "final_loss": final,
        "loss_history": history, "steps": len(history),
        "trained_filters": trained_filters, "total_filters": total_filters,
        "trained_fraction": trained_filters / total_filters,
        "trained_parameters": sum(t.numel() for t in trained),
        "peak_memory_bytes": training_memory_bytes(model, trained, momentum),
        "wall_time_s": wall_time,
    }


def adapt_full(model: nn.Module, x: Tensor, *, loss: str = "im", **kwargs: Any) -> dict[str, Any]:
    """Reference: retrain *every* filter (all conv and BN parameters), same loss and code path.

    The "full master retrained with the same loss" comparison: :func:`retrain_selected` with every
    mask all True. Keyword arguments are those of :func:`retrain_selected` (except ``masks``).
    """
    if "masks" in kwargs:
        raise ValueError("adapt_full trains every filter; call retrain_selected to pass masks")
    masks = {name: torch.ones(conv.out_channels, dtype=torch.bool)
             for name, conv, _ in conv_bn_pairs(model)}
    return retrain_selected(model, x, masks=masks, loss=loss, **kwargs)


def retrain_surrogate(model: nn.Module, x: Tensor, *, mass: float = FILTER_MASS, loss: str = "im",
                      **kwargs: Any) -> dict[str, Any]:
    """Both steps of ElasticDNN's surrogate retraining: score, select ``mass``, retrain them.

    Scores use the same loss as the retraining. Keyword arguments are those of
    :func:`retrain_selected` (except ``masks``). The result also holds ``masks``.
    """
    if "masks" in kwargs:
        raise ValueError("retrain_surrogate selects the filters itself; call retrain_selected "
                         "to pass masks")
    feature_kwargs = {k: kwargs[k] for k in ("source_stats", "feature_module") if k in kwargs}
    masks = top_mass_filters(filter_scores(model, x, loss, **feature_kwargs), mass)
    return {**retrain_selected(model, x, masks=masks, loss=loss, **kwargs), "masks": masks}


def training_memory_bytes(model: nn.Module, trained: list[_TrainedTensor], momentum: float) -> int:
    """Training memory: all parameters + a gradient and a momentum copy of the trained elements.

    Filter-grained accounting (what a filter-level trainer stores; ElasticDNN III-B counts memory
    per filter): trained elements are the selected rows only. SGD keeps one momentum buffer when
    ``momentum > 0``. Activations are not included (they depend on the input size).
    """
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = 2 if momentum > 0 else 1
    return parameter_bytes + copies * sum(t.numel() * t.param.element_size() for t in trained)


def feature_statistics(model: nn.Module, x: Tensor, *,
                       feature_module: str | None = None) -> dict[str, Tensor]:
    """Per-channel mean and unbiased variance of the source features, for ``"feature_alignment"``.

    Computed like TTT++'s offline summary (Liu et al. 2021): model in eval mode, no gradient, over
    the source samples ``x``. Features are the input of ``feature_module`` (default: the last
    ``nn.Linear``, i.e. what the classifier head reads). Modes are restored afterwards.

    Returns
    -------
    dict of str to Tensor
        ``{"mean": (D,), "var": (D,)}``.
    """
    _check_batch(x)
    module = _feature_layer(model, feature_module)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            features, _ = _forward_with_features(model, module, x)
    finally:
        for m, mode in modes:
            m.train(mode)
    mean, var = channel_statistics(features)
    return {"mean": mean, "var": var}


class _Objective:
    """The retraining loss of a batch of model inputs (forward pass included)."""

    def __init__(self, model: nn.Module, loss: str | Callable[[Tensor], Tensor],
                 source_stats: dict[str, Tensor] | None, feature_module: str | None) -> None:
        self.model = model
        self.logits_loss = loss if callable(loss) else None
        self.name = getattr(loss, "__name__", "custom") if callable(loss) else loss
        if self.logits_loss is None and loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES} or a function of logits")
        needs_features = self.name in ("feature_alignment", "shot") and self.logits_loss is None
        self.feature_layer = _feature_layer(model, feature_module) if needs_features else None
        self.source_stats = _checked_source_stats(source_stats) \
            if self.name == "feature_alignment" and self.logits_loss is None else None
        self.pseudo_labels: Tensor | None = None

    def refresh(self, x: Tensor) -> None:
        """Recompute SHOT's pseudo-labels for all of ``x`` (buffers untouched); no-op otherwise."""
        if self.name != "shot" or self.logits_loss is not None:
            return
        with torch.no_grad(), _frozen_buffers(self.model):
            features, logits = _forward_with_features(self.model, self.feature_layer, x)
        self.pseudo_labels = shot_pseudo_labels(features, logits)

    def __call__(self, xb: Tensor, index: Tensor) -> Tensor:
        if self.logits_loss is not None:
            return self.logits_loss(self.model(xb))
        if self.name == "im":
            return information_maximisation(self.model(xb))
        if self.name == "tent":
            return entropy_loss(self.model(xb))
        features, logits = _forward_with_features(self.model, self.feature_layer, xb)
        if self.name == "feature_alignment":
            return feature_alignment(features, self.source_stats["mean"], self.source_stats["var"])
        return shot_loss(logits, self.pseudo_labels[index])


def _feature_layer(model: nn.Module, name: str | None) -> nn.Module:
    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules:
            raise ValueError(f"feature_module {name!r} is not a module of {type(model).__name__}; "
                             f"pass one of {sorted(n for n in modules if n)[:8]}...")
        return modules[name]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to read features from; "
                         "pass feature_module=<name of the module whose input are the features>")
    return linears[-1]


def _forward_with_features(model: nn.Module, module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of ``model(x)`` and the (flattened) input of ``module`` on its last call."""
    captured: list[Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"feature module {type(module).__name__} was not called in the forward "
                         "pass; pass feature_module=<a module on the path to the logits>")
    return captured[-1].flatten(1), logits


def _train(objective: _Objective, x: Tensor, trained: list[_TrainedTensor], *, epochs: int,
           lr: float, momentum: float, weight_decay: float, batch_size: int,
           seed: int) -> list[float]:
    """The SGD loop; returns the loss of every step."""
    optimizer = torch.optim.SGD([t.param for t in trained], lr=lr, momentum=momentum,
                                nesterov=RETRAIN_NESTEROV and momentum > 0)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    for _ in range(epochs):
        objective.refresh(x)
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            if len(batch) < MIN_BATCH:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = objective(x[batch], batch)
            loss.backward()
            _mask_gradients(trained, weight_decay)
            optimizer.step()
            history.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    return history


def _mask_gradients(trained: list[_TrainedTensor], weight_decay: float) -> None:
    """Add weight decay by hand, then zero the gradient rows of unselected filters."""
    for tensor in trained:
        grad = tensor.param.grad
        if grad is None:
            continue
        if weight_decay:
            grad.add_(tensor.param.detach(), alpha=weight_decay)
        if tensor.rows is not None:
            grad[~tensor.rows] = 0


def _trained_tensors(model: nn.Module, pairs: list[ConvBnPair], masks: dict[str, Tensor],
                     train_other: bool) -> list[_TrainedTensor]:
    trained: list[_TrainedTensor] = []
    for name, conv, bn in pairs:
        rows = masks[name]
        if not rows.any():
            continue
        for param in (conv.weight, conv.bias, bn.weight, bn.bias):
            if param is not None:
                trained.append(_TrainedTensor(param, None if rows.all() else rows.clone()))
    if train_other:
        in_pairs = {id(p) for _, conv, bn in pairs for p in (*conv.parameters(), *bn.parameters())}
        trained += [_TrainedTensor(p, None) for p in model.parameters() if id(p) not in in_pairs]
    if not trained:
        raise ValueError("masks select no filter (and train_other_parameters is False): nothing "
                         "to train; select at least one filter, e.g. with top_mass_filters")
    return trained


def _checked_masks(masks: dict[str, Tensor], pairs: list[ConvBnPair]) -> dict[str, Tensor]:
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


def _checked_source_stats(stats: dict[str, Tensor] | None) -> dict[str, Tensor]:
    if not isinstance(stats, dict) or not {"mean", "var"} <= set(stats):
        raise ValueError("loss 'feature_alignment' needs source_stats={'mean': (D,), 'var': (D,)}; "
                         f"got {type(stats).__name__}; compute it with feature_statistics(model, "
                         "source_x)")
    return {"mean": stats["mean"].detach(), "var": stats["var"].detach()}


def _check_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < MIN_BATCH \
            or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a float batch of shape (N>={MIN_BATCH}, ...) (BN needs two "
                         f"samples), got {shape}")


def _check_training(epochs: int, lr: float, momentum: float, weight_decay: float,
                    batch_size: int) -> None:
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not isinstance(batch_size, int) or batch_size < MIN_BATCH:
        raise ValueError(f"batch_size must be an int >= {MIN_BATCH} (BN batch statistics), got "
                         f"{batch_size!r}")


def _full_batch_loss(objective: _Objective, x: Tensor) -> float:
    """The loss on all of ``x`` at once, without gradients and without touching BN buffers."""
    objective.refresh(x)
    with torch.no_grad(), _frozen_buffers(objective.model):
        return float(objective(x, torch.arange(len(x))))


@contextmanager
def _retraining_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode except BN layers, which use batch statistics; the modes are restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.train()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


@contextmanager
def _frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BN running statistics, batch counters) on exit."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextmanager
def _only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad inside; every parameter's flag is restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
