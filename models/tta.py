"""Online test-time-adaptation baselines of CEMA (seed 000) behind one registry: ``build_adapter``.

Every adapter has the surface of :class:`models.tta_base.OnlineAdapter`:
``predict_then_adapt(x) -> logits`` (the prediction for ``x``, made before adapting to ``x``),
``state_dict()`` and ``load_state_dict(state)``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from models.tta_base import OnlineAdapter, linear_scaled_lr, softmax_entropy
from models.tta_cotta import CoTTA
from models.tta_lame import LAME, penultimate_features
from models.tta_methods import (
    BatchNormAdapt,
    EntropyFilteredTent,
    OnlineBatchNorm,
    PseudoLabel,
    SourceModel,
    Tent,
    eta_keep_mask,
)

ADAPTERS: dict[str, type[OnlineAdapter]] = {
    "source": SourceModel,
    "bn_adapt": BatchNormAdapt,
    "onda": OnlineBatchNorm,
    "lame": LAME,
    "pl": PseudoLabel,
    "tent": Tent,
    "eta": EntropyFilteredTent,
    "cotta": CoTTA,
}


def adapter_names() -> tuple[str, ...]:
    """Names accepted by :func:`build_adapter`, sorted."""
    return tuple(sorted(ADAPTERS))


def build_adapter(name: str, model: nn.Module, num_classes: int, **hyper: Any) -> OnlineAdapter:
    """Wrap ``model`` (changed in place) in the online adapter ``name``.

    Parameters
    ----------
    name : str
        One of :func:`adapter_names`.
    model : nn.Module
        The source classifier.
    num_classes : int
        Number of classes (used by methods whose defaults depend on it, e.g. ETA's E0 = 0.4 ln C).
    **hyper
        Keyword hyper-parameters of that method's class (e.g. ``lr`` for tent).

    Returns
    -------
    OnlineAdapter
    """
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of {adapter_names()}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    cls = ADAPTERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "model"}
    unknown = set(hyper) - accepted
    if unknown:
        raise ValueError(f"adapter {name!r} does not take {sorted(unknown)}; it accepts {sorted(accepted)}")
    if "num_classes" in accepted:
        hyper["num_classes"] = num_classes
    return cls(model, **hyper)


__all__ = [
    "ADAPTERS", "BatchNormAdapt", "CoTTA", "EntropyFilteredTent", "LAME", "OnlineAdapter",
    "OnlineBatchNorm", "PseudoLabel", "SourceModel", "Tent", "adapter_names", "build_adapter",
    "eta_keep_mask", "linear_scaled_lr", "penultimate_features", "softmax_entropy",
]
