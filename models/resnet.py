"""A plain CIFAR-style ResNet18 (He et al. 2016, sec. 4.2 layout for 32x32 inputs).

3x3 stem (stride 1, no max-pool), four stages of two BasicBlocks with widths
(w, 2w, 4w, 8w) and strides (1, 2, 2, 2), global average pool, linear head. ``width``
is the base channel count: 64 is the paper's (and HeteroFL's / FedRolex's) ResNet18,
16 a narrow variant that trains on a CPU.
"""

from __future__ import annotations

from torch import nn

from models.registry import register_model

#: BasicBlocks per stage of ResNet18 (He et al. 2016, Table 1).
RESNET18_BLOCKS = (2, 2, 2, 2)
#: Stage width multipliers of the base width and their first block's stride.
STAGE_MULTIPLIERS = (1, 2, 4, 8)
STAGE_STRIDES = (1, 2, 2, 2)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut.

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    stride : int
        Stride of the first conv (and of the projection).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x):  # noqa: D102
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet18: stem, 4 stages x 2 BasicBlocks, average pool, linear classifier.

    Parameters
    ----------
    num_classes : int
        Classifier outputs.
    width : int
        Channels of the stem and the first stage (stages: w, 2w, 4w, 8w).
    in_channels : int
        Image channels.
    """

    def __init__(self, num_classes: int, width: int, in_channels: int = 3) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ResNet18 width must be >= 1, got {width}; use 64 (paper) or 16 (CPU)")
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], width
        for blocks, mult, stride in zip(RESNET18_BLOCKS, STAGE_MULTIPLIERS, STAGE_STRIDES):
            c_out = mult * width
            layers = [BasicBlock(c_in, c_out, stride)] + [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):  # noqa: D102
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.classifier(self.pool(out))


@register_model("resnet18")
def resnet18(num_classes: int, width: int, in_channels: int = 3) -> nn.Module:
    """CIFAR-style ResNet18 (:class:`ResNet18`); ``width`` 64 for the paper's, 16 for CPU."""
    return ResNet18(num_classes, width, in_channels)
