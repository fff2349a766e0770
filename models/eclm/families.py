"""The modular families of ECLM 7.1 and :func:`build_modular`, which builds any of them by name.

==================  =========================================  ==========================
family              module layers                              trunk (shared)
==================  =========================================  ==========================
modular_mlp         1 x 16: the 2 hidden layers (input -> w)   flatten
modular_resnet18    4 x 16: the 4 stages (2 basic blocks each) 3x3 conv stem
modular_vgg16       3 x 32: the last 3 conv blocks             the first 10 convs
modular_resnet34    3 x 32: the last 3 basic blocks            stem + stages 1-3
==================  =========================================  ==========================

Every layer holds ``modules_per_layer - residual_per_layer`` shrunk modules (ids m0...)
followed by the residual modules. A shrunk module's inner width is
``max(1, round(shrink * block width))``. Each part is initialised from its own seed derived
from ``(seed, part)``, so ``build_modular(..., module_ids=ids)`` equals
``build_modular(...).extract(ids)`` tensor for tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.blocks import BasicBlock, ResidualBypass, conv_bn
from models.eclm.blocks import VectorBypass, conv_bottleneck, mlp_module, resnet_stage, vgg_block
from models.eclm.layer import ModuleLayer, parse_module_id
from models.eclm.modular import ModularNet
from models.eclm.selector import LOAD_BALANCE_WEIGHT, SELECTOR_EMBED_DIM, UnifiedSelector
from models.registry import register_model

#: Modules activated per sample and layer (assumption: ECLM does not give k; Shazeer et al. use k = 2-4).
TOP_K = 2
#: Residual (bypass) modules per layer (assumption: ECLM 4.1 names the kind, not the count).
RESIDUAL_PER_LAYER = 1
#: Input side of the image families (CIFAR-10/100, ECLM 7.1).
IMAGE_SIZE = 32
#: Smallest input side per family: the last module layers must keep >= 2x2 maps, or a
#: module routed a single sample has one value per BatchNorm channel and cannot train.
MIN_IMAGE_SIZE = {"modular_resnet18": 16, "modular_resnet34": 16, "modular_vgg16": 32}
#: VGG16 conv widths at base 64, "M" = 2x2 max pool (Simonyan & Zisserman 2015, config D).
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


@dataclass(frozen=True)
class FamilyDefaults:
    """Per-family module count (ECLM 7.1) and shrink ratio (assumption, see below)."""

    modules_per_layer: int
    shrink: float


#: ECLM 7.1 module counts. Shrink ratios are assumptions (the paper gives none): a layer's
#: shrunk modules together hold ~4x the block's inner width, so top-2 routing computes
#: ~1/2 (16 modules) or ~1/4 (32 modules) of the original block per sample.
FAMILY_DEFAULTS = {
    "modular_mlp": FamilyDefaults(16, 0.25),
    "modular_resnet18": FamilyDefaults(16, 0.25),
    "modular_vgg16": FamilyDefaults(32, 0.125),
    "modular_resnet34": FamilyDefaults(32, 0.125),
}


@dataclass
class LayerPlan:
    """How to make one module layer's shrunk and residual modules."""

    shrunk: Callable[[], nn.Module]
    residual: Callable[[], nn.Module]


@dataclass
class FamilyPlan:
    """A family's parts before assembly: shared trunk and head factories, module layers."""

    trunk: Callable[[], nn.Module]
    layers: list[LayerPlan]
    head: Callable[[], nn.Module]
    selector_kind: str


def _inner(width: int, shrink: float) -> int:
    return max(1, round(width * shrink))


def _plan_mlp(num_classes, width, in_channels, image_size, shrink) -> FamilyPlan:
    """ECLM's MLP: the block ``input -> hidden -> width`` is the module layer; linear head."""
    features = in_channels * image_size * image_size
    layer = LayerPlan(lambda: mlp_module(features, _inner(width, shrink), width), lambda: VectorBypass(width))
    return FamilyPlan(nn.Flatten, [layer], lambda: nn.Linear(width, num_classes), "mlp")


def _resnet_stem(in_channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(conv_bn(in_channels, width, 3), nn.ReLU())


def _resnet_head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _plan_resnet18(num_classes, width, in_channels, image_size, shrink) -> FamilyPlan:
    """CIFAR ResNet18 (kuangliu/pytorch-cifar stage layout, option-A shortcuts): each stage is a module layer."""
    layers = []
    for stage in range(4):
        c_in, c_out = width * 2 ** max(stage - 1, 0), width * 2**stage
        stride = 1 if stage == 0 else 2
        layers.append(LayerPlan(
            lambda c_in=c_in, c_out=c_out, s=stride: resnet_stage(c_in, _inner(c_out, shrink), c_out, 2, s),
            lambda c_in=c_in, c_out=c_out, s=stride: ResidualBypass(c_in, c_out, s),
        ))
    stem, head = lambda: _resnet_stem(in_channels, width), lambda: _resnet_head(8 * width, num_classes)
    return FamilyPlan(stem, layers, head, "conv")


def _plan_resnet34(num_classes, width, in_channels, image_size, shrink) -> FamilyPlan:
    """CIFAR ResNet34 (blocks 3-4-6-3); the 3 blocks of the last stage are the module layers."""

    def trunk() -> nn.Sequential:
        return nn.Sequential(
            _resnet_stem(in_channels, width),
            resnet_stage(width, width, width, 3, 1),
            resnet_stage(width, 2 * width, 2 * width, 4, 2),
            resnet_stage(2 * width, 4 * width, 4 * width, 6, 2),
        )

    c = 8 * width
    layers = [
        LayerPlan(
            lambda c_in=c_in, s=s: BasicBlock(c_in, _inner(c, shrink), c, s),
            lambda c_in=c_in, s=s: ResidualBypass(c_in, c, s),
        )
        for c_in, s in ((4 * width, 2), (c, 1), (c, 1))
    ]
    return FamilyPlan(trunk, layers, lambda: _resnet_head(c, num_classes), "conv")


def _plan_vgg16(num_classes, width, in_channels, image_size, shrink) -> FamilyPlan:
    """CIFAR VGG16 (with BN); the last 3 conv blocks are the module layers, max pool + linear head."""
    layout = [v if v == "M" else max(1, v * width // 64) for v in VGG16_LAYOUT]

    def trunk() -> nn.Sequential:
        parts, c_in = [], in_channels
        for v in layout[:-3]:
            parts.append(nn.MaxPool2d(2) if v == "M" else vgg_block(c_in, v))
            c_in = c_in if v == "M" else v
        return nn.Sequential(*parts)

    c = layout[-1]
    layer = LayerPlan(lambda: conv_bottleneck(c, _inner(c, shrink), c), lambda: ResidualBypass(c, c, 1))
    head = lambda: nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))  # noqa: E731
    return FamilyPlan(trunk, [layer] * 3, head, "conv")


_PLANS = {
    "modular_mlp": _plan_mlp,
    "modular_resnet18": _plan_resnet18,
    "modular_vgg16": _plan_vgg16,
    "modular_resnet34": _plan_resnet34,
}


def _seeded(seed: int, part: tuple[int, ...], make: Callable[[], nn.Module]) -> nn.Module:
    """Build ``make()`` with torch's init drawing from a seed derived from ``(seed, part)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.default_rng([seed, *part]).integers(2**62)))
        return make()


def _check(name, num_classes, width, in_channels, modules_per_layer, residual_per_layer, shrink, k, image_size):
    if name not in _PLANS:
        raise ValueError(f"unknown modular family {name!r}; choose one of {sorted(_PLANS)}")
    for label, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels),
                         ("modules_per_layer", modules_per_layer), ("k", k)):
        if int(value) < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if not 0 <= residual_per_layer < modules_per_layer:
        raise ValueError(
            f"residual_per_layer={residual_per_layer} must lie in 0..{modules_per_layer - 1} (keep a shrunk module)"
        )
    if not 0 < shrink <= 1:
        raise ValueError(f"shrink must lie in (0, 1], got {shrink}")
    smallest = MIN_IMAGE_SIZE.get(name, 1)
    if image_size < smallest:
        raise ValueError(f"image_size={image_size} is too small for {name}; use >= {smallest} (CIFAR: 32)")


def build_modular(
    name: str,
    num_classes: int,
    width: int,
    in_channels: int = 3,
    *,
    modules_per_layer: int | None = None,
    residual_per_layer: int = RESIDUAL_PER_LAYER,
    shrink: float | None = None,
    k: int = TOP_K,
    embed_dim: int = SELECTOR_EMBED_DIM,
    balance_weight: float = LOAD_BALANCE_WEIGHT,
    image_size: int = IMAGE_SIZE,
    seed: int = 0,
    module_ids: Iterable[str] | None = None,
) -> ModularNet:
    """Build a modular network of family ``name`` (ECLM 4.1, 7.1).

    Parameters
    ----------
    name : str
        ``modular_mlp``, ``modular_resnet18``, ``modular_vgg16`` or ``modular_resnet34``.
    num_classes, width, in_channels : int
        Classifier size, base width (ResNet/VGG: first-stage channels, 64 = paper; MLP:
        hidden units) and input channels.
    modules_per_layer, shrink : int, float or None
        N per layer and shrunk-module ratio; None takes :data:`FAMILY_DEFAULTS`.
    residual_per_layer, k, embed_dim, balance_weight, image_size : see module constants.
    seed : int
        Seeds parameter initialisation (per part) and the routing noise.
    module_ids : Iterable[str] or None
        Build only these modules (a sub-model skeleton, same as ``extract(ids)``); None = all.
    """
    defaults = FAMILY_DEFAULTS.get(name, FamilyDefaults(1, 1.0))
    n = defaults.modules_per_layer if modules_per_layer is None else int(modules_per_layer)
    shrink = defaults.shrink if shrink is None else float(shrink)
    _check(name, num_classes, width, in_channels, n, residual_per_layer, shrink, k, image_size)
    plan = _PLANS[name](num_classes, width, in_channels, image_size, shrink)
    wanted = _wanted(module_ids, len(plan.layers), n)
    n_shrunk = n - residual_per_layer
    layers = []
    for l, layer_plan in enumerate(plan.layers):
        held = {
            i: _seeded(seed, (1, l, i), layer_plan.shrunk if i < n_shrunk else layer_plan.residual)
            for i in range(n) if wanted is None or i in wanted[l]
        }
        layers.append(ModuleLayer(held, n, k, residual=range(n_shrunk, n)))
    input_shape = (in_channels, image_size, image_size)
    selector = _seeded(
        seed, (2,), lambda: UnifiedSelector(input_shape, [n] * len(plan.layers), embed_dim, plan.selector_kind)
    )
    config = dict(
        name=name, num_classes=num_classes, width=width, in_channels=in_channels, modules_per_layer=n,
        residual_per_layer=residual_per_layer, shrink=shrink, k=k, embed_dim=embed_dim,
        balance_weight=balance_weight, image_size=image_size, seed=seed,
    )
    trunk, head = _seeded(seed, (0,), plan.trunk), _seeded(seed, (3,), plan.head)
    return ModularNet(trunk, layers, head, selector, config, input_shape, balance_weight, seed)


def _wanted(module_ids, n_layers: int, n: int) -> list[set[int]] | None:
    """Held indices per layer for ``module_ids`` (None = all); ValueError for bad ids or empty layers."""
    if module_ids is None:
        return None
    wanted: list[set[int]] = [set() for _ in range(n_layers)]
    for mid in module_ids:
        layer, index = parse_module_id(mid)
        if layer >= n_layers or index >= n:
            raise ValueError(f"unknown module id {mid!r}; this family has {n_layers} layer(s) of {n} modules")
        wanted[layer].add(index)
    empty = [l for l, idx in enumerate(wanted) if not idx]
    if empty:
        raise ValueError(f"module_ids leave module layer(s) {empty} empty; pick at least one module per layer")
    return wanted


@register_model("modular_mlp")
def modular_mlp(num_classes: int, width: int, in_channels: int = 3, **options) -> ModularNet:
    """ECLM's modular MLP: 1 module layer x 16 modules (ECLM 7.1)."""
    return build_modular("modular_mlp", num_classes, width, in_channels, **options)


@register_model("modular_resnet18")
def modular_resnet18(num_classes: int, width: int, in_channels: int = 3, **options) -> ModularNet:
    """ECLM's modular CIFAR ResNet18: 4 module layers x 16 modules (ECLM 7.1)."""
    return build_modular("modular_resnet18", num_classes, width, in_channels, **options)


@register_model("modular_vgg16")
def modular_vgg16(num_classes: int, width: int, in_channels: int = 3, **options) -> ModularNet:
    """ECLM's modular VGG16: the last 3 blocks as 3 module layers x 32 modules (ECLM 7.1)."""
    return build_modular("modular_vgg16", num_classes, width, in_channels, **options)


@register_model("modular_resnet34")
def modular_resnet34(num_classes: int, width: int, in_channels: int = 3, **options) -> ModularNet:
    """ECLM's modular CIFAR ResNet34: the last 3 blocks as 3 module layers x 32 modules (ECLM 7.1)."""
    return build_modular("modular_resnet34", num_classes, width, in_channels, **options)
