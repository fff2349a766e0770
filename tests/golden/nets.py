"""Tiny networks shared by the golden fixtures' generators and the golden tests.

Both sides build the same network and load the same initial weights from the fixture, so a
reference and the project start from identical tensors. Small on purpose: a fixture stays a
few kB.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TinyBNNet(nn.Module):
    """conv(3->c) - BN - ReLU - conv(c->c) - BN - ReLU - global pool - linear(c->classes).

    ``features`` and ``classifier`` follow the project's convention for networks whose
    penultimate features are read (LAME, SHOT).
    """

    def __init__(self, channels: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def seeded_net(seed: int, channels: int = 4, num_classes: int = 5) -> TinyBNNet:
    """A :class:`TinyBNNet` with weights drawn from ``seed`` and non-trivial BN statistics."""
    torch.manual_seed(seed)
    net = TinyBNNet(channels, num_classes)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n)).float())
                module.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, n)).float())
                module.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.2, n)).float())
                module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, n)).float())
    return net


def state_arrays(net: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """``net``'s state dict as fixture arrays named ``prefix/key`` (copies: later training leaves them alone)."""
    return {f"{prefix}/{key}": value.detach().cpu().numpy().copy() for key, value in net.state_dict().items()}


def load_state(net: nn.Module, arrays: dict[str, np.ndarray], prefix: str) -> nn.Module:
    """Load the ``prefix/key`` arrays of a fixture into ``net`` (strict); returns ``net``."""
    state = {key[len(prefix) + 1:]: torch.from_numpy(np.array(value)) for key, value in arrays.items()
             if key.startswith(prefix + "/")}
    net.load_state_dict(state, strict=True)
    return net


def shifted_images(seed: int, n: int, size: int = 8, shift: float = 0.5) -> torch.Tensor:
    """``n`` random 3 x size x size images with a constant offset (a crude domain shift)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(shift, 1.0, (n, 3, size, size))).float()
