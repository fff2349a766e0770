"""Unsupervised losses for ElasticDNN's surrogate retraining (seed 003, section III-B, "Step 2").

The paper trains the selected filters with information maximisation (SHOT, its ref. [13];
:func:`models.losses.information_maximisation`) and names feature alignment (its ref. [8]) as the
alternative; Tent's entropy (ref. [9], :func:`models.losses.entropy_loss`) is its BN-tuning
baseline. Here: feature alignment, and SHOT's full objective (IM + pseudo-label cross-entropy)
with SHOT's centroid labelling. Every function takes plain tensors (no model), so each is
checkable by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.losses import check_logits, information_maximisation

# SHOT (Liang et al., ICML 2020; tim-learn/SHOT uda_digit.py / image_target.py): cls_par = 0.3,
# the weight of the pseudo-label cross-entropy next to the IM loss.
SHOT_PSEUDO_LABEL_WEIGHT = 0.3
# SHOT obtain_label: softmax-weighted centroids, then ``for round in range(1)`` hard re-assignment.
SHOT_REFINEMENT_ROUNDS = 1
# SHOT obtain_label divides centroid sums by ``1e-8 + weight sum`` (guards an empty cluster).
SHOT_CENTROID_EPSILON = 1e-8
# SHOT object/image_target.py obtain_label: a class is a candidate label only if more than
# ``--threshold`` (default 0) samples carry it (``labelset``; argmax labels in the soft round).
SHOT_LABELSET_THRESHOLD = 0


def feature_alignment(features: Tensor, source_mean: Tensor, source_var: Tensor) -> Tensor:
    """Distance between a target batch's per-channel feature mean/variance and stored source ones.

    ``L = mean_c (mu_t,c - mu_s,c)^2 + mean_c (var_t,c - var_s,c)^2``. The mean term is TTT++'s
    ``linear_mmd`` (Liu et al., NeurIPS 2021, vita-epfl/ttt-plus-plus ``utils/offline.py``); the
    variance term is the diagonal of TTT++'s ``coral`` covariance term, averaged over channels like
    the mean term (house simplification: no d x d covariance, so it scales to conv feature maps).
    Variances are unbiased (``n - 1``), as TTT++'s ``covariance``.

    Parameters
    ----------
    features : Tensor
        Shape (N, C) or (N, C, ...); extra dims (e.g. H, W) are pooled with the batch per channel.
        Needs at least 2 values per channel.
    source_mean, source_var : Tensor
        Shape (C,): the source domain's per-channel statistics (see
        ``models.elastic.features.feature_statistics``).

    Returns
    -------
    Tensor
        The scalar loss.
    """
    mean, var = channel_statistics(features)
    for label, stat in (("source_mean", source_mean), ("source_var", source_var)):
        if not isinstance(stat, Tensor) or stat.shape != mean.shape:
            shape = tuple(stat.shape) if isinstance(stat, Tensor) else type(stat).__name__
            raise ValueError(f"{label} must have shape {tuple(mean.shape)} (one value per feature "
                             f"channel), got {shape}")
    return (mean - source_mean).pow(2).mean() + (var - source_var).pow(2).mean()


def channel_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of (N, C, ...) features, pooled over all dims but C.

    Parameters
    ----------
    features : Tensor
        Shape (N, C) or (N, C, ...), with at least 2 values per channel.

    Returns
    -------
    tuple of Tensor
        ``(mean, var)``, each of shape (C,).
    """
    if not isinstance(features, Tensor) or features.dim() < 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must have shape (N, C, ...), got {shape}")
    per_channel = features.transpose(0, 1).reshape(features.shape[1], -1)
    if per_channel.shape[1] < 2:
        raise ValueError(f"features need >= 2 values per channel for a variance, got shape "
                         f"{tuple(features.shape)}; use a batch of at least 2 samples")
    return per_channel.mean(1), per_channel.var(1, unbiased=True)


def shot_pseudo_labels(features: Tensor, logits: Tensor, rounds: int = SHOT_REFINEMENT_ROUNDS,
                       threshold: int = SHOT_LABELSET_THRESHOLD) -> Tensor:
    """SHOT's self-supervised pseudo-labels: weighted k-means-style centroids, cosine distance.

    SHOT (Liang et al. 2020, eq. 4-6; tim-learn/SHOT ``object/image_target.py`` ``obtain_label``):
    append a constant 1 to every feature and L2-normalise it; class centroids
    ``c_k = sum_i p_ik f_i / (1e-8 + sum_i p_ik)`` (softmax weights); label = the nearest centroid
    by cosine distance; then ``rounds`` refinements with centroids from the hard labels. Only the
    classes held by more than ``threshold`` samples are candidates (SHOT's ``labelset``): in the
    soft round the classes of the samples' argmax predictions, in each refinement the classes
    of the previous labels, so an empty cluster never attracts a sample. Ties go to the lower
    class index (``argmin``). ``digit/uda_digit.py``'s ``obtain_label`` has no ``labelset``; it
    gives the same labels whenever every class is some sample's argmax and still holds a sample
    after the soft round (otherwise its empty centroid is 0, the cosine distances to it NaN, and
    numpy's ``argmin`` sends every sample to that class).

    Parameters
    ----------
    features : Tensor
        Shape (N, D): the features the classifier head reads (SHOT: bottleneck output).
    logits : Tensor
        Shape (N, C): the head's outputs for the same samples.
    rounds : int
        Hard-label refinement rounds (SHOT: 1).
    threshold : int
        A class needs more than this many samples to be a candidate (SHOT: 0).

    Returns
    -------
    Tensor
        Long tensor of shape (N,), labels in [0, C).
    """
    check_logits(logits)
    if not isinstance(features, Tensor) or features.dim() != 2 \
            or features.shape[0] != logits.shape[0]:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must have shape (N={logits.shape[0]}, D) to match the logits, "
                         f"got {shape}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    with torch.no_grad():
        ones = torch.ones(features.shape[0], 1, dtype=features.dtype)
        unit = F.normalize(torch.cat([features.detach(), ones], 1), dim=1)
        weights = logits.detach().softmax(1).to(unit.dtype)
        labels = logits.detach().argmax(1)
        for _ in range(rounds + 1):
            candidates = _labelset(labels, logits.shape[1], threshold)
            labels = _nearest_centroid(unit, weights, candidates)
            weights = F.one_hot(labels, logits.shape[1]).to(unit.dtype)
    return labels


def _labelset(labels: Tensor, classes: int, threshold: int) -> Tensor:
    """Mask of the classes held by more than ``threshold`` of ``labels`` (SHOT's ``labelset``)."""
    candidates = torch.bincount(labels, minlength=classes) > threshold
    if not candidates.any():
        raise ValueError(f"no class holds more than threshold={threshold} of the {len(labels)} "
                         "samples; lower the threshold")
    return candidates


def _nearest_centroid(unit: Tensor, weights: Tensor, candidates: Tensor) -> Tensor:
    """Label of the nearest (cosine) weighted centroid among the candidate classes."""
    centroids = weights.t() @ unit / (SHOT_CENTROID_EPSILON + weights.sum(0)[:, None])
    cosine = unit @ F.normalize(centroids, dim=1).t()
    distance = (1.0 - cosine).masked_fill(~candidates[None, :], float("inf"))
    return distance.argmin(1)


def shot_loss(logits: Tensor, pseudo_labels: Tensor,
              beta: float = SHOT_PSEUDO_LABEL_WEIGHT) -> Tensor:
    """SHOT's full objective: information maximisation + ``beta`` * cross-entropy on pseudo-labels.

    SHOT (Liang et al. 2020, eq. 7; tim-learn/SHOT ``train_target``: ``cls_par * CE + ent_par * IM``
    with ``cls_par = 0.3``, ``ent_par = 1``).

    Parameters
    ----------
    logits : Tensor
        Shape (N, C).
    pseudo_labels : Tensor
        Long tensor of shape (N,), e.g. from :func:`shot_pseudo_labels`.
    beta : float
        Weight of the cross-entropy term (SHOT: 0.3), >= 0.

    Returns
    -------
    Tensor
        The scalar loss.
    """
    check_logits(logits)
    if not isinstance(pseudo_labels, Tensor) or pseudo_labels.shape != logits.shape[:1] \
            or pseudo_labels.dtype != torch.long:
        raise ValueError(f"pseudo_labels must be a long tensor of shape ({logits.shape[0]},), got "
                         f"{getattr(pseudo_labels, 'dtype', type(pseudo_labels).__name__)} "
                         f"{tuple(getattr(pseudo_labels, 'shape', ()))}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return information_maximisation(logits) + beta * F.cross_entropy(logits, pseudo_labels)
