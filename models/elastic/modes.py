"""How a model runs while ElasticDNN scores and retrains filters (seed 003, section III-B).

BN mode: while scoring and retraining, BN layers normalise with the *batch* statistics (train mode)
and every other module is in eval mode (no dropout); during retraining the BN running statistics
follow the target batches with the layer's own momentum, as SHOT's ``netF.train()`` does, so the
surrogate is ready for eval-mode inference afterwards. Scoring and loss evaluations leave buffers
untouched. Running statistics are buffers, not trained parameters: they move for every channel.
Batch statistics need at least :data:`MIN_BATCH` samples, which :func:`check_batch` enforces.
SHOT's pseudo-labels are the exception: SHOT computes them in eval mode (:func:`labelling_mode`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# BN in train mode cannot normalise one sample; SHOT skips batches of size 1 the same way.
MIN_BATCH = 2
# How SHOT's pseudo-labels normalise (see labelling_mode). "eval": running statistics, as
# tim-learn/SHOT's train_target (netF.eval() before obtain_label), the default. "batch": the
# labelled samples' own statistics; with ElasticDNN's 100 samples per domain (2 steps per epoch)
# the running statistics stay near the previous domain's for most of the epochs: on
# elasticdnn_digits (2 rounds) SHOT reached 0.809 / 0.886 with "batch", 0.695 / 0.699 with "eval"
# (0.706 / 0.83 unadapted).
SHOT_LABEL_MODES = ("eval", "batch")
SHOT_LABEL_MODE = "eval"


def check_batch(x: Tensor) -> None:
    """Require a float batch of at least :data:`MIN_BATCH` samples (BN batch statistics).

    Parameters
    ----------
    x : Tensor
        Model inputs, shape (N, ...).

    Raises
    ------
    ValueError
        If ``x`` is not a floating-point tensor of shape (N >= MIN_BATCH, ...).
    """
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < MIN_BATCH \
            or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a float batch of shape (N>={MIN_BATCH}, ...) (BN needs two "
                         f"samples), got {shape}")


@contextmanager
def retraining_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode except BN layers, which use batch statistics; the modes are restored on exit.

    Parameters
    ----------
    model : nn.Module
        The network; its modules' ``training`` flags are set inside and restored on exit.
    """
    with _modes(model, bn_batch_statistics=True):
        yield


@contextmanager
def labelling_mode(model: nn.Module, mode: str = SHOT_LABEL_MODE) -> Iterator[None]:
    """How SHOT's pseudo-labels normalise (:data:`SHOT_LABEL_MODES`); modes restored on exit.

    ``"eval"`` (SHOT's): every module in eval mode, BN on running statistics. tim-learn/SHOT
    ``train_target`` calls ``netF.eval(); netB.eval()`` (``netC`` is always in eval mode) before
    ``obtain_label`` and ``netF.train(); netB.train()`` after it, so the labels come from the
    running statistics that the training forwards have moved so far. ``"batch"``: as
    :func:`retraining_mode`, BN on the statistics of the labelled samples themselves.

    Parameters
    ----------
    model : nn.Module
        The network; its modules' ``training`` flags are set inside and restored on exit.
    mode : str
        One of :data:`SHOT_LABEL_MODES`.
    """
    check_label_mode(mode)
    with _modes(model, bn_batch_statistics=mode == "batch"):
        yield


def check_label_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`SHOT_LABEL_MODES`."""
    if mode not in SHOT_LABEL_MODES:
        raise ValueError(f"SHOT label mode is {mode!r}; use one of {SHOT_LABEL_MODES} ('eval': "
                         "running statistics, as SHOT)")


@contextmanager
def _modes(model: nn.Module, *, bn_batch_statistics: bool) -> Iterator[None]:
    """Eval mode, BN layers in train mode if ``bn_batch_statistics``; flags restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    if bn_batch_statistics:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.train()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BN running statistics, batch counters) on exit.

    Parameters
    ----------
    model : nn.Module
        The network whose buffers are saved on entry and copied back on exit.
    """
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
