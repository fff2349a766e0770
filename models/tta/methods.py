"""Gradient-based online TTA baselines of CEMA on the BN affine parameters: Tent, PL, ETA; and the source model.

All follow the online protocol of :class:`models.tta.base.OnlineAdapter` (predict, then adapt).
Baseline list and ETA's rule: CEMA (seed 000), "Baselines" in ALGORITHMS.md. The optimiser and
step size depend on the dataset family (:mod:`models.tta.settings`); the adapters take them
explicitly and :func:`models.tta.registry.build_adapter` fills them in for a family.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.batchnorm import train_only_bn_affine, use_test_batch_statistics
from models.losses import prediction_entropy
from models.tta.base import OnlineAdapter, gradient_step, make_optimizer, require_batch_norm
from models.tta.settings import SGD

# Pseudo-labelling as CEMA runs it (chenyaofo/CEMA codebase/core/tta/pl.py at 9a6ef17 and
# conf/pl.conf): cross-entropy on every argmax label, SGD momentum 0.9, lr 1e-3, in both families
# (no reference configures PL for CIFAR). A confidence threshold is an option (fiveai/LAME's
# PseudoLabeller keeps max softmax > 0.9); 0 keeps every sample.
PL_THRESHOLD = 0.0
PL_OPTIMIZER = SGD
PL_LR = 1e-3
# EATA (Niu et al., ICML 2022; mr-eggplant/EATA main.py --e_margin ln(1000) * 0.40, i.e. E0 = 0.4 ln C,
# as test-time-adaptation's EATA.MARGIN_E0); moving average of kept softmaxes 0.9 old / 0.1 new
# (eata.py update_model_probs).
ETA_ENTROPY_FRACTION = 0.4
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


class _BnAffineAdapter(OnlineAdapter):
    """Shared set-up of Tent, PL and ETA: test-batch BN statistics, a step on the BN affine parameters.

    The reference code (DequanWang/tent ``configure_model``/``collect_params``, mr-eggplant/EATA,
    chenyaofo/CEMA ``prepare_model_for_tent_tta``) normalises with the batch statistics in every
    forward and optimises only the BN weights and biases.
    """

    method_name = "bn_affine"

    def __init__(self, model: nn.Module, optimizer: str, lr: float) -> None:
        super().__init__(model)
        require_batch_norm(model, self.method_name)
        use_test_batch_statistics(model)
        self.optimizer = make_optimizer(optimizer, train_only_bn_affine(model), lr)

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

    DequanWang/tent ``forward_and_adapt``: ``loss = softmax_entropy(outputs).mean(0)``, one step per batch.

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers.
    optimizer : {"adam", "sgd", "nesterov"}
        :func:`models.tta.base.make_optimizer` kind (reference per family: :mod:`models.tta.settings`).
    lr : float
        Step size.
    """

    method_name = "tent"

    def _loss(self, logits: Tensor) -> Tensor:
        return prediction_entropy(logits).mean()


class PseudoLabel(_BnAffineAdapter):
    """Pseudo-labelling (Lee, 2013): cross-entropy to the argmax labels, on the BN affine parameters.

    chenyaofo/CEMA ``PL.infer``: ``CrossEntropyLoss()(outputs, argmax(outputs))`` over the whole batch.
    With ``threshold > 0`` only samples whose max softmax exceeds it count (fiveai/LAME's
    ``PseudoLabeller`` rule, ``max_prob > threshold``); no step when none does.

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers.
    threshold : float
        In [0, 1); default :data:`PL_THRESHOLD` (every sample).
    optimizer, lr
        Default :data:`PL_OPTIMIZER`, :data:`PL_LR` (chenyaofo/CEMA ``conf/pl.conf``).
    """

    method_name = "pl"

    def __init__(self, model: nn.Module, threshold: float = PL_THRESHOLD, optimizer: str = PL_OPTIMIZER,
                 lr: float = PL_LR) -> None:
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        super().__init__(model, optimizer, lr)
        self.threshold = threshold

    def _loss(self, logits: Tensor) -> Tensor | None:
        confidence, labels = logits.detach().softmax(1).max(1)
        keep = confidence > self.threshold
        if not keep.any():
            return None
        return F.cross_entropy(logits[keep], labels[keep])


def eta_keep_mask(logits: Tensor, moving_average: Tensor | None, entropy_margin: float,
                  d_margin: float) -> Tensor:
    """ETA's sample filter: reliable (E < E0) and non-redundant (|cos(m, p)| < d) samples.

    EATA (Niu et al., ICML 2022), eq. 6 and 8; mr-eggplant/EATA ``forward_and_adapt_eata``. Without a
    moving average yet (the first batch) only the entropy filter applies.

    Parameters
    ----------
    logits : Tensor
        Shape (N, C).
    moving_average : Tensor or None
        Moving average m of previously kept softmaxes, shape (C,).
    entropy_margin : float
        E0 in nats (EATA: 0.4 ln C).
    d_margin : float
        Cosine-similarity margin (EATA's ``d_margin``; reference per family: :mod:`models.tta.settings`).

    Returns
    -------
    Tensor
        Boolean mask of shape (N,).
    """
    keep = prediction_entropy(logits) < entropy_margin
    if moving_average is not None:
        cosine = F.cosine_similarity(moving_average.unsqueeze(0), logits.softmax(1), dim=1)
        keep &= cosine.abs() < d_margin
    return keep


class EntropyFilteredTent(_BnAffineAdapter):
    """ETA: EATA without the Fisher regulariser; weighted entropy on filtered samples, BN affine only.

    Loss = mean over kept samples of ``exp(E0 - E) * E`` (weight detached), kept = :func:`eta_keep_mask`
    (mr-eggplant/EATA ``forward_and_adapt_eata`` with ``fishers=None``). ``last_kept_mask`` holds the
    mask of the latest batch (CEMA's ``eta_upload`` baseline uploads those).

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers.
    num_classes : int
        C, for E0 = entropy_fraction * ln C.
    optimizer, lr
        As :class:`Tent` (reference per family: :mod:`models.tta.settings`).
    d_margin : float
        Redundancy margin on |cos| (reference per family: :mod:`models.tta.settings`).
    entropy_fraction, average_decay : float
        EATA's 0.4 (:data:`ETA_ENTROPY_FRACTION`) and 0.9/0.1 moving average (:data:`ETA_AVERAGE_DECAY`).
    """

    method_name = "eta"

    def __init__(self, model: nn.Module, num_classes: int, optimizer: str, lr: float, d_margin: float,
                 entropy_fraction: float = ETA_ENTROPY_FRACTION,
                 average_decay: float = ETA_AVERAGE_DECAY) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0 < entropy_fraction <= 1:
            raise ValueError(f"entropy_fraction must be in (0, 1], got {entropy_fraction}")
        if not d_margin > 0:
            raise ValueError(f"d_margin must be > 0, got {d_margin}")
        if not 0 <= average_decay < 1:
            raise ValueError(f"average_decay must be in [0, 1), got {average_decay}")
        super().__init__(model, optimizer, lr)
        self.entropy_margin = entropy_fraction * math.log(num_classes)
        self.d_margin = d_margin
        self.average_decay = average_decay
        self.moving_average: Tensor | None = None
        self.last_kept_mask: Tensor | None = None

    def _loss(self, logits: Tensor) -> Tensor | None:
        keep = eta_keep_mask(logits.detach(), self.moving_average, self.entropy_margin, self.d_margin)
        self.last_kept_mask = keep
        if not keep.any():
            return None
        self._update_moving_average(logits.detach()[keep].softmax(1).mean(0))
        entropy = prediction_entropy(logits[keep])
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
