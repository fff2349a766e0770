"""Plain-torch local training and evaluation shared by the cloud and every edge handler."""

from __future__ import annotations

from collections.abc import Callable
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


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    seed: int,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
) -> float:
    """Train ``model`` in place with cross-entropy for ``settings.epochs`` epochs.

    Batches are drawn from a ``torch.Generator`` seeded with ``seed``, so the same call
    gives the same weights. ``extra_loss(model)``, read after each forward pass, is added
    to the loss (e.g. ECLM's load-balancing term). Returns the mean training loss of the
    last epoch (NaN when there is no data).
    """
    if len(x) == 0 or settings.epochs <= 0:
        return float("nan")
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = make_optimizer(model.parameters(), settings)
    scheduler = make_scheduler(optimizer, settings, settings.epochs * -(-len(x) // settings.batch_size))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = float("nan")
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(x), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            if len(idx) < 2 and count > 0:  # BatchNorm cannot train on one sample
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    return last


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
