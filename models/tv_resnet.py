"""torchvision's ImageNet ResNets (He et al. 2016) for the ImageNet-C setting, never downloaded.

``tv_resnet18``, ``tv_resnet50`` and ``tv_resnet101`` are ``torchvision.models.resnetXX(weights=None)``:
the architecture only, randomly initialised; trained weights come from a file the user provides
(:func:`load_checkpoint`, e.g. ``torch.save(resnet50(weights="IMAGENET1K_V1").state_dict(), path)``
on a machine that has them). Nothing here touches the network.

Input convention. Every network of this project receives ``experiments.data.to_tensor``'s
output, pixels mapped to [-1, 1] by ``(x / 255 - 0.5) / 0.5``; torchvision's ImageNet weights
expect ``(x / 255 - mean) / std`` with the ImageNet statistics below. The builders therefore add
a fixed input layer (a forward pre-hook with two non-persistent buffers) that maps the first
convention to the second: ``y = x * 0.5 / std + (0.5 - mean) / std``. The state dict stays
exactly torchvision's (the buffers are not saved), so torchvision checkpoints load unchanged and
every caller (edge stream, cloud uploads, test sets) keeps using the one ``to_tensor``.

torchvision is imported when a network is built, not when this module is imported: the model
registry imports every module of ``models``, and torchvision costs about a second of imports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from models.registry import register_model

#: ImageNet channel statistics torchvision's ImageNet weights are trained with
#: (``ResNet18_Weights.IMAGENET1K_V1.transforms()``: ``Normalize(mean, std)``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The input every network of this project receives: ``experiments/data/arrays.py`` ``to_tensor``
#: maps [0, 255] to [-1, 1] as ``(x / 255 - PIXEL_MEAN) / PIXEL_STD`` (restated here because
#: ``models`` imports nothing of the project).
PROJECT_PIXEL_MEAN = 0.5
PROJECT_PIXEL_STD = 0.5
#: Architectures offered (torchvision.models builders of the same name).
TORCHVISION_ARCHS = ("resnet18", "resnet50", "resnet101")
#: torchvision's ResNets take RGB images.
RGB_CHANNELS = 3
#: Prefix ``torch.nn.DataParallel`` / DDP put before every key of a saved state dict.
PARALLEL_PREFIX = "module."


def add_imagenet_input(model: nn.Module) -> nn.Module:
    """Make ``model`` take project inputs in [-1, 1] and see ImageNet-normalised ones.

    Registers non-persistent buffers ``input_scale = 0.5 / std`` and ``input_shift =
    (0.5 - mean) / std`` (shape (1, 3, 1, 1)) and a forward pre-hook computing
    ``x * input_scale + input_shift``, which equals ``(x01 - mean) / std`` for
    ``x = (x01 - 0.5) / 0.5``. Returns ``model`` (modified in place).
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, RGB_CHANNELS, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, RGB_CHANNELS, 1, 1)
    model.register_buffer("input_scale", PROJECT_PIXEL_STD / std, persistent=False)
    model.register_buffer("input_shift", (PROJECT_PIXEL_MEAN - mean) / std, persistent=False)
    model.register_forward_pre_hook(_imagenet_input)
    return model


def _imagenet_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of :func:`add_imagenet_input` (module level, so models deep-copy and pickle)."""
    x, *rest = args
    return (x * module.input_scale + module.input_shift, *rest)


def build_torchvision_resnet(arch: str, num_classes: int, in_channels: int = RGB_CHANNELS) -> nn.Module:
    """``torchvision.models.<arch>(weights=None, num_classes=num_classes)`` with the ImageNet input layer.

    Parameters
    ----------
    arch : str
        ``"resnet18"``, ``"resnet50"`` or ``"resnet101"``.
    num_classes : int
        Classifier outputs (1000 for ImageNet(-C) checkpoints).
    in_channels : int
        Must be 3: torchvision's stem takes RGB.

    Raises
    ------
    ValueError
        An unknown ``arch``, or ``in_channels`` other than 3.
    """
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"unknown torchvision ResNet {arch!r}; choose one of {TORCHVISION_ARCHS}")
    if in_channels != RGB_CHANNELS:
        raise ValueError(f"torchvision's {arch} takes RGB images (3 channels), got in_channels={in_channels}")
    from torchvision import models as tv_models  # lazy: see the module docstring

    network = getattr(tv_models, arch)(weights=None, num_classes=num_classes)  # weights=None: never downloads
    return add_imagenet_input(network)


@register_model("tv_resnet18")
def tv_resnet18(num_classes: int, width: int, in_channels: int = RGB_CHANNELS) -> nn.Module:
    """torchvision ResNet-18 (11.7 M parameters); ``width`` is ignored (torchvision's widths are fixed)."""
    return build_torchvision_resnet("resnet18", num_classes, in_channels)


@register_model("tv_resnet50")
def tv_resnet50(num_classes: int, width: int, in_channels: int = RGB_CHANNELS) -> nn.Module:
    """torchvision ResNet-50 (25.6 M parameters); ``width`` is ignored (torchvision's widths are fixed)."""
    return build_torchvision_resnet("resnet50", num_classes, in_channels)


@register_model("tv_resnet101")
def tv_resnet101(num_classes: int, width: int, in_channels: int = RGB_CHANNELS) -> nn.Module:
    """torchvision ResNet-101 (44.5 M parameters); ``width`` is ignored (torchvision's widths are fixed)."""
    return build_torchvision_resnet("resnet101", num_classes, in_channels)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a saved state dict into ``model``, strictly (every key, every shape).

    Parameters
    ----------
    model : nn.Module
        The network to fill, e.g. from :func:`tv_resnet18`.
    path : str or os.PathLike
        A file written by ``torch.save(state_dict, path)`` (torchvision's own weight files are
        such state dicts). A dict holding the state dict under ``"state_dict"`` (common in
        training scripts) and keys prefixed ``"module."`` (DataParallel) are accepted too.

    Returns
    -------
    nn.Module
        ``model``, loaded in place.

    Raises
    ------
    ValueError
        The file does not exist, holds no state dict, or its keys or shapes do not fit.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = _unwrap(state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path!r} does not fit {type(model).__name__}: {error}") from None
    return model


def _unwrap(state, path: str) -> Mapping[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint, without a DataParallel ``module.`` prefix."""
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"checkpoint {path!r} holds no state dict; save one with torch.save(model.state_dict(), path)"
        )
    if state and all(key.startswith(PARALLEL_PREFIX) for key in state):
        state = {key[len(PARALLEL_PREFIX):]: value for key, value in state.items()}
    return state
