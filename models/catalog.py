"""Every network the project offers, by name: ``build_model(name, ...)`` and ``model_names()``.

Importing this module imports each network family, whose ``@register_model`` decorators fill
:mod:`models.registry`. A new family is added to :data:`FAMILIES`' imports below.
"""

from __future__ import annotations

from torch import nn

from models import backbones, resnet, tv_resnet
from models.eclm import families as eclm_families
from models.elastic import fbs_resnet, master
from models.multibranch import net as multibranch_net
from models.registry import build_registered, registered_names

#: The modules whose factories are registered (imported above for their decorators).
FAMILIES = (backbones, resnet, tv_resnet, eclm_families, fbs_resnet, master, multibranch_net)


def model_names() -> tuple[str, ...]:
    """Names of every network the project offers, sorted."""
    return registered_names()


def build_model(name: str, *, num_classes: int, width: int, in_channels: int = 3, **options) -> nn.Module:
    """Build the network ``name``; see :func:`models.registry.build_registered` for the arguments."""
    return build_registered(name, num_classes=num_classes, width=width, in_channels=in_channels, **options)
