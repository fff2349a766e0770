"""Edge handler of HeteroFL (Diao et al. 2021) and FedRolex (Alam et al. 2022).

The device rebuilds the sub-model skeleton at the rate the cloud chose, loads the cut
arrays, trains with batch-statistics BN and HeteroFL's scaler, recomputes static BN on
its training data (sBN, HeteroFL sec. 3.2), evaluates on its local test data and sends
the trained sub-model (parameters and sBN statistics) back, with the classes of its
training data (the cloud merges the classifier's rows by them, HeteroFL's
``label_split``). Asked to evaluate, it scores the received model with sBN on its own
training data, or as received (``static_bn`` false: the global statistics the cloud sent),
and, asked for ``statistics``, sends back the sBN statistics it measured (the cloud's sBN
query). When the message asks for it (``label_mask``), the logits of classes
the device has no data of are masked in training and in the local test, and the
gradient norm is clipped (``clip_grad_norm``), as the official clients do
(:mod:`models.width.training`). At discovery it also reports what each width rate would
cost it, so the cloud can pick the widest rate that fits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from clients.base import ClientHandler, DeviceTensors, MalformedMessage, content_reply, derive_seed, round_of
from clients.protocol import (
    ACCURACY_KEY,
    ARRAYS_RECORD,
    BUDGET_RECORD,
    COMPUTE_TIME_KEY,
    CONFIG_RECORD,
    PARTITION_KEY,
    SAMPLES_TRAINED_KEY,
    TEST_EXAMPLES_KEY,
    TRAIN_EXAMPLES_KEY,
    WEIGHT_KEY,
)
from models.batchnorm import reestimate_bn
from models.clock import compute_time_s
from models.training import accuracy
from models.width.layers import RateCost, costs_to_record, rate_costs, scaled_model
from models.width.submodel import RUNNING_MEAN, RUNNING_VAR, WIDTH_RATES, check_rate
from models.width.training import LabelMasked, device_classes, train_submodel

#: Config entries of a message: the sub-model's width rate, the channel window's roll (FedRolex),
#: whether to mask absent classes' logits, the gradient-norm clip, and (evaluation) whether to
#: send back the BN statistics measured on local data (the sBN query).
RATE_KEY = "rate"
OFFSET_KEY = "offset"
LABEL_MASK_KEY = "label_mask"
CLIP_GRAD_NORM_KEY = "clip_grad_norm"
STATISTICS_KEY = "statistics"
#: Config entry of an evaluation message: whether to recompute static BN on the device's training
#: data before scoring (absent: true); false scores the model with the statistics it carries.
STATIC_BN_KEY = "static_bn"
#: Config record of a training reply naming the classes of the device's training data, and its
#: entry (a sorted list of ints; empty without data).
LABELS_RECORD = "labels"
CLASSES_KEY = "classes"
#: Metric of the label-masked local test (the official one).
MASKED_ACCURACY_KEY = "masked_accuracy"
#: Suffixes of the BN running statistics sent back by an sBN query (torch BatchNorm buffer names).
BN_STATISTICS = (f".{RUNNING_MEAN}", f".{RUNNING_VAR}")
#: Costs already measured in this process, keyed by (network signature, input shape, batch size, rate):
#: an actor serving many devices of the same run measures each rate once.
_COST_CACHE: dict[tuple, RateCost] = {}


@dataclass(frozen=True)
class WidthConfig:
    """What a HeteroFL/FedRolex message asks of the device.

    Attributes
    ----------
    rate : float
        The sub-model's width rate (required).
    offset : int
        The channel window's roll (FedRolex; 0 = the prefix).
    label_mask : bool
        Mask absent classes' logits in training and local test (absent from the message: False).
    clip_grad_norm : float or None
        Clip the gradient norm to this (absent from the message: no clipping).
    """

    rate: float
    offset: int = 0
    label_mask: bool = False
    clip_grad_norm: float | None = None


def width_config(msg: Message) -> WidthConfig:
    """The :class:`WidthConfig` of a message's config record, or MalformedMessage naming the bad entry."""
    config = msg.content.config_records.get(CONFIG_RECORD)
    if config is None or RATE_KEY not in config:
        raise MalformedMessage(f"config has no {RATE_KEY!r}; HeteroFL messages carry the sub-model's width rate")
    try:
        rate = check_rate(config[RATE_KEY])
    except ValueError as exc:
        raise MalformedMessage(str(exc)) from exc
    offset = config.get(OFFSET_KEY, WidthConfig.offset)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise MalformedMessage(f"config {OFFSET_KEY!r} must be a non-negative int, got {offset!r}")
    label_mask = config.get(LABEL_MASK_KEY, WidthConfig.label_mask)
    if not isinstance(label_mask, bool):
        raise MalformedMessage(f"config {LABEL_MASK_KEY!r} must be a bool, got {label_mask!r}")
    clip = config.get(CLIP_GRAD_NORM_KEY)
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0
                             or not math.isfinite(clip)):
        raise MalformedMessage(f"config {CLIP_GRAD_NORM_KEY!r} must be a finite number > 0, got {clip!r}")
    return WidthConfig(rate, offset, label_mask, None if clip is None else float(clip))


def evaluation_asks(msg: Message) -> tuple[bool, bool]:
    """``(static_bn, statistics)`` of an evaluation message, or MalformedMessage naming the bad entry.

    ``static_bn`` (absent: true): recompute static BN on the training data before scoring;
    ``statistics`` (absent: false): send back the BN statistics so measured, which needs
    ``static_bn``.
    """
    config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
    static_bn, statistics = config.get(STATIC_BN_KEY, True), config.get(STATISTICS_KEY, False)
    for key, value in ((STATIC_BN_KEY, static_bn), (STATISTICS_KEY, statistics)):
        if not isinstance(value, bool):
            raise MalformedMessage(f"config {key!r} must be a bool, got {value!r}")
    if statistics and not static_bn:
        raise MalformedMessage(f"config asks for {STATISTICS_KEY!r} with {STATIC_BN_KEY!r} false; "
                               "the statistics sent back are the ones static BN measures")
    return static_bn, statistics


class HeteroFLClient(ClientHandler):
    """Train the width-scaled sub-model the cloud sent (HeteroFL; FedRolex sends a rolled window).

    The reply's ``accuracy`` is the trained sub-model's, with static BN recomputed on the
    device's training data, on its held-out local test data over all classes, as every other
    method's local test; ``masked_accuracy`` is the official local test, label-masked by the
    device's training classes when the message asks for ``label_mask`` (predictions confined
    to those classes). The reply's ``labels`` record names the classes of the training data
    (``classes``, a sorted list of ints; empty without data).
    """

    # ---------------------------------------------------------------- entry points
    def query(self, msg: Message, context: Context) -> Message:
        """The base report plus, in the budget, each rate's training memory, FLOPs and bytes."""
        reply = super().query(msg, context)
        device = self.device
        data = device.data(0)
        costs = self.costs(WIDTH_RATES, input_shape_of(data))
        samples = device.num_examples(0) * device.train.epochs
        reply.content[BUDGET_RECORD].update(costs_to_record(costs, samples))
        return reply

    def train(self, msg: Message, context: Context) -> Message:
        """Train the sub-model, recompute static BN, evaluate; reply with its arrays, metrics and classes."""
        server_round = round_of(msg)
        asked = width_config(msg)
        device = self.device
        model = self.sub_model(msg, asked.rate)
        data = device.data(device.slot_of_round(server_round))
        classes = device_classes(data.train_y)
        loss = train_submodel(
            model, data.train_x, data.train_y, device.train,
            seed=derive_seed(device.seed, device.partition_id, server_round),
            classes=classes if asked.label_mask else None, clip_grad_norm=asked.clip_grad_norm,
        )
        self.prepare_for_evaluation(model, data.train_x)
        samples = len(data.train_y) * device.train.epochs
        flops = self.costs((asked.rate,), input_shape_of(data))[asked.rate].flops_per_sample * samples
        metrics = {
            WEIGHT_KEY: len(data.train_y),
            TEST_EXAMPLES_KEY: len(data.test_y),
            ACCURACY_KEY: accuracy(model, data.test_x, data.test_y),
            MASKED_ACCURACY_KEY: accuracy(local_scorer(model, classes, asked), data.test_x, data.test_y),
            "train_loss": loss,
            SAMPLES_TRAINED_KEY: samples,
            COMPUTE_TIME_KEY: compute_time_s(flops, float(device.budget["flops_per_s"]), device.load_factor(server_round)),
            "load_factor": device.load_factor(server_round),
            "rate": asked.rate,
            "offset": asked.offset,
            PARTITION_KEY: device.partition_id,
        }
        labels = ConfigRecord({CLASSES_KEY: list(classes or ())})
        return content_reply(msg, metrics, arrays=ArrayRecord(model.state_dict()), configs={LABELS_RECORD: labels})

    def evaluate(self, msg: Message, context: Context) -> Message:
        """Accuracy of the received sub-model on local test data.

        By default static BN is recomputed on the local training data first; with
        ``static_bn`` false in the config the model is scored with the BN statistics it
        carries (the cloud's global sBN). ``masked_accuracy`` is label-masked by the device's
        training classes when the message asks for ``label_mask`` (the official local test);
        ``accuracy`` scores all classes. With ``statistics`` true in the config, the reply
        also carries the BN running statistics measured on the local training data
        (HeteroFL's sBN query, sec. 3.2).
        """
        server_round = round_of(msg)
        asked = width_config(msg)
        static_bn, statistics = evaluation_asks(msg)
        model = self.sub_model(msg, asked.rate)
        data = self.device.data(self.device.slot_of_round(server_round))
        if static_bn:
            self.prepare_for_evaluation(model, data.train_x)
        else:
            model.eval()
        metrics = {
            WEIGHT_KEY: len(data.test_y),
            TRAIN_EXAMPLES_KEY: len(data.train_y),
            ACCURACY_KEY: accuracy(model, data.test_x, data.test_y),
            MASKED_ACCURACY_KEY: accuracy(local_scorer(model, device_classes(data.train_y), asked), data.test_x, data.test_y),
            "rate": asked.rate,
            PARTITION_KEY: self.device.partition_id,
        }
        stats = None
        if statistics and len(data.train_y) > 0:
            stats = ArrayRecord({k: v for k, v in model.state_dict().items() if k.endswith(BN_STATISTICS)})
        return content_reply(msg, metrics, arrays=stats)

    # ---------------------------------------------------------------- helpers
    def sub_model(self, msg: Message, rate: float) -> nn.Module:
        """The sub-model skeleton at ``rate`` loaded with the message's ``arrays``."""
        arrays = msg.content.array_records.get(ARRAYS_RECORD)
        if arrays is None:
            raise MalformedMessage(f"message has no array record {ARRAYS_RECORD!r}")
        model = scaled_model(self.device.build_model, rate)
        try:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise MalformedMessage(f"arrays do not fit the sub-model at rate {rate}: {exc}") from exc
        return model

    def prepare_for_evaluation(self, model: nn.Module, train_x) -> None:
        """Static BN on the training data; without data the received statistics stay."""
        if len(train_x) > 0:
            reestimate_bn(model, train_x, self.device.train.batch_size, even_batches=True)
        model.eval()

    def costs(self, rates: Sequence[float], input_shape: tuple[int, ...]) -> dict[float, RateCost]:
        """Training memory, FLOPs per sample and bytes of the sub-model at each rate (cached)."""
        batch_size = self.device.train.batch_size
        full = self.device.build_model()
        base = (tuple((k, tuple(v.shape)) for k, v in full.state_dict().items()), input_shape, batch_size)
        missing = [float(r) for r in rates if (*base, float(r)) not in _COST_CACHE]
        if missing:
            for rate, cost in rate_costs(self.device.build_model, input_shape, batch_size, missing).items():
                _COST_CACHE[(*base, rate)] = cost
        return {float(r): _COST_CACHE[(*base, float(r))] for r in rates}


def local_scorer(model: nn.Module, classes: tuple[int, ...] | None, asked: WidthConfig) -> nn.Module:
    """What scores the local test: ``model``, label-masked by ``classes`` if the message asks for it.

    A device without training data has no classes to mask by and scores unmasked.
    """
    return LabelMasked(model, classes) if asked.label_mask and classes is not None else model


def input_shape_of(data: DeviceTensors) -> tuple[int, ...]:
    """Shape of one input sample of the device's data (training set, else test set)."""
    x = data.train_x if len(data.train_x) else data.test_x
    return tuple(int(n) for n in x.shape[1:])
