"""What CEMA's cloud does with the uploads of one edge batch (official ``CEMA.infer``, cloud part).

For every edge batch (one stream batch of one device, whatever it uploaded, possibly nothing)
the official code (chenyaofo/CEMA ``codebase/core/tta/cema.py``):

1. adds ALL the batch's uploads to the FIFO history (:class:`models.cema.cloud.ReplayBuffer`,
   trimmed to its capacity) and to the cloud buffer of samples not yet used (``pending``);
2. while the cloud buffer holds a cloud batch (32): adapts the foundation model on it, then
   distils the edge model on it, joined by ``3 x 32`` samples replayed from the history once
   the history holds at least 256 (:data:`models.cema.cloud.REPLAY_MIN_SIZE`);
3. if no cloud batch was filled and the history holds MORE than 256 samples: distils the edge
   model on ``4 x 32`` replayed samples alone (no foundation step).

Replay draws are uniform without replacement (official ``random.sample``), made by the
student's own generator (:meth:`models.cema.cloud.ReplayBuffer.sample`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models.cema.cloud import (
    CLOUD_BATCH_SIZE,
    REPLAY_FACTOR,
    REPLAY_MIN_SIZE,
    REPLAY_ONLY_FACTOR,
    ReplayBuffer,
    adapt_foundation,
    distill,
)
from models.cema.tbr import BN_MODES, TBR


@dataclass
class Teacher:
    """The foundation model and its SGD (:func:`models.cema.cloud.bn_sgd`, lr 2.5e-4)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class Student:
    """One edge model the cloud distils, with what it carries from one edge batch to the next.

    Attributes
    ----------
    model : nn.Module
        The edge network.
    optimizer : torch.optim.Optimizer
        SGD on its BN affine parameters (lr 2.5e-3).
    buffer : ReplayBuffer
        The history of uploads it learns from.
    rng : np.random.Generator
        Its replay draws.
    pending : Tensor or None
        Uploads that did not fill a cloud batch yet (official ``cloud_buffer``).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    buffer: ReplayBuffer
    rng: np.random.Generator
    pending: torch.Tensor | None = None


@dataclass(frozen=True)
class CloudSettings:
    """How the cloud steps run (defaults: the official conf ``conf/cema.conf``).

    Attributes
    ----------
    e0 : float
        ``E_max^0 = e_max ln C``, the loss weights' reference entropy.
    bn : {"tbr", "batch"}
        BatchNorm mode of both models (:mod:`models.cema.tbr`; official ``is_tbr: true``).
    batch_size : int
        Uploaded samples per cloud step (official ``batch_size: 32``).
    replay_min_size, replay_factor, replay_only_factor : int
        See :data:`models.cema.cloud.REPLAY_MIN_SIZE` and the factors beside it.
    """

    e0: float
    bn: str = TBR
    batch_size: int = CLOUD_BATCH_SIZE
    replay_min_size: int = REPLAY_MIN_SIZE
    replay_factor: int = REPLAY_FACTOR
    replay_only_factor: int = REPLAY_ONLY_FACTOR

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise ValueError(f"bn={self.bn!r}; choose one of {BN_MODES} (algorithm.cema.tbr true/false)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}; use at least 1 sample per cloud step")
        largest = max(self.replay_factor, self.replay_only_factor) * self.batch_size
        if largest > self.replay_min_size:
            raise ValueError(
                f"a step replays up to {largest} samples but replay starts at {self.replay_min_size} held; "
                "lower the batch size or the replay factors so a draw always fits the history"
            )


@dataclass
class EdgeBatchSteps:
    """What the cloud did for one edge batch.

    Attributes
    ----------
    cloud_steps : int
        Foundation + distillation steps on new samples.
    replay_steps : int
        Distillation steps on replayed samples alone (0 or 1).
    teacher_predictions : list of Tensor
        Per cloud step, the teacher's classes for that step's new samples, in upload order.
    losses : list of float
        The distillation loss of every step, in order.
    """

    cloud_steps: int = 0
    replay_steps: int = 0
    teacher_predictions: list[torch.Tensor] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def process_edge_batch(
    teacher: Teacher, student: Student, uploads: torch.Tensor, settings: CloudSettings
) -> EdgeBatchSteps:
    """Run the cloud's part of one edge batch (module docstring, steps 1-3).

    Parameters
    ----------
    teacher : Teacher
        The foundation model (adapted in place).
    student : Student
        The edge model and its history, generator and pending uploads (updated in place).
    uploads : Tensor, shape (k, ...)
        The edge batch's uploaded samples, model inputs; ``k`` may be 0.
    settings : CloudSettings
        Loss reference entropy, BN mode, batch size and replay rules.
    """
    steps = EdgeBatchSteps()
    uploads = uploads.contiguous()  # one memory layout, so a restored checkpoint computes bit for bit alike
    if len(uploads):
        student.buffer.add(uploads)
        pool = uploads if student.pending is None else torch.cat([student.pending, uploads])
    else:
        pool = student.pending
    size = settings.batch_size
    while pool is not None and len(pool) >= size:
        x, pool = pool[:size], pool[size:]
        adapt_foundation(teacher.model, x, settings.e0, teacher.optimizer, settings.bn)
        batch = x
        if len(student.buffer) >= settings.replay_min_size:
            batch = torch.cat([x, student.buffer.sample(settings.replay_factor * size, student.rng)])
        step = distill(student.model, teacher.model, batch, student.optimizer, settings.e0, settings.bn)
        steps.cloud_steps += 1
        steps.teacher_predictions.append(step.teacher_logits[:size].argmax(dim=1))
        steps.losses.append(step.loss)
    student.pending = pool
    if steps.cloud_steps == 0 and len(student.buffer) > settings.replay_min_size:
        batch = student.buffer.sample(settings.replay_only_factor * size, student.rng)
        step = distill(student.model, teacher.model, batch, student.optimizer, settings.e0, settings.bn)
        steps.losses.append(step.loss)
        steps.replay_steps = 1
    return steps
