"""The networks that run a width-scaled sub-model (HeteroFL, Diao et al. 2021), and their costs.

:func:`scaled_model` rebuilds a network at a width rate following the channel plan of
:func:`models.width.submodel.channel_axes`, with HeteroFL's Scaler after every hidden conv/linear.
It checks the plan against the network's own layers (Conv2d, Linear, BatchNorm only;
anything else with parameters is refused), so a sub-model built by surgery always has
exactly the shapes :func:`models.width.submodel.extract` cuts. Static BN
(:func:`models.batchnorm.reestimate_bn`, ``even_batches=True``) fills a trained sub-model's
BatchNorm statistics; :func:`rate_costs` measures what training each rate costs a device, and
the ``costs_*`` helpers carry those costs in a device's budget. :func:`static_bn_statistics`
measures a full model's static BN statistics on a set of inputs (the cloud's global sBN).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.batchnorm import batch_norm_layers, reestimate_bn
from models.costs import parameter_bytes, train_flops_per_sample, training_memory_bytes
from models.width.submodel import RUNNING_MEAN, RUNNING_VAR, WIDTH_RATES, channel_axes, check_rate, sub_shapes

ModelFactory = Callable[[], nn.Module]
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


# --------------------------------------------------------------------------- sub-model networks
class ScaledConv2d(nn.Conv2d):
    """A Conv2d followed by HeteroFL's Scaler: output / rate in training, unchanged in eval.

    HeteroFL (sec. 3.2, "Scaler"; ``modules.Scaler`` after every conv) rescales a
    sub-model's representations so they match the full model's magnitude during local
    training. The scaler lives inside the conv so the state-dict keys stay the full model's.
    """

    def __init__(self, *args, rate: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rate = check_rate(rate)

    def forward(self, x):  # noqa: D102
        out = super().forward(x)
        return out / self.rate if self.training else out


class ScaledLinear(nn.Linear):
    """A hidden Linear followed by HeteroFL's Scaler (see :class:`ScaledConv2d`)."""

    def __init__(self, *args, rate: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rate = check_rate(rate)

    def forward(self, x):  # noqa: D102
        out = super().forward(x)
        return out / self.rate if self.training else out


def _replacement(module: nn.Module, name: str, shapes: Mapping[str, tuple], axes: Mapping[str, tuple], rate: float):
    """The sub-model's version of one leaf layer (None for layers without tensors)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"{name}: grouped convs (groups={module.groups}) cannot be width-scaled")
        out_c, in_c = shapes[f"{name}.weight"][:2]
        return ScaledConv2d(
            in_c, out_c, module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode, rate=rate,
        )
    if isinstance(module, nn.Linear):
        out_f, in_f = shapes[f"{name}.weight"]
        if 0 not in axes[f"{name}.weight"]:  # the classifier: all classes, no scaler (HeteroFL conv.py)
            return nn.Linear(in_f, out_f, bias=module.bias is not None)
        return ScaledLinear(in_f, out_f, bias=module.bias is not None, rate=rate)
    if isinstance(module, _BATCH_NORMS):
        key = f"{name}.weight" if module.affine else f"{name}.running_mean"
        # momentum None: the cumulative average that static BN needs (HeteroFL conv.py)
        return type(module)(shapes[key][0], eps=module.eps, momentum=None, affine=module.affine)
    if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
        raise ValueError(f"{name}: {type(module).__name__} cannot be width-scaled (only Conv2d, Linear, BatchNorm)")
    return None


def scaled_model(full_model_factory: ModelFactory, rate: float) -> nn.Module:
    """The sub-model skeleton at ``rate``: the full network with every layer cut by :func:`channel_axes`.

    Layers are rebuilt at the cut sizes (hidden convs/linears with HeteroFL's Scaler);
    BatchNorms use batch statistics in training (HeteroFL's ``track_running_stats=False``)
    but keep their running-stat buffers, so the state-dict keys are the full model's and
    static BN (:func:`models.batchnorm.reestimate_bn`) can fill them before evaluation.
    """
    rate = check_rate(rate)
    model = full_model_factory()
    full = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes, axes = sub_shapes(full, rate), channel_axes(full)
    for name, module in list(model.named_modules()):
        if not name:
            continue
        new = _replacement(module, name, shapes, axes, rate)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    use_batch_statistics(model)
    return model


def check_width_scalable(model: nn.Module, rate: float = WIDTH_RATES[-1]) -> None:
    """Raise ValueError (naming the layer) if ``model`` cannot be cut to width ``rate``.

    Works on a deep copy (the model is left untouched): derives the channel plan and
    rebuilds every layer, as a device would.
    """
    scaled_model(lambda: copy.deepcopy(model), rate)


# --------------------------------------------------------------------------- BN regime
def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Training regime of HeteroFL's BN: batch statistics only, running buffers untouched.

    Static BN (:func:`models.batchnorm.reestimate_bn` with ``even_batches=True``) fills the
    buffers before evaluation and turns tracking back on; call this before training again.
    """
    for bn in batch_norm_layers(model):
        bn.track_running_stats = False
    return model


def static_bn_statistics(
    full_model_factory: ModelFactory, state: Mapping[str, np.ndarray], x: torch.Tensor, batch_size: int
) -> dict[str, np.ndarray]:
    """The BN running statistics static BN measures for the full model ``state`` on ``x``.

    The network from ``full_model_factory`` is loaded with ``state`` and its statistics are
    recomputed from empty on ``x`` (:func:`models.batchnorm.reestimate_bn`, ``even_batches=True``):
    HeteroFL's global sBN, which its ``train_classifier_fed.py`` ``stats()`` computes for the
    global model on the training set before every test. Nothing in ``state`` changes.

    Parameters
    ----------
    full_model_factory : callable
        Builds the full network (rate 1) whose state dict has ``state``'s keys and shapes.
    state : mapping of str to ndarray
        The full model's arrays.
    x : Tensor
        The inputs, shape (N, ...); with none, ``state``'s own statistics come back.
    batch_size : int
        Samples per forward pass (>= 1).

    Returns
    -------
    dict of str to ndarray
        Every ``running_mean`` and ``running_var`` entry, in ``state``'s dtypes.
    """
    model = full_model_factory()
    model.load_state_dict({key: torch.as_tensor(np.asarray(value)) for key, value in state.items()})
    with torch.no_grad():
        reestimate_bn(model, x, batch_size, even_batches=True)
    return {
        key: value.detach().cpu().numpy().astype(np.asarray(state[key]).dtype)
        for key, value in model.state_dict().items()
        if key.endswith((f".{RUNNING_MEAN}", f".{RUNNING_VAR}"))
    }


# --------------------------------------------------------------------------- costs per rate
@dataclass(frozen=True)
class RateCost:
    """What training the sub-model at one rate costs a device.

    Attributes
    ----------
    memory_bytes : float
        Training memory at the run's batch size (:func:`models.costs.training_memory_bytes`).
    flops_per_sample : float
        Training FLOPs per sample (:func:`models.costs.train_flops_per_sample`).
    model_bytes : float
        Bytes of the sub-model's state (one way over the link).
    """

    memory_bytes: float
    flops_per_sample: float
    model_bytes: float


#: Prefix of the cost entries a device adds to its reported budget.
COST_PREFIX = "width_cost"
#: Budget entry: training samples per round (local samples x epochs).
SAMPLES_KEY = f"{COST_PREFIX}/samples_per_round"
_COST_FIELDS = ("memory_bytes", "flops_per_sample", "model_bytes")


def rate_costs(
    full_model_factory: ModelFactory,
    input_shape: tuple[int, ...],
    batch_size: int,
    rates: Sequence[float] = WIDTH_RATES,
) -> dict[float, RateCost]:
    """Measured costs of the sub-model at each rate (torch's FLOP counter, hooks for memory)."""
    costs = {}
    for rate in rates:
        model = scaled_model(full_model_factory, rate)
        costs[float(rate)] = RateCost(
            memory_bytes=float(training_memory_bytes(model, input_shape, batch_size)),
            flops_per_sample=float(train_flops_per_sample(model, input_shape)),
            model_bytes=float(parameter_bytes(model)),
        )
    return costs


def cost_key(rate: float, field: str) -> str:
    """Budget entry holding ``field`` of the sub-model at ``rate``."""
    return f"{COST_PREFIX}/{float(rate):g}/{field}"


def costs_to_record(costs: Mapping[float, RateCost], samples_per_round: int) -> dict[str, float]:
    """Flat budget entries for ``costs`` (what a device reports at discovery)."""
    record = {SAMPLES_KEY: float(samples_per_round)}
    for rate, cost in costs.items():
        for field in _COST_FIELDS:
            record[cost_key(rate, field)] = float(getattr(cost, field))
    return record


def costs_from_record(record: Mapping[str, object], rates: Sequence[float]) -> tuple[dict[float, RateCost], float]:
    """Per-rate costs and samples per round read back from a reported budget, or ValueError."""
    missing = [k for k in [SAMPLES_KEY] + [cost_key(r, f) for r in rates for f in _COST_FIELDS] if k not in record]
    if missing:
        raise ValueError(
            f"budget has no {missing[0]!r}; the device must run a width-scaling client (HeteroFLClient)"
        )
    costs = {float(r): RateCost(*(float(record[cost_key(r, f)]) for f in _COST_FIELDS)) for r in rates}
    return costs, float(record[SAMPLES_KEY])
