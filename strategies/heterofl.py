"""HeteroFL (Diao et al., ICLR 2021) and FedRolex (Alam et al., NeurIPS 2022) on the edge-cloud base.

Each cohort device gets the width-scaled sub-model of the cloud model at the widest rate
of ``rates`` its reported budget can train in a round (:func:`select_rate`); the cloud
averages every element over the devices whose sub-model covered it
(:func:`models.width.submodel.covering_average`), each classifier row (and bias entry) only over
the devices whose training data hold that class (``label_split``, as both official
``combine`` functions do; the device names its classes in its reply); elements nobody
covered keep their value. HeteroFL keeps the channel prefix (sec. 3.1); FedRolex rolls
the window by one channel per round (sec. 3, "rolling sub-model extraction"). The
messages ask devices to train as the official clients do: label-masked logits
(``label_mask``, the official ``mask: '1'``) and a clipped gradient norm.

What the round's numbers mean
-----------------------------
The BN layers of the aggregated model hold global static BN statistics (sBN, HeteroFL sec.
3.2): the cloud's own when the strategy has ``cloud_statistics`` (measured on the cloud's
proxy part, as HeteroFL's ``train_classifier_fed.py`` ``stats()`` measures them on the
server's training set before every test), else pooled from the devices. They serve the
global test, the ``global_sbn`` local test and the next round's download (training itself
normalises with batch statistics).

* ``accuracy``: by default the example-weighted mean over the devices of their TRAINED
  sub-model's accuracy on local test data, with static BN recomputed on local training
  data: a personalised number, higher than FedAvg's evaluation of the aggregated model.
  With ``global_sbn`` an evaluation phase sends the aggregated full model to the devices
  that trained, and ``accuracy`` is its local-test accuracy with the GLOBAL statistics it
  carries (the official ``test`` scores the global model so), as FedAvg's evaluation scores
  the model it sends and the pre-trained score uses the cloud's statistics; the trained
  sub-models' number is then kept as ``train_submodel_accuracy``. A device's own sBN on
  label-skewed data would not do: statistics of two classes centre away what tells them
  from the other eight, and the all-class test collapses (on the default digits fleet the
  unchanged pre-trained model drops from 0.58 to 0.21 under it). ``accuracy`` scores all
  classes, like every other method's local test, so tables compare like with like.
  ``masked_accuracy`` is the official local test (HeteroFL ``train_classifier_fed.py``
  ``test``): with ``label_mask`` the logits of classes the device has no data of are
  masked, so predictions are confined to the classes it trained on.
* ``global_accuracy`` (the server's ``evaluate_fn``): the full model (rate 1) on the global
  test set, in eval mode with the BN running statistics held in the cloud arrays, never
  label-masked (as in both official ``test`` functions). With ``cloud_statistics`` they are
  the cloud's sBN of the aggregated model. Without it, they are pooled from the trained
  sub-models' sBN statistics that travel in the training replies
  (:func:`models.width.submodel.pooled_bn_statistics`: example-weighted, law of total
  variance; statistics of channels nobody covered stay those of the previous round, at
  first of the cloud's pre-training), measured with each device's locally trained (and
  possibly narrower) weights, not the aggregated full model, so approximate; with
  ``global_sbn`` a statistics query first has the devices that trained measure sBN of the
  aggregated full model itself and pools those (the paper's query protocol), at the cost of
  one more full-model download per trained device and round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from models.clock import comm_time_s, compute_time_s
from models.width.layers import RateCost, costs_from_record
from models.width.submodel import (
    WIDTH_RATES,
    SubModelUpdate,
    class_rows,
    classifier_keys,
    covering_average,
    extract,
    pooled_bn_statistics,
    sub_shapes,
)
from strategies.aggregate import has_non_finite, same_layout
from strategies.base import EdgeCloudStrategy
from strategies.metrics import metric_record
from strategies.protocol import (
    ACCURACY_KEY,
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    TRAIN_EXAMPLES_KEY,
    WEIGHT_KEY,
)

#: Default round budget when neither ``round_budget_s`` nor ``deadline_s`` is given: the time
#: this quantile of the fleet needs to train the full model, so about the faster half trains it
#: and slower devices get narrower ones. ASSUMPTION: HeteroFL assigns levels by a preset mix of
#: client capabilities (sec. 4, e.g. "a1-b1-c1-d1-e1": 20 % each), not by measured budgets.
DEFAULT_BUDGET_QUANTILE = 0.5
#: Gradient-norm clip of local training: HeteroFL ``train_classifier_fed.py`` ``Local.train`` and
#: FedRolex ``resnet_client.py`` ``ResnetClient.step`` (``clip_grad_norm_(model.parameters(), 1)``).
DEFAULT_CLIP_GRAD_NORM = 1.0
#: Width rate of the full model: the ``global_sbn`` evaluation's and the statistics query's.
FULL_RATE = 1.0
#: Config entries of a message: the sub-model's width rate, the channel window's roll (FedRolex),
#: whether to mask absent classes' logits, the gradient-norm clip, and (evaluation) whether to
#: send back the BN statistics measured on local data (the sBN query).
RATE_KEY = "rate"
OFFSET_KEY = "offset"
LABEL_MASK_KEY = "label_mask"
CLIP_GRAD_NORM_KEY = "clip_grad_norm"
STATISTICS_KEY = "statistics"
#: Config entry of an evaluation message: whether the device recomputes static BN on its own
#: training data before scoring (absent: true). The ``global_sbn`` evaluation sends false: the
#: device scores the full model with the global statistics it carries.
STATIC_BN_KEY = "static_bn"
#: Failure phase of the ``global_sbn`` statistics query (the sBN query of HeteroFL sec. 3.2).
STATISTICS_PHASE = "statistics"
#: Config record of a training reply naming the classes of the device's training data, and its
#: entry (a list of ints): the classifier's rows are merged by them (``label_split``).
LABELS_RECORD = "labels"
CLASSES_KEY = "classes"
#: Metric of the label-masked local test (the official one).
MASKED_ACCURACY_KEY = "masked_accuracy"
#: ``(full-model arrays) -> their BN running statistics measured by the cloud`` (static BN on the
#: cloud's own data, :func:`models.width.layers.static_bn_statistics`).
CloudStatistics = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def rate_time_s(cost: RateCost, samples_per_round: float, budget: Mapping[str, float | str]) -> tuple[float, float]:
    """(compute, communication) seconds of one round at a rate, at the device's nominal speed.

    compute = FLOPs/sample x samples x epochs / flops_per_s; communication = sub-model bytes
    down / downlink_bps + up / uplink_bps (the platform's virtual clock, ``models/clock.py``).
    """
    compute = compute_time_s(cost.flops_per_sample * samples_per_round, float(budget["flops_per_s"]))
    comm = comm_time_s(cost.model_bytes, cost.model_bytes, float(budget["uplink_bps"]), float(budget["downlink_bps"]))
    return compute, comm


def select_rate(
    budget: Mapping[str, float | str],
    costs: Mapping[float, RateCost],
    samples_per_round: float,
    round_budget_s: float,
    rates: Sequence[float] = WIDTH_RATES,
) -> tuple[float | None, str]:
    """The largest rate whose sub-model fits the device's budget, or (None, why not).

    A rate fits when its training memory at the run's batch size is within
    ``memory_bytes``, its compute time is within ``round_budget_s`` and its communication
    time is within ``round_budget_s`` (each checked on its own, as ECLM's knapsack budget
    in ``strategies/eclm.py`` does).
    """
    reason = "no rate given"
    for rate in sorted(rates, reverse=True):
        cost = costs[float(rate)]
        compute, comm = rate_time_s(cost, samples_per_round, budget)
        if cost.memory_bytes > float(budget["memory_bytes"]):
            reason = f"rate {rate:g} needs {cost.memory_bytes:.3g} B of memory > {float(budget['memory_bytes']):.3g} B"
        elif compute > round_budget_s:
            reason = f"rate {rate:g} needs {compute:.3g} s of compute > round budget {round_budget_s:.3g} s"
        elif comm > round_budget_s:
            reason = f"rate {rate:g} needs {comm:.3g} s of transfer > round budget {round_budget_s:.3g} s"
        else:
            return float(rate), ""
    return None, f"no width rate fits: {reason}"


class HeteroFL(EdgeCloudStrategy):
    """HeteroFL's cloud: per-device width rate, prefix sub-models, per-element covering average.

    Parameters
    ----------
    rates : sequence of float
        Width rates a device may get, a subset of :data:`models.width.submodel.WIDTH_RATES`
        (HeteroFL's levels 1, 1/2, 1/4, 1/8, 1/16).
    round_budget_s : float, optional
        Seconds a device may spend on a round's compute, and on its transfers. None: the
        ``deadline_s`` if set, else the :data:`DEFAULT_BUDGET_QUANTILE` of the fleet's
        full-model round times (fixed at the first round).
    budget_quantile : float
        The quantile used when ``round_budget_s`` and ``deadline_s`` are both None.
    weight_by_examples : bool
        Weight the covering average by the replies' ``num-examples``. False (default): plain count, as
        HeteroFL's and FedRolex's reference code (``fed.py`` ``combine``) do.
    global_sbn : bool
        After aggregation, send the full model, with the global sBN statistics, to the
        devices that trained; they score it as received on their local test data (the
        round's ``accuracy``, like FedAvg's evaluation). Without ``cloud_statistics`` the
        devices first measure sBN of that model on their training data and the cloud pools
        it (HeteroFL sec. 3.2's query protocol; its bytes are counted). False (default): no
        evaluation phase (module docstring).
    cloud_statistics : callable, optional
        ``(full-model arrays) -> BN running statistics`` measured by the cloud on its own data
        (:data:`CloudStatistics`); after every aggregation they replace the model's statistics.
        None (default): the cloud has no data; the statistics are pooled from the devices.
    label_split : bool
        Average each classifier row and bias entry only over the devices that hold that
        class (True, default: HeteroFL ``fed.py`` and FedRolex ``resnet_server.py``
        ``combine``); False: over every device, like any other element.
    label_mask : bool
        Ask devices to mask the logits of classes they have no data of, in training and in
        the local test (True, default: the official ``mask: '1'``, :mod:`models.width.training`).
    clip_grad_norm : float, optional
        Gradient-norm clip of local training (default :data:`DEFAULT_CLIP_GRAD_NORM`);
        None: no clipping.
    **base
        :class:`EdgeCloudStrategy` arguments (per_round, seed, expected_devices,
        deadline_s, on_round, after_round).
    """

    #: Whether the channel window rolls with the round (FedRolex) or stays the prefix.
    rolling = False

    def __init__(
        self,
        *,
        rates: Sequence[float] = WIDTH_RATES,
        round_budget_s: float | None = None,
        budget_quantile: float = DEFAULT_BUDGET_QUANTILE,
        weight_by_examples: bool = False,
        global_sbn: bool = False,
        cloud_statistics: CloudStatistics | None = None,
        label_split: bool = True,
        label_mask: bool = True,
        clip_grad_norm: float | None = DEFAULT_CLIP_GRAD_NORM,
        **base,
    ) -> None:
        super().__init__(**base)
        unknown = [r for r in rates if float(r) not in WIDTH_RATES]
        if not rates or unknown:
            raise ValueError(f"rates must be a non-empty subset of {WIDTH_RATES}, got {tuple(rates)}")
        if round_budget_s is not None and not (math.isfinite(round_budget_s) and round_budget_s > 0):
            raise ValueError(f"round_budget_s must be a finite number > 0 or None, got {round_budget_s}")
        if not 0 < budget_quantile <= 1:
            raise ValueError(f"budget_quantile must be in (0, 1], got {budget_quantile}")
        if clip_grad_norm is not None and not (math.isfinite(clip_grad_norm) and clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a finite number > 0 or None, got {clip_grad_norm}")
        self.rates = tuple(sorted({float(r) for r in rates}, reverse=True))
        self.round_budget_s = round_budget_s
        self.budget_quantile = budget_quantile
        self.weight_by_examples = weight_by_examples
        self.global_sbn = global_sbn
        self.cloud_statistics = cloud_statistics
        self.label_split = label_split
        self.label_mask = label_mask
        self.clip_grad_norm = clip_grad_norm
        self.assigned: dict[int, float] = {}

    # ------------------------------------------------------------------ rates
    def window_offset(self, server_round: int) -> int:
        """Roll of the kept channel window in a round (:func:`models.width.submodel.channel_window`): 0, the prefix."""
        return 0

    def training_asks(self) -> dict[str, bool | float]:
        """What every message asks of the device's training: ``label_mask`` and, if set, ``clip_grad_norm``."""
        asks: dict[str, bool | float] = {LABEL_MASK_KEY: self.label_mask}
        if self.clip_grad_norm is not None:
            asks[CLIP_GRAD_NORM_KEY] = float(self.clip_grad_norm)
        return asks

    def budget_s(self) -> float:
        """The round budget in seconds (see ``round_budget_s``), fixed once computed."""
        if self.round_budget_s is None:
            self.round_budget_s = self.deadline_s if self.deadline_s is not None else self._fleet_quantile()
        return self.round_budget_s

    def _fleet_quantile(self) -> float:
        widest = self.rates[0]
        times = []
        for info in self.devices.values():
            try:
                costs, samples = costs_from_record(info.budget, (widest,))
            except ValueError:
                continue
            times.append(max(rate_time_s(costs[widest], samples, info.budget)))
        return float(np.quantile(times, self.budget_quantile)) if times else math.inf

    def rate_for(self, partition_id: int) -> tuple[float | None, str]:
        """The device's rate for this round, or (None, why it is skipped)."""
        info = self.devices[partition_id]
        try:
            costs, samples = costs_from_record(info.budget, self.rates)
        except ValueError as exc:
            return None, str(exc)
        return select_rate(info.budget, costs, samples, self.budget_s(), self.rates)

    # ------------------------------------------------------------------ state (checkpoints)
    def state_dict(self) -> dict:
        """The base state plus ``round_budget_s`` (None until the first round fixes the default)."""
        state = super().state_dict()
        state["round_budget_s"] = self.round_budget_s
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned (the budget fixed at the first round stays fixed)."""
        super().load_state_dict(state)
        budget = state["round_budget_s"]
        self.round_budget_s = None if budget is None else float(budget)

    # ------------------------------------------------------------------ Flower contract
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per fitting device: its sub-model's arrays and config (round, rate[, offset])."""
        self._state = {key: arr.numpy() for key, arr in arrays.items()}
        self._offset = self.window_offset(server_round)
        self.assigned = {}
        for pid in self.cohort(server_round):
            rate, reason = self.rate_for(pid)
            if rate is None:
                self.ledger.fail(pid, "train", f"skipped: {reason}")
            else:
                self.assigned[pid] = rate
        shapes = {key: value.shape for key, value in self._state.items()}
        self._num_classes = int(shapes[classifier_keys(shapes)[0]][0])
        self._layouts = {rate: sub_shapes(shapes, rate) for rate in set(self.assigned.values())}
        records = {
            rate: ArrayRecord({k: Array(v) for k, v in extract(self._state, rate, self._offset).items()})
            for rate in self._layouts
        }
        extra = {**self.training_asks(), **({OFFSET_KEY: self._offset} if self.rolling else {})}

        def content(pid: int) -> RecordDict:
            rate = self.assigned[pid]
            config = self.round_config(server_round, **{RATE_KEY: rate}, **extra)
            return RecordDict({ARRAYS_RECORD: records[rate], CONFIG_RECORD: config})

        return self.messages_for(server_round, MessageType.TRAIN, content, partition_ids=sorted(self.assigned))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Per-element covering average of the valid sub-models (classifier rows by class); metrics of the devices kept.

        The merged model's BN statistics are the cloud's (``cloud_statistics``) if it has them,
        else pooled from the replies' sBN statistics.
        """
        replies = list(replies)
        updates = []
        for reply in replies:
            pid = self.partition_of(reply)
            arrays = reply.content.array_records.get(ARRAYS_RECORD)
            problem = self._problem(pid, arrays, reply.content[METRICS_RECORD])
            classes = None
            if problem is None and self.label_split:
                classes, problem = self._classes(reply)
            if problem is not None:
                self.ledger.fail(pid, "train", f"rejected reply: {problem}")
                self.ledger.completed.discard(pid)
                continue
            examples = float(reply.content[METRICS_RECORD].get(WEIGHT_KEY, 0))
            weight = examples if self.weight_by_examples else 1.0
            state = {key: arr.numpy() for key, arr in arrays.items()}
            updates.append(SubModelUpdate(state, self.assigned[pid], self._offset, weight, max(examples, 1.0), classes))
        metrics = self.mean_metrics([r for r in replies if self.partition_of(r) in self.ledger.completed])
        if ACCURACY_KEY in metrics:  # kept in the round record even when an evaluation phase reports accuracy
            metrics["submodel_accuracy"] = metrics[ACCURACY_KEY]
        if not updates:
            return None, metric_record(metrics)
        merged = covering_average(self._state, updates)
        if self.cloud_statistics is not None:
            merged.update(self._cloud_measured(merged))
        else:
            merged.update(pooled_bn_statistics(self._state, updates))
        return ArrayRecord({key: Array(value) for key, value in merged.items()}), metric_record(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """With ``global_sbn``: the full model with global sBN statistics to the devices that trained.

        They score it as received (``static_bn`` false). Without ``cloud_statistics`` the
        statistics query runs first (:meth:`query_statistics`) and writes the pooled
        statistics into ``arrays``, so the global test and the next round receive them too.
        """
        if not self.global_sbn:
            return []
        trained = sorted(self.ledger.completed & set(self.assigned))
        if self.cloud_statistics is None:
            self.query_statistics(server_round, arrays, config, grid, trained)
        asks = {RATE_KEY: FULL_RATE, STATIC_BN_KEY: False, LABEL_MASK_KEY: self.label_mask}
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: self.round_config(server_round, **asks)})
        return self.messages_for(server_round, MessageType.EVALUATE, lambda pid: content, partition_ids=trained)

    def query_statistics(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, partition_ids: Sequence[int]
    ) -> None:
        """HeteroFL's sBN query (sec. 3.2): pool the devices' static BN of the full model into ``arrays``, in place.

        Each device measures the statistics on its training data; the cloud pools them by
        training-set size (:func:`models.width.submodel.pooled_bn_statistics`). Devices that
        fail, or reply without statistics, leave them out; with no statistics at all
        ``arrays`` keeps its own.
        """
        asks = {RATE_KEY: FULL_RATE, STATISTICS_KEY: True}
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: self.round_config(server_round, **asks)})
        messages = self.messages_for(server_round, MessageType.EVALUATE, lambda pid: content, partition_ids)
        replies = self.exchange(grid, self.with_run_config(messages, config), STATISTICS_PHASE)
        updates = []
        for reply in replies:
            stats = reply.content.array_records.get(ARRAYS_RECORD)
            examples = float(reply.content[METRICS_RECORD].get(TRAIN_EXAMPLES_KEY, 0))
            if stats is None or examples <= 0 or has_non_finite(stats) is not None:
                continue
            updates.append(SubModelUpdate({k: a.numpy() for k, a in stats.items()}, FULL_RATE, num_examples=examples))
        if not updates:
            return
        state = {key: arr.numpy() for key, arr in arrays.items()}
        try:
            pooled = pooled_bn_statistics(state, updates)
        except (KeyError, ValueError) as exc:
            self.ledger.fail(None, STATISTICS_PHASE, f"BN statistics not pooled: {exc!r}")
            return
        for key, value in pooled.items():
            arrays[key] = Array(value)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean local-test metrics of the full model (example-weighted by test-set size)."""
        return metric_record(self.mean_metrics(list(replies)))

    def round_record(
        self,
        server_round: int,
        train_metrics: MetricRecord | None,
        eval_metrics: MetricRecord | None,
        global_metrics: MetricRecord | None,
    ) -> dict:
        """The base record plus ``masked_accuracy``: the same local tests as ``accuracy``, label-masked (official)."""
        record = super().round_record(server_round, train_metrics, eval_metrics, global_metrics)
        record["masked_accuracy"] = self.local_metrics(train_metrics, eval_metrics).get(MASKED_ACCURACY_KEY)
        return record

    def _cloud_measured(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``cloud_statistics`` of ``state``, checked against its keys and shapes, in its dtypes."""
        measured = {}
        for key, value in self.cloud_statistics(state).items():
            value = np.asarray(value)
            if key not in state or value.shape != np.shape(state[key]):
                raise ValueError(f"cloud_statistics returned {key!r} {value.shape}, which the model does not have")
            measured[key] = value.astype(np.asarray(state[key]).dtype)
        return measured

    def _classes(self, reply) -> tuple[tuple[int, ...] | None, str | None]:
        """The classes a training reply names (``label_split``), or (None, why the reply is unusable)."""
        record = reply.content.config_records.get(LABELS_RECORD)
        if record is None or CLASSES_KEY not in record:
            return None, (f"no '{LABELS_RECORD}' record naming the device's classes; label_split needs them "
                          "(HeteroFLClient sends them, or set algorithm.heterofl.label_split=false)")
        try:
            rows = class_rows(record[CLASSES_KEY], self._num_classes)
        except (TypeError, ValueError) as exc:
            return None, f"bad classes: {exc}"
        return tuple(int(r) for r in rows), None

    def _problem(self, pid: int, arrays: ArrayRecord | None, metrics) -> str | None:
        if pid not in self.assigned:
            return "no sub-model was sent to this device"
        if arrays is None:
            return "no arrays"
        problem = same_layout(arrays, self._layouts[self.assigned[pid]])
        if problem is None and (bad := has_non_finite(arrays)) is not None:
            problem = f"non-finite values in {bad}"
        if problem is None and self.weight_by_examples and not float(metrics.get(WEIGHT_KEY, 0)) > 0:
            problem = "no training examples to weight by"
        return problem


class FedRolex(HeteroFL):
    """FedRolex: HeteroFL whose kept channel window rolls by one index per round.

    In round ``t`` (counted from 1) every channel axis of size ``C`` keeps the first
    ``ceil(rate * C)`` entries of ``arange(C)`` rolled forward by ``(t - 1) mod C``
    (FedRolex ``resnet_server.py`` ``ResnetServerRoll.split_model``: ``roll = rounds %
    output_size``, ``torch.roll(arange, roll)``, with its ``rounds`` counted from 0): round 1
    trains the prefix, round 2 keeps ``[C - 1, 0, 1, ...]``, and the window walks backwards
    over every channel, wrapping around (:func:`models.width.submodel.channel_window`).
    """

    rolling = True

    def window_offset(self, server_round: int) -> int:
        """``server_round - 1``: the roll before reduction modulo each axis's size."""
        return max(server_round - 1, 0)
