"""LAME (Boudiaf et al., CVPR 2022; fiveai/LAME): Laplacian-adjusted maximum likelihood on outputs.

No parameter changes: each batch's softmax outputs are refined by a Laplacian-regularised assignment
over a kNN graph of the batch's (L2-normalised) penultimate features, solved by the concave-convex
bound updates ``Y <- softmax(log p + lambda * W Y)`` until the energy stops decreasing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.tta_base import OnlineAdapter

# fiveai/LAME configs (adaptation/LAME): AFFINITY knn, KNN 5, bound lambda 1, at most 100 bound
# updates, stop when the energy changes by <= 1e-8 relatively (laplacian_optimization).
LAME_KNN = 5
LAME_BOUND_LAMBDA = 1.0
LAME_MAX_STEPS = 100
LAME_TOLERANCE = 1e-8

FeaturesFn = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]


def penultimate_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(features, logits)`` of a model with ``.features`` and ``.classifier`` (e.g. SmallCNN, MLP)."""
    if not (hasattr(model, "features") and hasattr(model, "classifier")):
        raise ValueError(f"{type(model).__name__} has no .features/.classifier; pass "
                         "features_fn=lambda model, x: (feats, logits) to LAME")
    feats = model.features(x)
    return feats, model.classifier(feats)


def knn_affinity(features: Tensor, knn: int) -> Tensor:
    """Binary (N, N) kNN affinity: W[i, j] = 1 if j is among the ``knn`` nearest neighbours of i (j != i)."""
    n = features.shape[0]
    neighbours = min(knn + 1, n)
    nearest = torch.cdist(features, features).topk(neighbours, dim=1, largest=False).indices[:, 1:]
    affinity = torch.zeros(n, n, dtype=features.dtype, device=features.device)
    return affinity.scatter_(1, nearest, 1.0)


def laplacian_assignment(log_probs: Tensor, affinity: Tensor, bound_lambda: float = LAME_BOUND_LAMBDA,
                         max_steps: int = LAME_MAX_STEPS, tolerance: float = LAME_TOLERANCE) -> Tensor:
    """Log of LAME's refined assignment Y (rows sum to 1), from source log-probabilities and affinity.

    Minimises ``sum_i KL(y_i || p_i) - lambda * sum_ij W_ij y_i^T y_j`` (LAME, eq. 5-7) by bound updates.
    The unary term is ``-log p`` taken from ``log_softmax`` (the reference adds 1e-10 inside the log).
    """
    unary = -log_probs
    log_y = log_probs.clone()
    previous_energy = float("inf")
    for step in range(max_steps):
        y = log_y.exp()
        pairwise = bound_lambda * affinity.matmul(y)
        log_y = F.log_softmax(-unary + pairwise, dim=1)
        y = log_y.exp()
        energy = float((y * unary - pairwise * y + y * log_y).sum())
        if step > 1 and abs(energy - previous_energy) <= tolerance * abs(previous_energy):
            break
        previous_energy = energy
    return log_y


class LAME(OnlineAdapter):
    """LAME: output-only adaptation; returns log Y (valid logits: ``softmax(log Y) = Y``).

    Parameters
    ----------
    model : nn.Module
        The source network (eval mode, never updated).
    features_fn : callable
        ``features_fn(model, x) -> (features, logits)``; default :func:`penultimate_features`.
    knn, bound_lambda, max_steps, tolerance
        LAME's kNN graph and solver settings (defaults from fiveai/LAME).
    """

    def __init__(self, model: nn.Module, features_fn: FeaturesFn = penultimate_features,
                 knn: int = LAME_KNN, bound_lambda: float = LAME_BOUND_LAMBDA,
                 max_steps: int = LAME_MAX_STEPS, tolerance: float = LAME_TOLERANCE) -> None:
        super().__init__(model)
        if knn < 1:
            raise ValueError(f"knn must be >= 1, got {knn}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.features_fn = features_fn
        self.knn, self.bound_lambda = knn, bound_lambda
        self.max_steps, self.tolerance = max_steps, tolerance
        model.requires_grad_(False)
        model.eval()

    @torch.no_grad()
    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        self.model.eval()
        feats, logits = self.features_fn(self.model, x)
        feats = F.normalize(feats.flatten(1), p=2, dim=1)
        affinity = knn_affinity(feats, self.knn)
        return laplacian_assignment(logits.log_softmax(1), affinity, self.bound_lambda,
                                    self.max_steps, self.tolerance)
