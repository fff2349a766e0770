"""Unsupervised losses on a network's predictions that several adaptation methods share.

Prediction entropy is the signal of Tent, ETA/EATA, CEMA's filter and distillation weights,
ElasticDNN's hardest sample and SHOT's information maximisation; one function computes it for
all of them (:func:`prediction_entropy`). Every function takes plain tensors (no model), so each
is checkable by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_logits(logits: Tensor) -> None:
    """Require a non-empty batch of class scores: shape (N >= 1, C >= 2).

    Raises
    ------
    ValueError
        Naming the shape received.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] < 1 \
            or logits.shape[1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (N>=1, C>=2), got {shape}")


def prediction_entropy(logits: Tensor, *, log_space: bool = False) -> Tensor:
    """Shannon entropy ``-sum_c p_c ln p_c`` of ``p = softmax(logits)``, one value per row.

    Tent (Wang et al., ICLR 2021, eq. 1) and the CEMA poster's ``E(x; w)``. Two evaluations of the
    same formula, which differ in the last bits, so each caller keeps the numbers of its reference:

    * ``log_space=False``: ``-(softmax(z) * log_softmax(z)).sum(1)``, DequanWang/tent
      ``softmax_entropy`` (Tent, PL, ETA, CoTTA's references; ElasticDNN's Tent and IM losses).
    * ``log_space=True``: ``p = exp(log p)`` with ``log p = log_softmax(z)`` clamped to the dtype's
      minimum (CEMA's filter and cloud steps, ElasticDNN's hardest sample). A ``-inf`` logit (a
      masked class) then contributes exactly 0 and no NaN reaches the gradient.

    Parameters
    ----------
    logits : Tensor, shape (B, C)
        Unnormalised class scores; B may be 0.
    log_space : bool
        Which evaluation (above).

    Returns
    -------
    Tensor, shape (B,)
        Entropy in nats.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (batch, classes), got {shape}; flatten extra dims")
    if not log_space:
        return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    log_p = logits.log_softmax(1).clamp(min=torch.finfo(logits.dtype).min)
    return -(log_p.exp() * log_p).sum(1)


def entropy_of_probabilities(p: Tensor) -> Tensor:
    """``-sum p log p`` over the last dim of probabilities ``p``, with ``0 log 0 = 0`` exactly.

    tim-learn/SHOT adds ``eps = 1e-5`` inside the log instead; the exact form moves the value by at
    most ``C * eps`` (``p log(1 + eps/p) <= eps``).
    """
    return -torch.special.xlogy(p, p).sum(-1)


def entropy_loss(logits: Tensor) -> Tensor:
    """Mean per-sample prediction entropy, Tent's loss (Wang et al. ICLR 2021, eq. 1).

    Parameters
    ----------
    logits : Tensor
        Shape (N >= 1, C >= 2).

    Returns
    -------
    Tensor
        Scalar ``(1/N) sum_i -sum_c p_ic log p_ic`` with ``p_i = softmax(logits_i)``.
    """
    check_logits(logits)
    return prediction_entropy(logits).mean()


def information_maximisation(logits: Tensor) -> Tensor:
    """SHOT's information-maximisation loss: mean entropy minus the entropy of the mean prediction.

    SHOT (Liang et al. 2020, eq. 2-3), as ElasticDNN section III-B Step 2 quotes it:
    ``L = -(1/v) sum_i sum_c p_ic log p_ic + sum_c pbar_c log pbar_c`` with ``pbar = mean_i p_i``.
    Minimising it makes each prediction confident (first term) and the batch's predictions diverse
    (second term). Its minimum is ``-ln C`` (confident one-hot predictions, classes balanced).
    The entropies are exact (``0 log 0 = 0``); tim-learn/SHOT takes ``log(p + 1e-5)``, which
    moves the value by at most ``C * 1e-5`` (``p log(1 + eps/p) <= eps``) and the gradient by
    far less (measured against SHOT's ``train_target``: tests/golden/test_shot.py).

    Parameters
    ----------
    logits : Tensor
        Shape (N >= 1, C >= 2).

    Returns
    -------
    Tensor
        The scalar loss.
    """
    check_logits(logits)
    mean_prediction = logits.softmax(1).mean(0)
    return entropy_loss(logits) - entropy_of_probabilities(mean_prediction)
