"""ElasticDNN surrogate retraining: train only the selected filters with an unsupervised loss.

Seed 003, section III-B, "Surrogate DNN retraining": (1) one forward/backward on the target batch;
a filter's score is ``||dL/dgamma||_1 + ||dL/dbeta||_1`` of its BN channel; (2) rank every filter of
the network by score and train only the smallest top set covering 80% of the total score, with an
unsupervised loss (information maximisation by default). Works on any ``nn.Module`` whose Conv2d
layers are each followed (in registration order) by a BatchNorm2d of the same width.

This module holds the trainers (:func:`retrain_selected`, :func:`retrain_surrogate`,
:func:`adapt_full`) and their SGD defaults. The parts live next door:
scores and selection in :mod:`models.elastic.scores`, the loss of a batch in
:mod:`models.elastic.objective`, source feature statistics in :mod:`models.elastic.features`,
trained rows and gradient masking in :mod:`models.elastic.masks`, the BN modes in
:mod:`models.elastic.modes` (BN on batch statistics; running statistics follow the target batches
during retraining, as SHOT's ``netF.train()`` does; SHOT's pseudo-labels come from the network in
eval mode by default, as SHOT calls its ``obtain_label``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from models.elastic.footprint import optimizer_state_bytes
from models.elastic.masks import TrainedTensor, checked_masks, mask_gradients, trained_tensors
from models.elastic.modes import MIN_BATCH, SHOT_LABEL_MODE, check_batch, frozen_buffers, retraining_mode
from models.elastic.objective import RetrainingObjective
from models.elastic.scores import FILTER_MASS, conv_bn_pairs, filter_scores, top_mass_filters
from models.training import only_trainable

# ElasticDNN section IV, "Online DA settings": 100 unlabeled samples per target domain.
SAMPLES_PER_DOMAIN = 100
# SGD after SHOT (tim-learn/SHOT uda_digit.py train_target): momentum 0.9, Nesterov, weight decay
# 1e-3, batch 64. SHOT's lr 1e-2 (with poly decay over thousands of target samples) collapsed a
# 100-sample domain on digits; the paper searches every method's hyperparameters on its benchmark
# (IV, "Online DA settings"), and lr 1e-3 with 20 passes was the best of the grid for ElasticDNN
# and every baseline (python -m experiments.claims.elastic_tune; docs/RESULTS.md).
RETRAIN_LR = 1e-3
RETRAIN_MOMENTUM = 0.9
RETRAIN_NESTEROV = True
RETRAIN_WEIGHT_DECAY = 1e-3
RETRAIN_BATCH_SIZE = 64
# Passes over the domain's 100 samples (20 x 2 mini-batches = 40 SGD steps); searched as above.
RETRAIN_EPOCHS = 20


def retrain_selected(model: nn.Module, x: Tensor, *, masks: dict[str, Tensor], loss: str = "im",
                     epochs: int = RETRAIN_EPOCHS, lr: float = RETRAIN_LR,
                     momentum: float = RETRAIN_MOMENTUM,
                     weight_decay: float = RETRAIN_WEIGHT_DECAY,
                     batch_size: int = RETRAIN_BATCH_SIZE, seed: int = 0,
                     source_stats: dict[str, Tensor] | None = None,
                     feature_module: str | None = None,
                     train_other_parameters: bool = False,
                     shot_labels: str = SHOT_LABEL_MODE) -> dict[str, Any]:
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
        Network with conv-BN pairs (see :func:`~models.elastic.scores.conv_bn_pairs`); changed
        in place.
    x : Tensor
        The domain's unlabeled samples, shape (N >= 2, ...) (paper: :data:`SAMPLES_PER_DOMAIN`).
    masks : dict of str to Tensor
        Conv name -> bool mask (out_channels,) of filters to train (e.g.
        :func:`~models.elastic.scores.top_mass_filters`).
        Layers left out train nothing.
    loss : str
        One of :data:`~models.elastic.objective.LOSSES`: ``"im"`` (SHOT information
        maximisation, the paper's default), ``"tent"`` (entropy), ``"feature_alignment"`` (needs
        ``source_stats``), ``"shot"`` (IM + 0.3 * CE on SHOT pseudo-labels of all of ``x``,
        recomputed in ``shot_labels`` mode at the start of every epoch, as SHOT's
        ``train_target`` does every ``len(loader)`` iterations).
    epochs, lr, momentum, weight_decay, batch_size : int, float, float, float, int
        Passes over ``x`` and SGD settings (defaults: module constants, with sources).
    seed : int
        Seeds the mini-batch order (the only random draw).
    source_stats : dict, optional
        ``{"mean": (D,), "var": (D,)}`` of the source features
        (:func:`~models.elastic.features.feature_statistics`).
    feature_module : str, optional
        Name of the module whose *input* is the feature vector; default: the last ``nn.Linear``.
    train_other_parameters : bool
        Also train every parameter outside the conv-BN pairs, whole.
    shot_labels : str
        How loss ``"shot"`` computes its pseudo-labels, one of
        :data:`~models.elastic.modes.SHOT_LABEL_MODES`: ``"eval"`` (running statistics, as SHOT)
        or ``"batch"`` (the statistics of all of ``x``).

    Returns
    -------
    dict
        ``loss``, ``initial_loss`` / ``final_loss`` (full batch, before / after), ``loss_history``
        (one per step), ``steps``, ``trained_filters``, ``total_filters``, ``trained_fraction``,
        ``trained_parameters`` (elements), ``optimizer_state_bytes`` (the SGD momentum buffers
        torch kept: whole trained tensors, :func:`models.elastic.footprint.optimizer_state_bytes`)
        and ``wall_time_s`` (the training loop).
    """
    pairs = conv_bn_pairs(model)
    check_batch(x)
    _check_training(epochs, lr, momentum, weight_decay, batch_size)
    masks = checked_masks(masks, pairs)
    trained = trained_tensors(model, pairs, masks, train_other_parameters)
    objective = RetrainingObjective(model, loss, source_stats, feature_module, shot_labels)
    with retraining_mode(model), only_trainable(model, [t.param for t in trained]):
        initial = _full_batch_loss(objective, x)
        start = time.perf_counter()
        history, optimizer_bytes = _train(objective, x, trained, epochs=epochs, lr=lr, momentum=momentum,
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
        "optimizer_state_bytes": optimizer_bytes,
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


def _train(objective: RetrainingObjective, x: Tensor, trained: list[TrainedTensor], *,
           epochs: int, lr: float, momentum: float, weight_decay: float, batch_size: int,
           seed: int) -> tuple[list[float], int]:
    """The SGD loop; returns the loss of every step and the bytes of the optimizer's state."""
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
            mask_gradients(trained, weight_decay)
            optimizer.step()
            history.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    return history, optimizer_state_bytes(optimizer)


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


def _full_batch_loss(objective: RetrainingObjective, x: Tensor) -> float:
    """The loss on all of ``x`` at once, without gradients and without touching BN buffers."""
    objective.refresh(x)
    with torch.no_grad(), frozen_buffers(objective.model):
        return float(objective(x, torch.arange(len(x))))
