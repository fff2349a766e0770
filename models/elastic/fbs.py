"""Feature Boosting and Suppression (FBS) gates and the gated conv unit of ElasticDNN's master DNN.

FBS (Gao et al. 2019, "Dynamic channel pruning: feature boosting and suppression", sec. 3)
predicts from a layer's input one saliency value per output channel and multiplies the
channel by it; ElasticDNN (sec. III-B1/B2, eq. 2) puts one such gate on every conv of the
master DNN and reads the gate values as the filters' relevance to the current domain:

    p = ReLU(Linear(GAP(|x|)))          (eq. 2; |x| as in FBS's L1 subsampling and EdgeTailor)
    y = BN(conv(x)) * p[:, :, None, None]

With ``hidden`` set, the gate is the 2-layer bottleneck ``Linear-ReLU-Linear-ReLU`` of the
group's later EdgeTA/EdgeTailor code. In both variants the last bias starts at 1 and the last
weight is Kaiming-normal (EdgeTailor ``alg/algs/offline/EdgeTailorCL/model_fbs.py``), so a
fresh master gates every channel at about 1, like a plain network.

:class:`GatedConvBN` adds two switches used around the gate:

* ``keep_mask`` (a buffer, all ones by default): channels whose entry is 0 are removed
  exactly (their output is 0 for every input); the surrogate extraction uses it to build the
  "masked master" a surrogate must equal.
* ``k`` (None or an int): keep only the ``k`` largest gate values of each sample and zero the
  rest, FBS's k-winners-take-all; the random "target sparsity" of pre-training sets it.

The unit records the gate values of its last forward (detached) for inspection and the
gate L1 of that forward (with its graph) for the sparsity loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Initial bias of the gate's last Linear (EdgeTailor model_fbs.py: ``nn.init.constant_(bias, 1.)``).
GATE_BIAS_INIT = 1.0
#: Std of the gate's last weight at init. EdgeTailor uses Kaiming-normal, but through the 14-28
#: multiplicative gates of a CIFAR ResNet that made the initial logits' std ~4e3 here
#: (measured on fbs_resnet_cpu, width 8) and pre-training diverged; a small std starts every
#: gate near its bias (p ~ 1, a plain ResNet) and lets training shape the gates (our choice).
GATE_WEIGHT_INIT_STD = 0.01
#: Digits kept when ``fraction * size`` is rounded before ``ceil`` (0.2 * 30 must give 6, not 7).
_ROUNDING_DIGITS = 9


# --------------------------------------------------------------------------- fractions
def check_fraction(fraction: float, what: str = "keep_fraction") -> float:
    """``fraction`` as a float in (0, 1], or ValueError naming ``what``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < float(fraction) <= 1:
        raise ValueError(f"{what} must be a number in (0, 1], got {fraction!r}; e.g. 0.2 keeps 20% of the filters")
    return float(fraction)


def kept_count(size: int, fraction: float) -> int:
    """Channels kept of ``size`` at ``fraction``: ``ceil(fraction * size)``, at least 1.

    The ceiling (as HeteroFL's ``np.ceil`` for width rates) never keeps fewer than the asked
    share; ``fraction * size`` is rounded to 9 digits first so float noise (0.2 * 30 =
    6.000000000000001) does not add a channel.
    """
    if size < 1:
        raise ValueError(f"a layer needs >= 1 channel, got {size}")
    return max(1, math.ceil(round(check_fraction(fraction) * size, _ROUNDING_DIGITS)))


def top_k_gates(gates: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest values of every row of ``gates`` ``[B, C]`` and zero the others.

    FBS's k-winners-take-all (Gao et al. 2019, eq. 6); EdgeTailor's ``KTakesAll``. The kept
    values keep their gradient; ties are broken by :func:`torch.topk`.
    """
    if not 1 <= k <= gates.shape[1]:
        raise ValueError(f"top-k needs 1 <= k <= {gates.shape[1]} channels, got k={k}")
    if k == gates.shape[1]:
        return gates
    winners = torch.topk(gates, k, dim=1).indices
    mask = torch.zeros_like(gates).scatter_(1, winners, 1.0)
    return gates * mask


# --------------------------------------------------------------------------- gate
class FBSGate(nn.Module):
    """The FBS saliency predictor: ``p = ReLU(Linear(GAP(|x|)))`` or its bottleneck variant.

    Parameters
    ----------
    c_in : int
        Channels of the conv's input (the gate's input features).
    c_out : int
        Filters of the conv (one gate value each).
    hidden : int or None
        None: one Linear (ElasticDNN eq. 2). An int: ``Linear(c_in, hidden)-ReLU-
        Linear(hidden, c_out)-ReLU`` (EdgeTA/EdgeTailor bottleneck). The last bias starts
        at :data:`GATE_BIAS_INIT`.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int | None = None) -> None:
        super().__init__()
        for label, value in (("c_in", c_in), ("c_out", c_out)):
            if int(value) < 1:
                raise ValueError(f"FBSGate {label} must be >= 1, got {value}")
        if hidden is not None and int(hidden) < 1:
            raise ValueError(f"FBSGate hidden must be None or >= 1, got {hidden}; None is the paper's one Linear")
        self.c_in, self.c_out, self.hidden = int(c_in), int(c_out), hidden
        self.hidden_layer = None if hidden is None else nn.Linear(c_in, int(hidden))
        self.output_layer = nn.Linear(c_in if hidden is None else int(hidden), c_out)
        nn.init.normal_(self.output_layer.weight, std=GATE_WEIGHT_INIT_STD)
        nn.init.constant_(self.output_layer.bias, GATE_BIAS_INIT)

    def forward(self, x: Tensor) -> Tensor:
        """Gate values ``[B, c_out]`` (>= 0) for the feature map ``x`` ``[B, c_in, H, W]``."""
        features = x.abs().mean(dim=(2, 3))
        if self.hidden_layer is not None:
            features = torch.relu(self.hidden_layer(features))
        return torch.relu(self.output_layer(features))

    @torch.no_grad()
    def sliced_state(self, out_idx: Tensor, in_idx: Tensor | None) -> dict[str, Tensor]:
        """The state of this gate restricted to outputs ``out_idx`` and inputs ``in_idx`` (None: all).

        Hidden units are not filters: the bottleneck keeps all of them.
        """
        out_w = self.output_layer.weight.index_select(0, out_idx)
        state = {"output_layer.bias": self.output_layer.bias.index_select(0, out_idx)}
        if self.hidden_layer is None:
            state["output_layer.weight"] = _select_inputs(out_w, in_idx)
        else:
            state["output_layer.weight"] = out_w
            state["hidden_layer.weight"] = _select_inputs(self.hidden_layer.weight, in_idx)
            state["hidden_layer.bias"] = self.hidden_layer.bias.detach().clone()
        return state


def _select_inputs(weight: Tensor, in_idx: Tensor | None) -> Tensor:
    """``weight[:, in_idx]`` as a copy (all columns when ``in_idx`` is None)."""
    return weight.detach().clone() if in_idx is None else weight.index_select(1, in_idx)


# --------------------------------------------------------------------------- gated conv
class GatedConvBN(nn.Module):
    """``y = BN(conv(x)) * p`` with an FBS gate ``p`` (ElasticDNN eq. 2), a keep mask and top-k.

    Parameters
    ----------
    c_in, c_out : int
        Input channels and filters.
    stride : int
        Stride of the conv.
    kernel_size : int
        Square kernel side (padding ``kernel_size // 2`` keeps the size at stride 1).
    hidden : int or None
        The gate's bottleneck width (see :class:`FBSGate`).

    Attributes
    ----------
    keep_mask : Tensor
        Buffer ``[c_out]`` of 0/1; a 0 removes the filter exactly.
    k : int or None
        Top-k gate values kept per sample (None: all).
    last_raw_gates, last_gates : Tensor or None
        Gate values ``[B, c_out]`` of the last forward, detached: as predicted (the
        filters' relevance, paper III-B2) and as applied (after keep mask and top-k).
    last_gate_l1 : Tensor or None
        ``sum |p|`` over the batch and the channels of the last forward (EdgeTailor's
        ``raw_w.norm(1)``), with its graph, for the sparsity loss.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel_size: int = 3, hidden: int | None = None) -> None:
        super().__init__()
        if int(stride) < 1 or int(kernel_size) < 1:
            raise ValueError(f"stride and kernel_size must be >= 1, got {stride} and {kernel_size}")
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.gate = FBSGate(c_in, c_out, hidden)
        self.register_buffer("keep_mask", torch.ones(c_out))
        self.k: int | None = None
        self.last_raw_gates: Tensor | None = None
        self.last_gates: Tensor | None = None
        self.last_gate_l1: Tensor | None = None

    @property
    def out_channels(self) -> int:
        """Number of filters."""
        return self.conv.out_channels

    def set_k(self, k: int | None) -> None:
        """Keep only the ``k`` largest gate values per sample (None: keep all)."""
        if k is not None and not 1 <= int(k) <= self.out_channels:
            raise ValueError(f"k must be None or in 1..{self.out_channels}, got {k}")
        self.k = None if k is None else int(k)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        raw = self.gate(x)
        self.last_gate_l1 = raw.abs().sum()
        gates = raw * self.keep_mask
        if self.k is not None:
            gates = top_k_gates(gates, self.k)
        self.last_raw_gates, self.last_gates = raw.detach(), gates.detach()
        return self.bn(self.conv(x)) * gates[:, :, None, None]

    def __getstate__(self):
        """Drop the L1's autograd graph so ``copy.deepcopy`` of a trained unit works."""
        state = self.__dict__.copy()
        state["last_gate_l1"] = None
        return state

    @torch.no_grad()
    def sliced_state(self, out_idx: Tensor, in_idx: Tensor | None) -> dict[str, Tensor]:
        """This unit's state restricted to filters ``out_idx`` and input channels ``in_idx`` (None: all).

        Copies (never views) of: conv weight ``[out][:, in]``; BN affine and running
        statistics ``[out]``; the gate (:meth:`FBSGate.sliced_state`); the keep mask becomes
        all ones (the smaller unit holds exactly the kept filters).
        """
        state = {"conv.weight": _select_inputs(self.conv.weight.index_select(0, out_idx), in_idx)}
        for key in ("weight", "bias", "running_mean", "running_var"):
            state[f"bn.{key}"] = getattr(self.bn, key).index_select(0, out_idx)
        state["bn.num_batches_tracked"] = self.bn.num_batches_tracked.clone()
        state.update({f"gate.{key}": value for key, value in self.gate.sliced_state(out_idx, in_idx).items()})
        state["keep_mask"] = torch.ones(len(out_idx), dtype=self.keep_mask.dtype)
        return state


def gated_units(module: nn.Module) -> list[tuple[str, GatedConvBN]]:
    """Every :class:`GatedConvBN` inside ``module``, as ``(name, unit)`` in module order."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, GatedConvBN)]


# --------------------------------------------------------------------------- channel groups
@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must keep or drop together when a surrogate is cut out of the master.

    A residual stream is one group: every unit writing into it (the stem, each block's
    second conv, a projection shortcut) must keep the same channels so the additions stay
    aligned; a block's inner channels form a group of their own.

    Parameters
    ----------
    name : str
        Group id (e.g. ``"stream0"``, ``"stages.0.1.inner"``).
    size : int
        Channels in the master.
    writers : tuple of str
        Names of the gated units whose filters (output channels) are these channels.
    readers : tuple of str
        Names of the modules whose input channels are these channels (gated units or a
        final ``nn.Linear``).
    """

    name: str
    size: int
    writers: tuple[str, ...]
    readers: tuple[str, ...]

