"""CoTTA (Wang et al., CVPR 2022; qinenergy/cotta): continual TTA with a mean teacher.

Per batch: the teacher (EMA of the student) predicts; if the source "anchor" model is not confident
on average, the teacher's prediction is averaged over augmented copies; the student (all parameters)
takes one step on the soft cross-entropy to the teacher; the teacher is updated by EMA; finally each
student weight is reset to its source value with a small probability (stochastic restore).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.tta_base import (
    OnlineAdapter,
    gradient_step,
    require_batch_norm,
    soft_cross_entropy,
    use_test_batch_statistics,
)

# qinenergy/cotta cifar10 config (cfgs/cifar10/cotta.yaml + cotta.py): Adam lr 1e-3 betas (0.9, 0.999),
# teacher EMA 0.999, restore probability 0.01, anchor confidence threshold 0.92, 32 augmentations.
COTTA_LR = 1e-3
COTTA_EMA = 0.999
COTTA_RESTORE_PROB = 0.01
COTTA_ANCHOR_THRESHOLD = 0.92
COTTA_AUGMENTATIONS = 32
# A reduced, tensor-only version of CoTTA's CIFAR augmentations (flip, affine translate, Gaussian noise
# std 0.005 from get_tta_transforms); colour jitter, rotation and blur are left out.
COTTA_MAX_SHIFT = 2
COTTA_NOISE_STD = 0.005


def augment(x: Tensor, rng: np.random.Generator, max_shift: int = COTTA_MAX_SHIFT,
            noise_std: float = COTTA_NOISE_STD) -> Tensor:
    """A random flip + shift (images, N x C x H x W) and Gaussian noise, drawn from ``rng``."""
    out = x
    if x.dim() == 4:
        flip = torch.from_numpy(rng.random(x.shape[0]) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], x.flip(-1), x)
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        padded = nn.functional.pad(out, (max_shift,) * 4, mode="replicate")
        h, w = x.shape[-2:]
        out = padded[..., max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]
    noise = torch.from_numpy(rng.standard_normal(x.shape)).to(x.dtype).to(x.device)
    return out + noise_std * noise


class CoTTA(OnlineAdapter):
    """CoTTA: returns the teacher's (possibly augmentation-averaged) logits, computed before updates.

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers; becomes the student.
    lr : float
        Adam learning rate of the student (default :data:`COTTA_LR`).
    ema, restore_prob, anchor_threshold : float
        Teacher EMA decay, stochastic-restore probability, anchor confidence threshold.
    n_augmentations : int
        Augmented copies averaged when the anchor is not confident.
    seed : int
        Seeds augmentations and restore masks: batch k draws from ``default_rng([seed, k])``.
    """

    def __init__(self, model: nn.Module, lr: float = COTTA_LR, ema: float = COTTA_EMA,
                 restore_prob: float = COTTA_RESTORE_PROB,
                 anchor_threshold: float = COTTA_ANCHOR_THRESHOLD,
                 n_augmentations: int = COTTA_AUGMENTATIONS, seed: int = 0) -> None:
        super().__init__(model)
        for name, value in (("ema", ema), ("restore_prob", restore_prob),
                            ("anchor_threshold", anchor_threshold)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if n_augmentations < 1:
            raise ValueError(f"n_augmentations must be >= 1, got {n_augmentations}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        require_batch_norm(model, "cotta")
        use_test_batch_statistics(model)
        model.requires_grad_(True)
        self.ema, self.restore_prob = ema, restore_prob
        self.anchor_threshold, self.n_augmentations, self.seed = anchor_threshold, n_augmentations, seed
        self.source_state = copy.deepcopy(model.state_dict())
        self.teacher = self._frozen_copy(model)
        self.anchor = self._frozen_copy(model)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))

    @staticmethod
    def _frozen_copy(model: nn.Module) -> nn.Module:
        twin = copy.deepcopy(model)
        twin.requires_grad_(False)
        return twin

    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        rng = np.random.default_rng([self.seed, self.batches_seen])
        teacher_logits = self._teacher_prediction(x, rng)
        gradient_step(self.optimizer, soft_cross_entropy(self.model(x), teacher_logits).mean())
        self._update_teacher()
        self._stochastic_restore(rng)
        return teacher_logits

    @torch.no_grad()
    def _teacher_prediction(self, x: Tensor, rng: np.random.Generator) -> Tensor:
        logits = self.teacher(x)
        anchor_confidence = self.anchor(x).softmax(1).max(1).values.mean()
        if anchor_confidence < self.anchor_threshold:
            augmented = [self.teacher(augment(x, rng)) for _ in range(self.n_augmentations)]
            logits = torch.stack(augmented).mean(0)
        return logits

    @torch.no_grad()
    def _update_teacher(self) -> None:
        for teacher_param, param in zip(self.teacher.parameters(), self.model.parameters()):
            teacher_param.mul_(self.ema).add_(param, alpha=1 - self.ema)

    @torch.no_grad()
    def _stochastic_restore(self, rng: np.random.Generator) -> None:
        for name, param in self.model.named_parameters():
            mask = torch.from_numpy(rng.random(tuple(param.shape)) < self.restore_prob)
            param.copy_(torch.where(mask.to(param.device), self.source_state[name], param))

    def _method_state(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "source": self.source_state}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.source_state = state["source"]
        self.anchor.load_state_dict(state["source"])
