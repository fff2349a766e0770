"""The unsupervised objective of ElasticDNN's filter scoring and retraining (seed 003, III-B).

:class:`RetrainingObjective` turns a loss name of :data:`LOSSES` (or a function of the logits)
into the loss of a batch of model inputs, forward pass included: information maximisation (the
paper's default), Tent's entropy, feature alignment against stored source statistics, or SHOT's
IM + pseudo-label cross-entropy. The losses themselves are in :mod:`models.losses` (entropy,
IM) and :mod:`models.elastic.losses` (feature alignment, SHOT).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.elastic.features import feature_layer, forward_with_features
from models.elastic.ledger import counted_block
from models.elastic.losses import feature_alignment, shot_loss, shot_pseudo_labels
from models.elastic.modes import SHOT_LABEL_MODE, check_label_mode, frozen_buffers, labelling_mode
from models.losses import entropy_loss, information_maximisation

# Loss names accepted by retrain_selected / adapt_full / filter_scores (paper: IM default).
LOSSES = ("im", "tent", "feature_alignment", "shot")


class RetrainingObjective:
    """The retraining loss of a batch of model inputs (forward pass included).

    Parameters
    ----------
    model : nn.Module
        The network being scored or retrained.
    loss : str or callable
        A name in :data:`LOSSES`, or a function of the logits returning a scalar loss.
    source_stats : dict, optional
        ``{"mean": (D,), "var": (D,)}`` of the source features; required by
        ``"feature_alignment"`` (see :func:`models.elastic.features.feature_statistics`).
    feature_module : str, optional
        Name of the module whose *input* is the feature vector; default: the last ``nn.Linear``.
    label_mode : str
        How SHOT's pseudo-labels normalise, one of
        :data:`~models.elastic.modes.SHOT_LABEL_MODES` (default ``"eval"``, as SHOT).
    """

    def __init__(self, model: nn.Module, loss: str | Callable[[Tensor], Tensor],
                 source_stats: dict[str, Tensor] | None, feature_module: str | None,
                 label_mode: str = SHOT_LABEL_MODE) -> None:
        check_label_mode(label_mode)
        self.model = model
        self.label_mode = label_mode
        self.logits_loss = loss if callable(loss) else None
        self.name = getattr(loss, "__name__", "custom") if callable(loss) else loss
        if self.logits_loss is None and loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES} or a function of logits")
        needs_features = self.name in ("feature_alignment", "shot") and self.logits_loss is None
        self.feature_layer = feature_layer(model, feature_module) if needs_features else None
        self.source_stats = _checked_source_stats(source_stats) \
            if self.name == "feature_alignment" and self.logits_loss is None else None
        self.pseudo_labels: Tensor | None = None

    def refresh(self, x: Tensor) -> None:
        """Recompute SHOT's pseudo-labels for all of ``x``; no-op for other losses.

        The network runs in :attr:`label_mode` (:func:`~models.elastic.modes.labelling_mode`;
        ``"eval"`` as SHOT's ``train_target``); modes and buffers are as they were afterwards.
        """
        if self.name != "shot" or self.logits_loss is not None:
            return
        with torch.no_grad(), frozen_buffers(self.model), \
                labelling_mode(self.model, self.label_mode):
            features, logits = forward_with_features(self.model, self.feature_layer, x)
        with counted_block():  # the centroid search's matrix products, outside the network
            self.pseudo_labels = shot_pseudo_labels(features, logits)

    def __call__(self, xb: Tensor, index: Tensor) -> Tensor:
        """The scalar loss of the batch ``xb``, whose rows are ``x[index]`` of the last refresh."""
        if self.logits_loss is not None:
            return self.logits_loss(self.model(xb))
        if self.name == "im":
            return information_maximisation(self.model(xb))
        if self.name == "tent":
            return entropy_loss(self.model(xb))
        features, logits = forward_with_features(self.model, self.feature_layer, xb)
        if self.name == "feature_alignment":
            return feature_alignment(features, self.source_stats["mean"], self.source_stats["var"])
        return shot_loss(logits, self.pseudo_labels[index])


def _checked_source_stats(stats: dict[str, Tensor] | None) -> dict[str, Tensor]:
    if not isinstance(stats, dict) or not {"mean", "var"} <= set(stats):
        raise ValueError("loss 'feature_alignment' needs source_stats={'mean': (D,), 'var': (D,)}; "
                         f"got {type(stats).__name__}; compute it with feature_statistics(model, "
                         "source_x)")
    return {"mean": stats["mean"].detach(), "var": stats["var"].detach()}
