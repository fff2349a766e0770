"""Building blocks of ECLM's modular networks: full blocks, shrunk modules, residual bypasses.

ECLM 4.1: a *shrunk* module repeats its block's layers with fewer hidden channels/neurons
and keeps the block's input and output shapes; a *residual* module lets the input bypass
the layer and has no parameters. When a block changes the shape, the bypass is He et
al.'s option-A shortcut (spatial subsampling plus zero channel padding; "Deep Residual
Learning", 2016, section 4.2), or, for vectors, an average pool to the output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    )


class ResidualBypass(nn.Module):
    """Parameter-free residual module: identity, or option-A shortcut when the shape changes.

    Option A (He et al. 2016, section 4.2): keep every ``stride``-th pixel and pad the new
    channels with zeros.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        if c_out < c_in:
            raise ValueError(f"a bypass cannot drop channels ({c_in} -> {c_out}); use c_out >= c_in")
        self.c_in, self.c_out, self.stride = c_in, c_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.c_out != self.c_in:
            x = F.pad(x, (0, 0, 0, 0, 0, self.c_out - self.c_in))
        return x


class BasicBlock(nn.Module):
    """ResNet basic block ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with inner width ``c_mid``.

    ``c_mid = c_out`` is the standard block (He et al. 2016); a smaller ``c_mid`` is its
    shrunk module. The shortcut is parameter-free, :class:`ResidualBypass` (option A, as in
    He et al.'s CIFAR ResNets, section 4.2): a 1x1-conv shortcut (option B) would add
    ``c_in * c_out`` unshrinkable weights and two ops to every shrunk module.
    """

    def __init__(self, c_in: int, c_mid: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(c_in, c_mid, 3, stride)
        self.conv2 = conv_bn(c_mid, c_out, 3, 1)
        self.shortcut = ResidualBypass(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


def resnet_stage(c_in: int, c_mid: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` basic blocks; the first one carries the stride and the width change."""
    layers = [BasicBlock(c_in, c_mid, c_out, stride)]
    layers += [BasicBlock(c_out, c_mid, c_out, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def conv_bottleneck(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    """Shrunk module of a one-conv VGG block: 3x3 conv to ``c_mid``, then 1x1 conv back to ``c_out``.

    A VGG block [Conv, BN, ReLU] has no inner width to shrink while keeping its output
    width, so (assumption; ECLM does not say) the shrunk module keeps the 3x3 conv with
    ``c_mid`` filters and restores the width with a 1x1 conv, each followed by BN and ReLU.
    """
    return nn.Sequential(
        conv_bn(c_in, c_mid, 3), nn.ReLU(), conv_bn(c_mid, c_out, 1), nn.ReLU()
    )


def vgg_block(c_in: int, c_out: int) -> nn.Sequential:
    """A VGG block: 3x3 conv, BN, ReLU (ECLM 4.1's [Conv, BN, ReLU, ...] pattern)."""
    return nn.Sequential(conv_bn(c_in, c_out, 3), nn.ReLU())


def mlp_module(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    """Shrunk two-layer MLP block: Linear to ``hidden`` neurons, ReLU, Linear to ``out_features``, ReLU."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features), nn.ReLU())


class VectorBypass(nn.Module):
    """Parameter-free residual module for vectors: average-pool the flattened input to ``out_features``.

    The vector analogue of option A (assumption): when the block changes the width, the
    bypass keeps a coarse, parameter-free summary of its input instead of learning one.
    """

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        flat = x.flatten(1)
        if flat.shape[1] == self.out_features:
            return flat
        return F.adaptive_avg_pool1d(flat.unsqueeze(1), self.out_features).squeeze(1)
