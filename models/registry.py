"""A registry of networks: ``@register_model("name")`` fills it, :mod:`models.catalog` builds from it (timm style).

Each network family registers its factories where it defines them; :mod:`models.catalog`
imports every family, so its ``build_model`` and ``model_names`` see them all.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a factory ``f(num_classes, width, in_channels) -> nn.Module`` under ``name``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def registered_names() -> tuple[str, ...]:
    """Names of the networks registered so far, sorted."""
    return tuple(sorted(_REGISTRY))


def build_registered(name: str, *, num_classes: int, width: int, in_channels: int = 3, **options) -> nn.Module:
    """Build the registered network ``name`` (call :func:`models.catalog.build_model`, which registers every family).

    Parameters
    ----------
    name : str
        A registered model name (see :func:`registered_names`).
    num_classes : int
        Size of the classifier output.
    width : int
        The family's width knob (channels of the first stage, or hidden units).
    in_channels : int
        Channels of the input images.
    **options
        Family-specific knobs (e.g. a modular family's ``k``); a family that does not take
        one raises ValueError naming it.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_REGISTRY)}")
    factory = _REGISTRY[name]
    if options:
        accepted = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = sorted(k for k in options if k not in accepted and not takes_any)
        if unknown:
            raise ValueError(f"model {name!r} does not take the option(s) {unknown}; unset them for this model")
    return factory(num_classes=num_classes, width=width, in_channels=in_channels, **options)
