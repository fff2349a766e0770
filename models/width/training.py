"""How a device trains and evaluates a width-scaled sub-model (HeteroFL, Diao et al. 2021; FedRolex).

Both official implementations mask the logits of the classes a device has no data of
(their ``mask: '1'`` setting, on by default): in every model's forward, once the input
carries the device's ``label_split``,
``out = out.masked_fill(label_mask == 0, 0)`` (HeteroFL ``src/models/conv.py`` and
``resnet.py``, FedRolex ``models/resnet.py``). The masked logits are set to ZERO, not to
``-inf``: they still enter the softmax as ``exp(0)``, but carry no gradient, so the rows
of absent classes are not trained. The same masked scores are what the device's local
test accuracy reads (HeteroFL ``train_classifier_fed.py`` ``test``, FedRolex
``resnet_client.py`` ``test_model_for_user``); the global test set is scored unmasked.

Local training also clips the gradient norm to 1 before every optimizer step
(``torch.nn.utils.clip_grad_norm_(model.parameters(), 1)`` in HeteroFL's ``Local.train``
and FedRolex's ``ResnetClient.step``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

from models.training import TrainSettings, run_epochs

#: Record of a device's training reply that names the classes of its training data, and its
#: entry (a list of ints): the cloud merges the classifier's rows by them (``label_split``).
LABELS_RECORD, CLASSES_KEY = "labels", "classes"


def device_classes(labels: torch.Tensor) -> tuple[int, ...] | None:
    """The classes of a device's training labels, sorted (HeteroFL ``data.py``: ``torch.unique``).

    None when the device has no labelled data: nothing to mask by.
    """
    if len(labels) == 0:
        return None
    return tuple(int(c) for c in torch.unique(labels).tolist())


def mask_logits(logits: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    """``logits`` with every class outside ``classes`` set to 0 (the official ``masked_fill``).

    Raises ValueError naming a class outside ``[0, logits.shape[1])``.
    """
    num_classes = logits.shape[-1]
    index = torch.as_tensor(list(classes), dtype=torch.long)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_classes):
        raise ValueError(f"classes {index.tolist()} must lie in 0..{num_classes - 1}, the classifier's outputs")
    keep = torch.zeros(num_classes, dtype=torch.bool, device=logits.device)
    keep[index] = True
    return logits.masked_fill(~keep, 0.0)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, classes: Iterable[int] | None) -> torch.Tensor:
    """Mean cross-entropy of the label-masked logits (:func:`mask_logits`); unmasked when ``classes`` is None."""
    return F.cross_entropy(logits if classes is None else mask_logits(logits, classes), labels)


class LabelMasked(nn.Module):
    """A network whose logits are label-masked (:func:`mask_logits`), for local evaluation.

    Parameters
    ----------
    model : nn.Module
        The sub-model; its parameters and modes are this module's.
    classes : iterable of int
        The classes kept (the device's training classes).
    """

    def __init__(self, model: nn.Module, classes: Iterable[int]) -> None:
        super().__init__()
        self.model = model
        self.classes = tuple(int(c) for c in classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return mask_logits(self.model(x), self.classes)


def train_submodel(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    seed: int,
    classes: Iterable[int] | None = None,
    clip_grad_norm: float | None = None,
) -> float:
    """Train ``model`` in place on ``(x, y)`` as the official HeteroFL/FedRolex clients do.

    Loss: :func:`masked_cross_entropy` with ``classes`` (None: plain cross-entropy);
    after each backward pass the gradient norm of all parameters is clipped to
    ``clip_grad_norm`` (None: no clipping). Batches, optimizer and schedule come from
    :func:`models.training.run_epochs` (seeded by ``seed``). Returns the mean loss of the
    last epoch (NaN without data).
    """
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm}")
    kept = None if classes is None else tuple(classes)

    def step(idx: torch.Tensor) -> float:
        loss = masked_cross_entropy(model(x[idx]), y[idx], kept)
        loss.backward()
        if clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        return float(loss.detach())

    return run_epochs(model, len(x), settings, seed, step)
