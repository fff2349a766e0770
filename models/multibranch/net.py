"""A multi-branch supernet for 32x32 images (the AN baseline: AdaptiveNet, Wen et al., MobiCom 2023).

ECLM 7.1 runs AdaptiveNet as an on-device baseline: "edge devices get a multi-branch model
pre-trained on the cloud, and can adjust the model locally to make flexible tradeoffs
between model accuracy and inference latency". Here the supernet is a stem, a chain of
*stages* and a head. Every stage holds candidate *branches* that all map the stage's input
shape to its output shape: the stage's block at hidden widths ``width_ratios`` (x1, x0.5,
x0.25 by default, widest first) and, where input and output shapes match, a *skip* branch
(identity, no parameters, like AdaptiveNet's block-skipping branches). A *path* is one
branch index per stage; ``forward(x, path)`` runs it and :meth:`MultiBranchNet.extract`
copies it into a physically separate network with real (smaller) tensors.

Costs of a path (bytes, training FLOPs per sample, training memory) are measured with
:mod:`models.costs` on every component (stem, each branch, head) once per architecture and
summed: each of the three measures is a sum over the network's modules, so the sum equals
the measurement on the extracted network (tests pin this).

Training the supernet (the sandwich rule) is :mod:`models.multibranch.training`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from models.blocks import BasicBlock, conv_bn
from models.costs import flop_counter, parameter_bytes, train_flops_per_sample, training_memory_bytes
from models.registry import register_model

#: Hidden-width ratios of a stage's branches, widest first (the brief; the same rates as
#: HeteroFL's 1, 1/2, 1/4 and ECLM's shrunk modules).
BRANCH_WIDTH_RATIOS = (1.0, 0.5, 0.25)
#: Side of the square input images the registered supernets are built for (CIFAR, digits).
IMAGE_SIDE = 32

#: A path through the supernet: one branch index per stage.
BranchPath = tuple[int, ...]


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class StageSpec:
    """One stage: every branch maps ``in_channels`` to ``out_channels`` with ``stride``.

    ``residual`` selects a ResNet basic block (He et al. 2016) as the stage's block instead
    of a plain pair of 3x3 conv-BN-ReLU layers.
    """

    in_channels: int
    out_channels: int
    stride: int = 1
    residual: bool = False

    @property
    def can_skip(self) -> bool:
        """Whether the shapes allow an identity branch."""
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclass(frozen=True)
class SupernetSpec:
    """The architecture of a :class:`MultiBranchNet` (hashable: the key of its cost table)."""

    in_channels: int
    num_classes: int
    stem_channels: int
    stages: tuple[StageSpec, ...]
    width_ratios: tuple[float, ...] = BRANCH_WIDTH_RATIOS
    image_size: int = IMAGE_SIDE

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "stem_channels", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.stages:
            raise ValueError("stages=() is empty; give at least one StageSpec")
        ratios = self.width_ratios
        if not ratios or any(not 0 < r <= 1 for r in ratios) or list(ratios) != sorted(set(ratios), reverse=True):
            raise ValueError(f"width_ratios={ratios} must be distinct values in (0, 1], widest first")
        channels = self.stem_channels
        for i, stage in enumerate(self.stages):
            if stage.in_channels != channels:
                raise ValueError(
                    f"stage {i} takes {stage.in_channels} channels but receives {channels}; chain the stages"
                )
            if stage.stride not in (1, 2):
                raise ValueError(f"stage {i} stride={stage.stride} must be 1 or 2")
            channels = stage.out_channels


def cnn_spec(num_classes: int, width: int, in_channels: int = 3) -> SupernetSpec:
    """Three stages after a stem (widths w, 2w, 4w, 4w), like :class:`models.backbones.SmallCNN`.

    Downsampling is by stride-2 convolutions; only the last stage keeps its shape, so only
    it has a skip branch (3 x 3 x 4 = 36 paths).
    """
    return SupernetSpec(
        in_channels=in_channels,
        num_classes=num_classes,
        stem_channels=width,
        stages=(StageSpec(width, 2 * width, 2), StageSpec(2 * width, 4 * width, 2), StageSpec(4 * width, 4 * width, 1)),
    )


def resnet18_spec(num_classes: int, width: int, in_channels: int = 3) -> SupernetSpec:
    """CIFAR ResNet18 (He et al. 2016; kuangliu/pytorch-cifar layout) with ``width`` base channels.

    A 3x3 stem, then 4 layers x 2 basic blocks at widths w, 2w, 4w, 8w (strides 1, 2, 2, 2);
    every block is a stage, and the five blocks with identity shortcuts may be skipped
    (3^3 x 4^5 = 27,648 paths).
    """
    stages, channels = [], width
    for out, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
        stages.append(StageSpec(channels, out, stride, residual=True))
        stages.append(StageSpec(out, out, 1, residual=True))
        channels = out
    return SupernetSpec(in_channels=in_channels, num_classes=num_classes, stem_channels=width, stages=tuple(stages))


# --------------------------------------------------------------------------- building blocks
def hidden_width(stage: StageSpec, ratio: float) -> int:
    """Hidden channels of a branch: ``round(ratio * out_channels)``, at least 1."""
    return max(1, round(ratio * stage.out_channels))


def build_branch(stage: StageSpec, ratio: float | None) -> nn.Module:
    """A branch of ``stage``: its block at hidden width ``ratio``, or the identity for ``None``."""
    if ratio is None:
        if not stage.can_skip:
            raise ValueError(f"stage {stage} changes shape; it cannot have a skip branch")
        return nn.Identity()
    hidden = hidden_width(stage, ratio)
    if stage.residual:
        return BasicBlock(stage.in_channels, hidden, stage.out_channels, stage.stride)
    return nn.Sequential(
        conv_bn(stage.in_channels, hidden, 3, stage.stride), nn.ReLU(inplace=True),
        conv_bn(hidden, stage.out_channels, 3), nn.ReLU(inplace=True),
    )


def branch_ratios(stage: StageSpec, width_ratios: tuple[float, ...]) -> tuple[float | None, ...]:
    """Each branch's width ratio in index order; ``None`` marks the skip branch (last)."""
    return tuple(width_ratios) + ((None,) if stage.can_skip else ())


class PathCost(NamedTuple):
    """What one path costs on a device (measured with :mod:`models.costs`)."""

    bytes: int  # parameters and buffers (a message carrying the path's state dict)
    flops_per_sample: float  # training FLOPs (forward + backward) per sample
    train_memory_bytes: int  # training memory at the given batch size


class _ComponentCost(NamedTuple):
    bytes: int
    train_flops: float
    forward_flops: float
    train_memory: int


class _InputNeedsGrad(nn.Module):
    """Wraps a component so its input requires grad, as inside a network after the stem.

    Inside a network every layer after the first also computes the gradient with respect
    to its input; measuring a component alone on a plain input would miss those FLOPs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.module(x.detach().requires_grad_(True))


# --------------------------------------------------------------------------- the supernet
class MultiBranchNet(nn.Module):
    """Stem, stages of candidate branches, head (global average pool + linear).

    Parameters
    ----------
    spec : SupernetSpec
        The architecture. Branch ``i`` of a stage is the block at ``spec.width_ratios[i]``;
        the skip branch, where the shapes allow one, comes last. Path ``(0, ..., 0)`` is
        the largest network and the default of :meth:`forward`.
    """

    def __init__(self, spec: SupernetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem = nn.Sequential(conv_bn(spec.in_channels, spec.stem_channels, 3), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList(
            nn.ModuleList(build_branch(stage, r) for r in branch_ratios(stage, spec.width_ratios))
            for stage in spec.stages
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec.stages[-1].out_channels, spec.num_classes)
        )

    # ---------------------------------------------------------------- paths
    @property
    def num_branches(self) -> tuple[int, ...]:
        """Branches per stage."""
        return tuple(len(stage) for stage in self.stages)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one input image ``(channels, side, side)``."""
        return (self.spec.in_channels, self.spec.image_size, self.spec.image_size)

    def largest_path(self) -> BranchPath:
        """The widest branch everywhere (the full network)."""
        return tuple(0 for _ in self.stages)

    def smallest_path(self) -> BranchPath:
        """The cheapest branch everywhere (skip where allowed, else the narrowest)."""
        return tuple(n - 1 for n in self.num_branches)

    def all_paths(self) -> list[BranchPath]:
        """Every path, in lexicographic order."""
        return list(itertools.product(*(range(n) for n in self.num_branches)))

    def branch_label(self, stage: int, branch: int) -> str:
        """``"x0.5"`` for a width branch, ``"skip"`` for the identity."""
        ratio = branch_ratios(self.spec.stages[stage], self.spec.width_ratios)[branch]
        return "skip" if ratio is None else f"x{ratio:g}"

    def check_path(self, path) -> BranchPath:
        """``path`` as a tuple of ints; ValueError if its length or an index is out of range."""
        path = tuple(int(b) for b in path)
        if len(path) != len(self.stages):
            raise ValueError(f"path {path} has {len(path)} entries; the supernet has {len(self.stages)} stages")
        for stage, (branch, count) in enumerate(zip(path, self.num_branches)):
            if not 0 <= branch < count:
                raise ValueError(f"path {path}: stage {stage} has branches 0..{count - 1}, got {branch}")
        return path

    # ---------------------------------------------------------------- running
    def forward(self, x: torch.Tensor, path=None) -> torch.Tensor:
        """Logits of ``x`` through ``path`` (default: the largest path)."""
        path = self.largest_path() if path is None else self.check_path(path)
        x = self.stem(x)
        for stage, branch in zip(self.stages, path):
            x = stage[branch](x)
        return self.head(x)

    def extract(self, path) -> nn.Sequential:
        """A standalone copy of ``path``: stem, the chosen branches (skips dropped), head.

        The result shares no tensor with the supernet and gives the same outputs.
        """
        path = self.check_path(path)
        chosen = [stage[b] for stage, b in zip(self.stages, path) if not isinstance(stage[b], nn.Identity)]
        net = nn.Sequential(*(copy.deepcopy(m) for m in (self.stem, *chosen, self.head)))
        net.train(self.training)
        return net

    # ---------------------------------------------------------------- costs
    def path_cost(self, path, batch_size: int) -> PathCost:
        """Bytes, training FLOPs per sample and training memory (at ``batch_size``) of ``path``."""
        path = self.check_path(path)
        parts = self._parts(path, batch_size)
        return PathCost(
            bytes=sum(p.bytes for p in parts),
            flops_per_sample=float(sum(p.train_flops for p in parts)),
            train_memory_bytes=sum(p.train_memory for p in parts),
        )

    def forward_flops(self, path) -> float:
        """Inference FLOPs per sample of ``path`` (what evaluating a candidate costs)."""
        return float(sum(p.forward_flops for p in self._parts(self.check_path(path), 1)))

    def paths_within(
        self, batch_size: int, max_train_memory_bytes: float, max_flops_per_sample: float = math.inf
    ) -> list[BranchPath]:
        """Paths whose training memory and training FLOPs per sample fit the limits."""
        return [
            path for path in self.all_paths()
            if (cost := self.path_cost(path, batch_size)).train_memory_bytes <= max_train_memory_bytes
            and cost.flops_per_sample <= max_flops_per_sample
        ]

    def _parts(self, path: BranchPath, batch_size: int) -> list[_ComponentCost]:
        stem, stages, head = _component_costs(self.spec, int(batch_size))
        return [stem, *(stages[s][b] for s, b in enumerate(path)), head]


@functools.lru_cache(maxsize=32)
def _component_costs(spec: SupernetSpec, batch_size: int):
    """Costs of the stem, every branch and the head of ``spec``, measured once.

    Measured on a fresh instance (measuring runs training-mode passes that would move a
    trained network's BatchNorm statistics).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    net = MultiBranchNet(spec)
    shape = net.input_shape
    stem = _measure(net.stem, shape, batch_size, first=True)
    with torch.no_grad():
        x = net.eval().stem(torch.zeros((1, *shape)))
    stages = []
    for stage in net.stages:
        stages.append(tuple(_measure(branch, tuple(x.shape[1:]), batch_size, first=False) for branch in stage))
        with torch.no_grad():
            x = stage[0](x)
    head = _measure(net.head, tuple(x.shape[1:]), batch_size, first=False)
    return stem, tuple(stages), head


def _measure(module: nn.Module, input_shape: tuple[int, ...], batch_size: int, first: bool) -> _ComponentCost:
    if isinstance(module, nn.Identity):
        return _ComponentCost(0, 0.0, 0.0, 0)
    counted = module if first else _InputNeedsGrad(module)
    return _ComponentCost(
        bytes=parameter_bytes(module),
        train_flops=train_flops_per_sample(counted, input_shape),
        forward_flops=_forward_flops_per_sample(module, input_shape),
        train_memory=training_memory_bytes(module, input_shape, batch_size),
    )


def _forward_flops_per_sample(module: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Inference FLOPs per sample, counted by torch's ``FlopCounterMode`` in eval mode."""
    was_training = module.training
    counter = flop_counter()
    with torch.no_grad(), counter:
        module.eval()(torch.zeros((1, *input_shape)))
    module.train(was_training)
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------- registry
@register_model("multibranch_cnn")
def multibranch_cnn(num_classes: int, width: int, in_channels: int = 3) -> MultiBranchNet:
    """The AN supernet in the default CNN's layout (:func:`cnn_spec`)."""
    return MultiBranchNet(cnn_spec(num_classes, width, in_channels))


@register_model("multibranch_resnet18")
def multibranch_resnet18(num_classes: int, width: int, in_channels: int = 3) -> MultiBranchNet:
    """The AN supernet in the CIFAR ResNet18 layout, ``width`` = base channels (:func:`resnet18_spec`)."""
    return MultiBranchNet(resnet18_spec(num_classes, width, in_channels))
