"""Building blocks of ECLM's modular networks: full blocks, shrunk modules, residual bypasses.

ECLM 4.1: a *shrunk* module repeats its block's layers with fewer hidden channels/neurons
and keeps the block's input and output shapes; a *residual* module lets the input bypass
the layer and has no parameters. When a block changes the shape, the bypass is He et
al.'s option-A shortcut (:class:`models.blocks.ResidualBypass`), or, for vectors, an average
pool to the output width (:class:`VectorBypass`). The conv-BN unit and the basic block with an
inner width, which the AN supernet uses too, are in :mod:`models.blocks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import BasicBlock, conv_bn


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
