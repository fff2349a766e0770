"""CoTTA (Wang et al., CVPR 2022; qinenergy/cotta): continual TTA with a mean teacher.

Per batch (``CoTTA.forward_and_adapt``): the teacher (EMA of the student) predicts; if the source
"anchor" model's mean confidence is below the anchor threshold, the teacher's prediction is the
average over augmented copies (:func:`models.tta.augment.cotta_augment`); the student takes one
step on the consistency loss to the teacher; the teacher moves by EMA; finally each student weight
and bias is reset to its source value with a small probability (stochastic restore). Every model
normalises with the batch's statistics. The optimiser, loss, anchor threshold and restore
probability depend on the dataset family (:mod:`models.tta.settings`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.batchnorm import use_test_batch_statistics
from models.tta.augment import PIXEL_MEAN, PIXEL_STD, cotta_augment
from models.tta.base import OnlineAdapter, gradient_step, make_optimizer, require_batch_norm
from models.tta.settings import COTTA_LOSSES, CROSS_ENTROPY

# qinenergy/cotta, both families: teacher EMA 0.999 (cifar cfgs OPTIM.MT, imagenet cotta.py) and 32
# augmented copies (forward_and_adapt's N = 32).
COTTA_EMA = 0.999
COTTA_AUGMENTATIONS = 32
#: CoTTA trains, EMAs and restores the parameters named so (``collect_params``, stochastic restore).
TRAINED_NAMES = ("weight", "bias")


def consistency_loss(student_logits: Tensor, teacher_logits: Tensor, loss: str) -> Tensor:
    """Per-sample loss of the student to the (detached) teacher.

    ``"ce"``: ``-sum softmax(t) log_softmax(s)`` (qinenergy/cotta ``cifar/cotta.py``);
    ``"symmetric"``: half that plus half ``-sum softmax(s) log_softmax(t)`` (``imagenet/cotta.py``).
    """
    teacher_logits = teacher_logits.detach()
    forward = -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)
    if loss == CROSS_ENTROPY:
        return forward
    return 0.5 * forward - 0.5 * (student_logits.softmax(1) * teacher_logits.log_softmax(1)).sum(1)


def trained_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(qualified name, parameter)`` of every parameter named weight or bias, in module order."""
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if name in TRAINED_NAMES:
                yield (f"{module_name}.{name}" if module_name else name), param


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The random source of batch ``index`` of an adapter seeded ``seed`` (independent of call order)."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, index]).integers(2**63)))


class CoTTA(OnlineAdapter):
    """CoTTA: returns the teacher's (possibly augmentation-averaged) logits, computed before the updates.

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers; becomes the student.
    optimizer : {"adam", "sgd", "nesterov"}
        The student's optimiser (:func:`models.tta.base.make_optimizer`).
    lr, restore_prob, anchor_threshold : float
        Step size, stochastic-restore probability, anchor confidence threshold.
    loss : {"ce", "symmetric"}
        :func:`consistency_loss`.
    ema : float
        Teacher EMA decay (:data:`COTTA_EMA`).
    augmentations : int
        Augmented copies averaged when the anchor is not confident (:data:`COTTA_AUGMENTATIONS`).
    seed : int
        Batch k draws its augmentations, then its restore masks, from ``batch_generator(seed, k)``.
    pixel_mean, pixel_std : float
        The input scaling the augmentations undo (:func:`models.tta.augment.cotta_augment`).
    """

    def __init__(self, model: nn.Module, optimizer: str, lr: float, restore_prob: float,
                 anchor_threshold: float, loss: str, ema: float = COTTA_EMA,
                 augmentations: int = COTTA_AUGMENTATIONS, seed: int = 0,
                 pixel_mean: float = PIXEL_MEAN, pixel_std: float = PIXEL_STD) -> None:
        super().__init__(model)
        for name, value in (("ema", ema), ("restore_prob", restore_prob), ("anchor_threshold", anchor_threshold)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if loss not in COTTA_LOSSES:
            raise ValueError(f"loss must be one of {COTTA_LOSSES}, got {loss!r}")
        if augmentations < 1:
            raise ValueError(f"augmentations must be >= 1, got {augmentations}")
        require_batch_norm(model, "cotta")
        use_test_batch_statistics(model)
        model.requires_grad_(True)
        self.ema, self.restore_prob, self.anchor_threshold, self.loss = ema, restore_prob, anchor_threshold, loss
        self.augmentations, self.seed = augmentations, seed
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.source_state = copy.deepcopy(model.state_dict())
        self.teacher = self._frozen_copy(model)
        self.anchor = self._frozen_copy(model)
        self.optimizer = make_optimizer(optimizer, [p for _, p in trained_parameters(model)], lr)

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        twin = copy.deepcopy(model)
        twin.requires_grad_(False)
        return twin

    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        return self.step(x, batch_generator(self.seed, self.batches_seen))

    def step(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """One CoTTA update on ``x``; returns the teacher's logits made before it.

        Random numbers come from ``generator``: the augmentations (when the anchor is not
        confident), then one uniform draw per trained parameter element for the restore masks.
        """
        student_logits = self.model(x)
        teacher_logits = self._teacher_prediction(x, generator)
        loss = consistency_loss(student_logits, teacher_logits, self.loss).mean(0)
        gradient_step(self.optimizer, loss)
        self._update_teacher()
        self._stochastic_restore(generator)
        return teacher_logits

    @torch.no_grad()
    def _teacher_prediction(self, x: Tensor, generator: torch.Generator) -> Tensor:
        anchor_confidence = self.anchor(x).softmax(1).max(1).values.mean(0)
        if anchor_confidence >= self.anchor_threshold:
            return self.teacher(x)
        augmented = [self.teacher(cotta_augment(x, generator, self.pixel_mean, self.pixel_std))
                     for _ in range(self.augmentations)]
        return torch.stack(augmented).mean(0)

    @torch.no_grad()
    def _update_teacher(self) -> None:
        for teacher_param, param in zip(self.teacher.parameters(), self.model.parameters()):
            teacher_param.copy_(self.ema * teacher_param + (1 - self.ema) * param)

    @torch.no_grad()
    def _stochastic_restore(self, generator: torch.Generator) -> None:
        for name, param in trained_parameters(self.model):
            mask = torch.rand(param.shape, generator=generator).to(param.device) < self.restore_prob
            param.copy_(torch.where(mask, self.source_state[name], param))

    def _method_state(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "source": self.source_state}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.source_state = state["source"]
        self.anchor.load_state_dict(state["source"])
