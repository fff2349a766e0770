"""CEMA's cloud steps: replay buffer, foundation adaptation, entropy distillation.

One cloud step on a batch of uploaded samples (CEMA poster, "Replay-based Knowledge
Distillation"; official code chenyaofo/CEMA ``codebase/core/tta/cema.py`` ``CEMA.infer`` and
``codebase/criterion/distillation.py``):

1. :func:`adapt_foundation`: the foundation model minimises its entropy weighted by
   ``exp(E0 - E)``, its BN layers in train mode;
2. :func:`distill`: the edge model (student) learns from the foundation model (teacher, BN in
   eval mode, no gradient) on the batch with :func:`distillation_loss`, its BN in train mode.

Which samples a step sees (new ones, replayed ones from the FIFO :class:`ReplayBuffer`) is
decided per edge batch by :mod:`models.cema.edge_batch`. Only BatchNorm affine parameters
train (:func:`models.batchnorm.bn_affine_parameters`). How BN normalises is :mod:`models.cema.tbr`'s ``bn``
mode: TBR (official default) or batch statistics. ``E0`` is the fixed
``E_max^0 = e_max ln C`` (official ``E_max=self.ent_high_margin``), not the edge's dynamic
threshold.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.batchnorm import bn_affine_parameters
from models.cema.tbr import TBR, bn_mode
from models.losses import prediction_entropy
from models.training import only_trainable

#: Replay buffer capacity (official conf ``replay_buffer_size: 10000``).
REPLAY_CAPACITY = 10_000
#: Replay joins the new samples once the buffer holds this many (official: ``len(history) < 256``
#: means no replay); an edge batch that fills no cloud batch distils on replayed samples alone
#: once the buffer holds MORE than this (official ``len(self.history_buffer) > 256``).
REPLAY_MIN_SIZE = 256
#: Replayed samples per cloud batch joining the new ones (official ``k=self.batch_size*3``).
REPLAY_FACTOR = 3
#: Replayed samples per cloud batch of a replay-only step (official ``k=self.batch_size*4``).
REPLAY_ONLY_FACTOR = 4
#: Cloud batch of uploaded samples per step (official conf ``batch_size: 32``).
CLOUD_BATCH_SIZE = 32
#: Foundation (teacher) SGD learning rate (official conf ``t_tta_lr: 0.00025``).
FOUNDATION_LR = 2.5e-4
#: Edge (student) SGD learning rate (official conf ``s_tta_lr: 0.0025``).
EDGE_LR = 2.5e-3
#: SGD momentum for both models (official ``optim.SGD(..., momentum=0.9)``).
SGD_MOMENTUM = 0.9
#: Distillation weights and temperature (official conf alpha, beta, gamma, temperature).
ENT_WEIGHT, KL_WEIGHT, CE_WEIGHT, TEMPERATURE = 3.0, 3.0, 1.0, 1.0


class ReplayBuffer:
    """FIFO store of uploaded samples; the oldest leave first once ``capacity`` is reached.

    Parameters
    ----------
    capacity : int
        Most samples held (official 10,000).
    """

    def __init__(self, capacity: int = REPLAY_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity={capacity}; a replay buffer needs room for at least 1 sample")
        self.capacity = capacity
        self._items: deque[torch.Tensor] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, x: torch.Tensor) -> None:
        """Append the samples of batch ``x`` (shape (B, ...)) in order, evicting the oldest."""
        self._items.extend(t.detach().clone() for t in x.unbind(dim=0))

    def state_dict(self) -> dict:
        """``capacity`` and the held samples stacked oldest first (``items``: None when empty)."""
        items = torch.stack(list(self._items)) if self._items else None
        return {"capacity": self.capacity, "items": items}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; the capacity must match."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"state holds a buffer of capacity {state['capacity']}, this one has {self.capacity}; "
                "build the buffer with the same capacity"
            )
        items = state["items"]
        self._items = deque([] if items is None else [t.clone() for t in items.unbind(dim=0)], maxlen=self.capacity)

    def sample(self, n: int, generator: np.random.Generator) -> torch.Tensor:
        """``n`` distinct held samples drawn uniformly by ``generator`` (official ``random.sample``)."""
        if not 1 <= n <= len(self):
            raise ValueError(f"cannot sample n={n} from a buffer holding {len(self)}; use 1 <= n <= len(buffer)")
        picks = generator.choice(len(self), size=n, replace=False)
        return torch.stack([self._items[int(i)] for i in picks])


def bn_sgd(model: nn.Module, lr: float, momentum: float = SGD_MOMENTUM) -> torch.optim.SGD:
    """SGD over ``model``'s BN affine parameters (lr :data:`FOUNDATION_LR` or :data:`EDGE_LR`)."""
    return torch.optim.SGD(bn_affine_parameters(model), lr=lr, momentum=momentum)


def entropy_weight(logits: torch.Tensor, e0: float) -> torch.Tensor:
    """Detached sample weight ``exp(E0 - E)`` (official ``1 / exp(E - E_max)``)."""
    return torch.exp(e0 - prediction_entropy(logits.detach(), log_space=True))


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    e0: float,
    a: float = ENT_WEIGHT,
    b: float = KL_WEIGHT,
    c: float = CE_WEIGHT,
    temperature: float = TEMPERATURE,
) -> torch.Tensor:
    """CEMA's selective entropy distillation loss (poster eq.; official ``TTADistillationLoss``).

    ``mean(a w_s ENT(s) + b w_t T^2 KL(p_t^T || p_s^T) + c w_t CE(s, argmax t))`` with
    ``w_s = exp(E0 - ENT(s))`` and ``w_t = exp(E0 - ENT(t))``, both detached.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor, shape (B, C)
        Edge and foundation outputs on the same samples (the teacher gets no gradient).
    e0 : float
        ``E_max^0 = 0.4 ln C``.
    a, b, c, temperature : float
        Weights of the entropy, KL and pseudo-label CE terms, and the KL temperature.

    Returns
    -------
    Tensor
        Scalar loss averaged over the batch.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must both be (B, C) with the same shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}; use a temperature > 0 (official 1)")
    teacher_logits = teacher_logits.detach()
    w_s, w_t = entropy_weight(student_logits, e0), entropy_weight(teacher_logits, e0)
    ent = prediction_entropy(student_logits, log_space=True)
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.softmax(teacher_logits / temperature, dim=-1),
        reduction="none",
    ).sum(dim=-1) * temperature**2
    ce = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1), reduction="none")
    return (a * w_s * ent).mean() + (b * w_t * kl).mean() + (c * w_t * ce).mean()


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def adapt_foundation(
    model: nn.Module, x: torch.Tensor, e0: float, optimizer: torch.optim.Optimizer, bn: str = TBR
) -> float:
    """One weighted entropy-minimisation step of the foundation model on uploaded ``x``.

    Loss ``mean(exp(E0 - E) * E)`` with the weight detached (official ``CEMA.infer`` step 1),
    BN layers in train mode in mode ``bn`` (:func:`models.cema.tbr.bn_mode`). Only the
    parameters of ``optimizer`` (:func:`bn_sgd`, lr :data:`FOUNDATION_LR`) receive gradients.
    Returns the loss value.
    """
    with only_trainable(model, _optimizer_params(optimizer)), bn_mode(model, bn, train=True):
        ents = prediction_entropy(model(x), log_space=True)
        loss = (torch.exp(e0 - ents.detach()) * ents).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach())


class Distilled(NamedTuple):
    """What one distillation step computed.

    Attributes
    ----------
    loss : float
        :func:`distillation_loss` before the update.
    teacher_logits, student_logits : Tensor, shape (B, C)
        Both models' outputs on the step's batch (before the update, detached).
    """

    loss: float
    teacher_logits: torch.Tensor
    student_logits: torch.Tensor


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    e0: float,
    bn: str = TBR,
    **loss_weights: float,
) -> Distilled:
    """One distillation step of the edge model on ``batch`` (official ``CEMA.infer`` step 2).

    The teacher runs without gradients, its BN layers in eval mode; the student's BN layers
    run in train mode; both in BN mode ``bn`` (:func:`models.cema.tbr.bn_mode`; official
    ``set_bn_training_mode(foundation, False)``, ``set_bn_training_mode(edge, True)``).
    ``optimizer`` (:func:`bn_sgd`, lr :data:`EDGE_LR`) decides which student parameters
    train; ``loss_weights`` go to :func:`distillation_loss`.
    """
    with torch.no_grad(), bn_mode(teacher, bn, train=False):
        teacher_logits = teacher(batch)
    with only_trainable(student, _optimizer_params(optimizer)), bn_mode(student, bn, train=True):
        student_logits = student(batch)
        loss = distillation_loss(student_logits, teacher_logits, e0, **loss_weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Distilled(float(loss.detach()), teacher_logits, student_logits.detach())
