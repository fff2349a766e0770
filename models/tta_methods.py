"""BN-based online test-time-adaptation baselines of CEMA: source, BN adapt, ONDA, PL, Tent, ETA.

All follow the online protocol of :class:`models.tta_base.OnlineAdapter` (predict, then adapt).
Baseline list and ETA's rule: CEMA (seed 000), "Baselines" in /work/shared/ALGORITHMS.md.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.tta_base import (
    BN_AFFINE_LR,
    BN_AFFINE_MOMENTUM,
    OnlineAdapter,
    bn_affine_sgd,
    gradient_step,
    require_batch_norm,
    softmax_entropy,
    train_only_bn_affine,
    use_test_batch_statistics,
)

# ONDA (Mancini et al., 2018) updates BN running statistics with an exponential moving average; the
# paper tunes it for its robot data, so this uses PyTorch's BN default momentum (house choice).
ONDA_MOMENTUM = 0.1
# Pseudo-labelling (Lee, 2013) trains on argmax labels; keeping only confident ones (max softmax >=
# threshold) follows FixMatch's 0.95-style confidence masking, softened to 0.9 (house choice).
PL_CONFIDENCE_THRESHOLD = 0.9
# EATA (Niu et al., ICML 2022; mr-eggplant/EATA main.py): E0 = 0.4 ln C, d_margin 0.05,
# moving average of kept softmaxes 0.9 old / 0.1 new (update_model_probs). CEMA uses them for ETA.
ETA_ENTROPY_FRACTION = 0.4
ETA_REDUNDANCY_MARGIN = 0.05
ETA_AVERAGE_DECAY = 0.9


class SourceModel(OnlineAdapter):
    """No adaptation: the source model in eval mode (the "Source" row of every TTA table)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        model.eval()

    @torch.no_grad()
    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        self.model.eval()
        return self.model(x)


class BatchNormAdapt(OnlineAdapter):
    """BN adaptation (Schneider et al., NeurIPS 2020, N=0): normalise with the test batch's statistics.

    No weight and no running statistic changes; only the forward pass differs from the source model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        require_batch_norm(model, "bn_adapt")
        model.requires_grad_(False)
        use_test_batch_statistics(model)

    @torch.no_grad()
    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        return self.model(x)


class OnlineBatchNorm(OnlineAdapter):
    """ONDA (Mancini et al., ICRA 2018): BN running statistics updated online with a momentum.

    The batch is predicted with the current running statistics (eval mode); then a second, gradient-free
    forward in BN train mode folds the batch's statistics into them:
    ``running = (1 - momentum) * running + momentum * batch``.

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers.
    momentum : float
        Weight of the new batch's statistics, in (0, 1] (default :data:`ONDA_MOMENTUM`).
    """

    def __init__(self, model: nn.Module, momentum: float = ONDA_MOMENTUM) -> None:
        super().__init__(model)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.bn_layers = require_batch_norm(model, "onda")
        self.momentum = momentum
        model.requires_grad_(False)
        model.eval()

    @torch.no_grad()
    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        self.model.eval()
        logits = self.model(x)
        for layer in self.bn_layers:
            layer.train()
            layer.momentum = self.momentum
        self.model(x)
        self.model.eval()
        return logits


class _BnAffineAdapter(OnlineAdapter):
    """Shared set-up of Tent, PL and ETA: test-batch BN statistics, SGD on the BN affine parameters."""

    method_name = "bn_affine"

    def __init__(self, model: nn.Module, lr: float, momentum: float) -> None:
        super().__init__(model)
        require_batch_norm(model, self.method_name)
        use_test_batch_statistics(model)
        self.optimizer = bn_affine_sgd(train_only_bn_affine(model), lr, momentum)

    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        logits = self.model(x)  # the prediction: one forward, before the step below
        loss = self._loss(logits)
        if loss is not None:
            gradient_step(self.optimizer, loss)
        return logits

    @abstractmethod
    def _loss(self, logits: Tensor) -> Tensor | None:
        """The method's loss on this batch's logits (None: no step)."""


class Tent(_BnAffineAdapter):
    """Tent (Wang et al., ICLR 2021): minimise the mean prediction entropy over the BN affine parameters.

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers.
    lr, momentum : float
        SGD settings; defaults are Tent's ImageNet setting for batch 64 (:data:`BN_AFFINE_LR`,
        :data:`BN_AFFINE_MOMENTUM`); for another batch size b pass
        ``lr=linear_scaled_lr(b)``.
    """

    method_name = "tent"

    def __init__(self, model: nn.Module, lr: float = BN_AFFINE_LR,
                 momentum: float = BN_AFFINE_MOMENTUM) -> None:
        super().__init__(model, lr, momentum)

    def _loss(self, logits: Tensor) -> Tensor:
        return softmax_entropy(logits).mean()


class PseudoLabel(_BnAffineAdapter):
    """Pseudo-labelling (Lee, 2013): cross-entropy on confident argmax labels, BN affine only (as Tent).

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers.
    threshold : float
        Keep samples whose max softmax >= threshold, in [0, 1] (default :data:`PL_CONFIDENCE_THRESHOLD`).
    lr, momentum : float
        SGD settings (Tent's, see :class:`Tent`).
    """

    method_name = "pl"

    def __init__(self, model: nn.Module, threshold: float = PL_CONFIDENCE_THRESHOLD,
                 lr: float = BN_AFFINE_LR, momentum: float = BN_AFFINE_MOMENTUM) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        super().__init__(model, lr, momentum)
        self.threshold = threshold

    def _loss(self, logits: Tensor) -> Tensor | None:
        confidence, labels = logits.detach().softmax(1).max(1)
        keep = confidence >= self.threshold
        if not keep.any():
            return None
        return F.cross_entropy(logits[keep], labels[keep])


def eta_keep_mask(logits: Tensor, moving_average: Tensor | None, entropy_margin: float,
                  redundancy_margin: float = ETA_REDUNDANCY_MARGIN) -> Tensor:
    """ETA's sample filter: reliable (E < E0) and non-redundant (|cos(m, p)| < margin) samples.

    EATA (Niu et al., ICML 2022), eq. 6 and 8; mr-eggplant/EATA ``forward_and_adapt_eata``. Without a
    moving average yet (the first batch) only the entropy filter applies.

    Parameters
    ----------
    logits : Tensor
        Shape (N, C).
    moving_average : Tensor or None
        Moving average m of previously kept softmaxes, shape (C,).
    entropy_margin : float
        E0 (EATA: 0.4 ln C).
    redundancy_margin : float
        Cosine-similarity margin (EATA's d_margin, default 0.05).

    Returns
    -------
    Tensor
        Boolean mask of shape (N,).
    """
    keep = softmax_entropy(logits) < entropy_margin
    if moving_average is not None:
        cosine = F.cosine_similarity(moving_average.unsqueeze(0), logits.softmax(1), dim=1)
        keep &= cosine.abs() < redundancy_margin
    return keep


class EntropyFilteredTent(_BnAffineAdapter):
    """ETA: EATA without the Fisher regulariser; weighted entropy on filtered samples, BN affine only.

    Loss = mean over kept samples of ``exp(E0 - E) * E`` (weight detached), kept = :func:`eta_keep_mask`.
    ``last_kept_mask`` holds the mask of the latest batch (CEMA's ``eta_upload`` baseline uploads those).

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers.
    num_classes : int
        C, for E0 = entropy_fraction * ln C.
    entropy_fraction, redundancy_margin, average_decay : float
        EATA's 0.4, d_margin 0.05 and the 0.9/0.1 moving average.
    lr, momentum : float
        SGD settings (CEMA's ETA: lr 2.5e-4, momentum 0.9).
    """

    method_name = "eta"

    def __init__(self, model: nn.Module, num_classes: int,
                 entropy_fraction: float = ETA_ENTROPY_FRACTION,
                 redundancy_margin: float = ETA_REDUNDANCY_MARGIN,
                 average_decay: float = ETA_AVERAGE_DECAY,
                 lr: float = BN_AFFINE_LR, momentum: float = BN_AFFINE_MOMENTUM) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0 < entropy_fraction <= 1:
            raise ValueError(f"entropy_fraction must be in (0, 1], got {entropy_fraction}")
        if not 0 <= average_decay < 1:
            raise ValueError(f"average_decay must be in [0, 1), got {average_decay}")
        super().__init__(model, lr, momentum)
        self.entropy_margin = entropy_fraction * math.log(num_classes)
        self.redundancy_margin = redundancy_margin
        self.average_decay = average_decay
        self.moving_average: Tensor | None = None
        self.last_kept_mask: Tensor | None = None

    def _loss(self, logits: Tensor) -> Tensor | None:
        keep = eta_keep_mask(logits.detach(), self.moving_average, self.entropy_margin,
                             self.redundancy_margin)
        self.last_kept_mask = keep
        if not keep.any():
            return None
        self._update_moving_average(logits.detach()[keep].softmax(1).mean(0))
        entropy = softmax_entropy(logits[keep])
        weight = torch.exp(self.entropy_margin - entropy.detach())
        return (weight * entropy).mean()

    def _update_moving_average(self, batch_mean: Tensor) -> None:
        if self.moving_average is None:
            self.moving_average = batch_mean
        else:
            decay = self.average_decay
            self.moving_average = decay * self.moving_average + (1 - decay) * batch_mean

    def _method_state(self) -> dict[str, Any]:
        return {"moving_average": self.moving_average, "last_kept_mask": self.last_kept_mask}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self.moving_average = state["moving_average"]
        self.last_kept_mask = state["last_kept_mask"]
