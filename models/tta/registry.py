"""Online test-time-adaptation baselines of CEMA (seed 000) behind one registry: ``build_adapter``.

Every adapter has the surface of :class:`models.tta.base.OnlineAdapter`:
``predict_then_adapt(x) -> logits`` (the prediction for ``x``, made before adapting to ``x``),
``state_dict()`` and ``load_state_dict(state)``.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from models.tta.base import OnlineAdapter
from models.tta.cotta import CoTTA
from models.tta.lame import LAME
from models.tta.methods import EntropyFilteredTent, PseudoLabel, SourceModel, Tent
from models.tta.norm import BatchNormAdapt, OnlineBatchNorm
from models.tta.settings import DEFAULT_FAMILY, reference_values

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


def adapter_parameters(name: str) -> set[str]:
    """Keyword hyper-parameters the adapter ``name`` takes (besides the model and ``num_classes``)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; choose one of {adapter_names()}")
    return set(inspect.signature(ADAPTERS[name].__init__).parameters) - {"self", "model", "num_classes"}


def build_adapter(name: str, model: nn.Module, num_classes: int, family: str = DEFAULT_FAMILY,
                  dataset: str | None = None, **hyper: Any) -> OnlineAdapter:
    """Wrap ``model`` (changed in place) in the online adapter ``name``.

    Parameters
    ----------
    name : str
        One of :func:`adapter_names`.
    model : nn.Module
        The source classifier.
    num_classes : int
        Number of classes (used by methods whose defaults depend on it, e.g. ETA's E0 = 0.4 ln C).
    family, dataset : str
        The reference configuration whose values fill the dataset-dependent hyper-parameters not
        given in ``hyper`` (:func:`models.tta.settings.reference_values`).
    **hyper
        Keyword hyper-parameters of that method's class (e.g. ``lr`` for tent).

    Returns
    -------
    OnlineAdapter
    """
    accepted = adapter_parameters(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    unknown = set(hyper) - accepted
    if unknown:
        raise ValueError(f"adapter {name!r} does not take {sorted(unknown)}; it accepts {sorted(accepted)}")
    hyper = {**reference_values(name, family, dataset), **hyper}
    cls = ADAPTERS[name]
    if "num_classes" in inspect.signature(cls.__init__).parameters:
        hyper["num_classes"] = num_classes
    return cls(model, **hyper)

