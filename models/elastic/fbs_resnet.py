"""ElasticDNN's master DNN: a CIFAR-style ResNet whose every conv is an FBS-gated conv unit.

Layout (He et al. 2016, sec. 4.2): a 3x3 stem, 3 stages of ``n`` BasicBlocks with widths
``w, 2w, 4w`` and first-block strides ``1, 2, 2``, global average pool, linear classifier. A
block whose shape changes gets a 1x1 conv-BN projection shortcut. Every conv (stem, both
convs of a block, projection) is a :class:`~models.elastic.fbs.GatedConvBN` (ElasticDNN III-B1:
"each convolutional layer is extended with a FBS module").

Channel groups (:meth:`FBSResNet.channel_groups`), which the surrogate extraction obeys:

* ``stream{s}`` -- the residual stream of stage ``s``. Writers: the stem (stage 0), the
  first block's projection (stages 1, 2), every block's ``conv2``. Readers: every ``conv1``
  and projection fed by that stream, and the classifier (last stage). One selection of
  channels for the whole group keeps every residual addition aligned.
* ``stages.{s}.{b}.inner`` -- the inner channels of a block: written by its ``conv1``, read
  by its ``conv2``; free of any other layer.

Registered networks: ``fbs_resnet56`` (n = 9, the paper's ResNet56 layout, width 16) and
``fbs_resnet_cpu`` (n = 2, a ResNet14). Measured eval forward of 64 32x32 images on one CPU
thread: fbs_resnet_cpu width 8 about 32 ms (50k parameters), width 16 about 94 ms,
fbs_resnet56 width 16 about 460 ms; so width 8 is the CPU setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.elastic.fbs import ChannelGroup, GatedConvBN, check_fraction, gated_units, kept_count
from models.registry import register_model

#: BasicBlocks per stage of ResNet56: 6n + 2 = 56 layers (He et al. 2016, sec. 4.2).
RESNET56_BLOCKS = 9
#: BasicBlocks per stage of the CPU variant: 6n + 2 = 14 layers.
CPU_BLOCKS = 2
#: Stage width multipliers of the base width and the first block's stride (He et al. 2016, sec. 4.2).
STAGE_MULTIPLIERS = (1, 2, 4)
STAGE_STRIDES = (1, 2, 2)
#: Name of the classifier module (a reader of the last stream).
CLASSIFIER = "classifier"


class FBSBasicBlock(nn.Module):
    """Two gated 3x3 conv units and an identity or gated 1x1 projection shortcut.

    Parameters
    ----------
    c_in : int
        Channels of the incoming stream.
    c_inner : int
        Filters of ``conv1`` (the block's free inner channels).
    c_out : int
        Channels of the outgoing stream.
    stride : int
        Stride of ``conv1`` and of the projection.
    hidden : int or None
        Gate bottleneck width (see :class:`~models.elastic.fbs.FBSGate`).
    """

    def __init__(self, c_in: int, c_inner: int, c_out: int, stride: int, hidden: int | None) -> None:
        super().__init__()
        self.conv1 = GatedConvBN(c_in, c_inner, stride, hidden=hidden)
        self.conv2 = GatedConvBN(c_inner, c_out, 1, hidden=hidden)
        self.shortcut = GatedConvBN(c_in, c_out, stride, kernel_size=1, hidden=hidden) if stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class FBSResNet(nn.Module):
    """The gated CIFAR ResNet (module docstring); any per-group width, so surrogates share the class.

    Parameters
    ----------
    num_classes : int
        Classifier outputs.
    in_channels : int
        Image channels.
    blocks_per_stage : int
        ``n`` (9 for ResNet56).
    stream_widths : sequence of 3 ints
        Channels of the residual stream of each stage (``w, 2w, 4w`` in the master).
    inner_widths : sequence of 3 sequences of ints, or None
        Inner channels of every block, per stage; None: the stage's stream width.
    gate_hidden : int or None
        Gate bottleneck width shared by every gate (None: the paper's one Linear).

    Notes
    -----
    A projection shortcut sits where the stride is not 1 (the first block of stages 1 and
    2), which is also exactly where the master's stream width changes.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 3,
        blocks_per_stage: int = RESNET56_BLOCKS,
        stream_widths: Sequence[int] = (16, 32, 64),
        inner_widths: Sequence[Sequence[int]] | None = None,
        gate_hidden: int | None = None,
    ) -> None:
        super().__init__()
        inner_widths = _check_widths(num_classes, in_channels, blocks_per_stage, stream_widths, inner_widths)
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        self.blocks_per_stage, self.gate_hidden = int(blocks_per_stage), gate_hidden
        self.stream_widths = tuple(int(w) for w in stream_widths)
        self.inner_widths = tuple(tuple(int(w) for w in stage) for stage in inner_widths)
        self.stem = GatedConvBN(in_channels, self.stream_widths[0], 1, hidden=gate_hidden)
        stages, c_in = [], self.stream_widths[0]
        for c_out, inner, stride in zip(self.stream_widths, self.inner_widths, STAGE_STRIDES):
            blocks = [FBSBasicBlock(c_in if b == 0 else c_out, inner[b], c_out, stride if b == 0 else 1, gate_hidden)
                      for b in range(self.blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(self.stream_widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out = torch.relu(self.stem(x))
        for stage in self.stages:
            out = stage(out)
        return self.classifier(out.mean(dim=(2, 3)))

    # ------------------------------------------------------------------ gates
    def gated_units(self) -> list[tuple[str, GatedConvBN]]:
        """Every gated conv unit as ``(name, unit)``, in forward order (stem first)."""
        return gated_units(self)

    def set_sparsity(self, fraction: float | None) -> None:
        """Top-k gating with ``k = ceil(fraction * filters)`` in every unit; None switches it off.

        ``fraction`` is the share of each layer's gates KEPT per sample (1 minus
        EdgeTailor's ``k``, the share zeroed); pre-training draws it at random per step.
        """
        if fraction is not None:
            check_fraction(fraction, "sparsity")
        for _, unit in self.gated_units():
            unit.set_k(None if fraction is None else kept_count(unit.out_channels, fraction))

    def gate_l1(self) -> Tensor:
        """Sum of every unit's gate L1 of the last forward (FBS's lasso term, with its graph)."""
        values = [unit.last_gate_l1 for _, unit in self.gated_units() if unit.last_gate_l1 is not None]
        if not values:
            raise RuntimeError("gate_l1 needs a forward pass first: call the model on a batch")
        return torch.stack(values).sum()

    # ------------------------------------------------------------------ channel groups
    def channel_groups(self) -> tuple[ChannelGroup, ...]:
        """The channel groups (module docstring): residual streams and block inner channels."""
        streams, inners = [], []
        for s, stage in enumerate(self.stages):
            writers = ["stem"] if s == 0 else [f"stages.{s}.0.shortcut"]
            readers = ["stages.0.0.conv1"] if s == 0 else []  # a later stage's first block reads the stream before
            for b, block in enumerate(stage):
                prefix = f"stages.{s}.{b}"
                writers.append(f"{prefix}.conv2")
                if b + 1 < len(stage):
                    readers.append(f"stages.{s}.{b + 1}.conv1")
                inners.append(ChannelGroup(f"{prefix}.inner", block.conv1.out_channels, (f"{prefix}.conv1",),
                                           (f"{prefix}.conv2",)))
            if s + 1 < len(self.stages):
                readers += [f"stages.{s + 1}.0.conv1", f"stages.{s + 1}.0.shortcut"]
            else:
                readers.append(CLASSIFIER)
            streams.append(ChannelGroup(f"stream{s}", self.stream_widths[s], tuple(writers), tuple(readers)))
        return tuple(streams + inners)

    def resized(self, group_sizes: Mapping[str, int], device: str | torch.device = "meta") -> FBSResNet:
        """A network of this layout with ``group_sizes[group]`` channels per channel group.

        Built on ``device`` (default ``"meta"``: no memory and no random draws; the caller
        then loads real tensors with ``load_state_dict(..., assign=True)``).
        """
        missing = sorted(g.name for g in self.channel_groups() if g.name not in group_sizes)
        if missing:
            raise ValueError(f"group_sizes misses the channel group(s) {missing}; give a size for every group")
        streams = [group_sizes[f"stream{s}"] for s in range(len(self.stages))]
        inners = [[group_sizes[f"stages.{s}.{b}.inner"] for b in range(self.blocks_per_stage)]
                  for s in range(len(self.stages))]
        with torch.device(device):
            return FBSResNet(self.num_classes, in_channels=self.in_channels, blocks_per_stage=self.blocks_per_stage,
                             stream_widths=streams, inner_widths=inners, gate_hidden=self.gate_hidden)


def _check_widths(num_classes, in_channels, blocks, stream_widths, inner_widths) -> list[list[int]]:
    """Validate the constructor's sizes; return the inner widths (default: the stream widths)."""
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels), ("blocks_per_stage", blocks)):
        if int(value) < 1:
            raise ValueError(f"FBSResNet {label} must be >= 1, got {value}")
    if len(stream_widths) != len(STAGE_STRIDES) or min(stream_widths) < 1:
        raise ValueError(f"stream_widths must be {len(STAGE_STRIDES)} ints >= 1, got {tuple(stream_widths)}")
    if inner_widths is None:
        return [[int(w)] * int(blocks) for w in stream_widths]
    if len(inner_widths) != len(STAGE_STRIDES) or any(len(s) != blocks or min(s) < 1 for s in inner_widths):
        raise ValueError(f"inner_widths must hold {len(STAGE_STRIDES)} stages of {blocks} ints >= 1, "
                         f"got {inner_widths}")
    return [list(s) for s in inner_widths]


def build_fbs_resnet(num_classes: int, width: int, in_channels: int, blocks_per_stage: int,
                     gate_hidden: int | None = None, seed: int | None = None) -> FBSResNet:
    """A master :class:`FBSResNet` with stage widths ``width * (1, 2, 4)``.

    ``seed`` (optional) makes the initial weights reproducible without touching torch's
    global random state (the draws run inside ``torch.random.fork_rng``).
    """
    if int(width) < 1:
        raise ValueError(f"width must be >= 1, got {width}; use 16 (paper's ResNet56) or 8 (CPU)")

    def make() -> FBSResNet:
        return FBSResNet(num_classes, in_channels=in_channels, blocks_per_stage=blocks_per_stage,
                         stream_widths=[m * int(width) for m in STAGE_MULTIPLIERS], gate_hidden=gate_hidden)

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(np.random.default_rng([int(seed), blocks_per_stage]).integers(2**62)))
        return make()


@register_model("fbs_resnet56")
def fbs_resnet56(num_classes: int, width: int, in_channels: int = 3, gate_hidden: int | None = None,
                 seed: int | None = None) -> FBSResNet:
    """ElasticDNN's ResNet56 master (n = 9 blocks per stage; ``width`` 16 is the paper's)."""
    return build_fbs_resnet(num_classes, width, in_channels, RESNET56_BLOCKS, gate_hidden, seed)


@register_model("fbs_resnet_cpu")
def fbs_resnet_cpu(num_classes: int, width: int, in_channels: int = 3, gate_hidden: int | None = None,
                   seed: int | None = None) -> FBSResNet:
    """A CPU-sized master: the same layout with n = 2 blocks per stage (a ResNet14).

    Use ``width`` 8 for simulations (forward of 64 32x32 images about 32 ms on one thread,
    under 50 ms); 16 gives the paper's channel widths at a quarter of ResNet56's depth.
    """
    return build_fbs_resnet(num_classes, width, in_channels, CPU_BLOCKS, gate_hidden, seed)
