"""Small backbones for 32x32 RGB inputs: the platform's default CNN and an MLP."""

from __future__ import annotations

from torch import nn

from models.registry import register_model


def _conv_stage(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU: the unit every stage of :class:`SmallCNN` repeats."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv stages (width, 2 width, 4 width) with pooling, global average pool, linear head.

    A CPU-sized network for 32x32 inputs (about 24k parameters at width 16).
    """

    def __init__(self, num_classes: int, width: int, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_stage(in_channels, width),
            nn.MaxPool2d(2),
            _conv_stage(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):  # noqa: D102
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Flatten, two hidden layers of ``width`` units with ReLU, linear head (ECLM's MLP family)."""

    def __init__(self, num_classes: int, width: int, in_channels: int = 3, side: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * side * side, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):  # noqa: D102
        return self.classifier(self.features(x))


@register_model("cnn")
def small_cnn(num_classes: int, width: int, in_channels: int = 3) -> nn.Module:
    """The platform's default network (:class:`SmallCNN`)."""
    return SmallCNN(num_classes, width, in_channels)


@register_model("mlp")
def mlp(num_classes: int, width: int, in_channels: int = 3) -> nn.Module:
    """A 3-layer MLP (:class:`MLP`)."""
    return MLP(num_classes, width, in_channels)
