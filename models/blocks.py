"""The conv-BN unit and the option-A residual basic block, shared by ECLM's modular networks and
the AN supernet.

:class:`BasicBlock` has an inner width ``c_mid``: ``c_mid = c_out`` is He et al.'s block, a smaller
one ECLM's shrunk module (ECLM 4.1) or an AN branch of reduced width. Its shortcut is
parameter-free (:class:`ResidualBypass`, option A), unlike the plain ResNet18 of
:mod:`models.resnet`, whose blocks project with a 1x1 conv (option B, as HeteroFL's and
FedRolex's ResNet18).
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
