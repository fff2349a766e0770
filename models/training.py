"""Plain-torch local training and evaluation shared by the cloud and every edge handler."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainSettings:
    """How one local training pass runs (ECLM 7.1 defaults live in the run config)."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9
    schedule: str = "constant"  # constant | onecycle (Smith & Topor 2019: lr warms up, then anneals)


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    """Build the optimizer named in ``settings`` over ``params``."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}; choose 'adam' or 'sgd'")


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, steps: int):
    """The learning-rate schedule named in ``settings`` (None for a constant rate)."""
    if settings.schedule == "constant":
        return None
    if settings.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=max(steps, 1))
    raise ValueError(f"unknown schedule {settings.schedule!r}; choose 'constant' or 'onecycle'")


def run_epochs(
    model: nn.Module,
    num_samples: int,
    settings: TrainSettings,
    seed: int,
    step: Callable[[torch.Tensor], float],
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """The mini-batch loop every training pass shares: seeded batches, optimizer, schedule.

    Each of ``settings.epochs`` epochs visits the ``num_samples`` samples in an order drawn
    from a ``torch.Generator`` seeded with ``seed`` (the same call gives the same weights),
    ``settings.batch_size`` at a time. A one-sample batch is skipped, since BatchNorm cannot
    train on one sample, unless nothing was trained yet in the epoch. Per batch the
    gradients are cleared, ``step(idx)`` computes the loss of the samples ``idx``,
    back-propagates it and returns its value, then the optimizer and the schedule
    (:func:`make_scheduler`, one step per batch) step. ``model`` is put in training mode.

    Parameters
    ----------
    model : nn.Module
        The network whose parameters the optimizer (:func:`make_optimizer`) updates.
    num_samples : int
        Samples in the training set; ``step`` receives indices into it.
    settings : TrainSettings
        Epochs, batch size, optimizer and schedule.
    seed : int
        Seed of the batch order.
    step : callable
        ``idx -> loss value``: forward and backward pass on the batch ``idx``.
    on_epoch : callable or None
        ``(epoch, mean loss) -> None``, called after each epoch (epochs count from 0), e.g.
        to show progress; it sees the loss only and changes no draw or weight.

    Returns
    -------
    float
        Mean of the step values over the last epoch's trained samples; NaN without
        samples or epochs.
    """
    if num_samples == 0 or settings.epochs <= 0:
        return float("nan")
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = make_optimizer(model.parameters(), settings)
    scheduler = make_scheduler(optimizer, settings, settings.epochs * -(-num_samples // settings.batch_size))
    model.train()
    last = float("nan")
    for epoch in range(settings.epochs):
        order = torch.randperm(num_samples, generator=generator)
        total, count = 0.0, 0
        for start in range(0, num_samples, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            if len(idx) < 2 and count > 0:  # BatchNorm cannot train on one sample
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = step(idx)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += loss * len(idx)
            count += len(idx)
        last = total / max(count, 1)
        if on_epoch is not None:
            on_epoch(epoch, last)
    return last


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    seed: int,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """Train ``model`` in place with cross-entropy for ``settings.epochs`` epochs.

    Batches come from :func:`run_epochs` (seeded by ``seed``, so the same call gives the
    same weights). ``extra_loss(model)``, read after each forward pass, is added to the
    loss (e.g. ECLM's load-balancing term). ``on_epoch(epoch, mean loss)`` is called after
    each epoch (:func:`run_epochs`). Returns the mean training loss of the last epoch (NaN
    when there is no data).
    """
    loss_fn = nn.CrossEntropyLoss()

    def step(idx: torch.Tensor) -> float:
        loss = loss_fn(model(x[idx]), y[idx])
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        return float(loss.detach())

    return run_epochs(model, len(x), settings, seed, step, on_epoch)


@contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Only ``params`` require grad inside the block; every parameter's flag is restored on exit.

    Methods that adapt part of a network (BN affine parameters, selected filters) freeze the rest
    this way, so gradients are neither computed nor stored for the frozen parameters.

    Parameters
    ----------
    model : nn.Module
        The network.
    params : list of nn.Parameter
        Parameters of ``model`` that require grad inside the block.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (NaN for an empty set)."""
    if len(x) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct / len(x)
