"""ECLM (Zhuang et al.; seed 001 section 5): personalized sub-models, module-wise aggregation.

A round: (1) the cohort gets the unified module selector and reports each module's
importance on its local data (ECLM's local profiler, 5.1); (2) the cloud solves each
device's 0/1 multi-dimensional knapsack over (communication, computation, memory) with the
most important module of every layer forced first, and sends ONE message per device with
exactly that device's sub-model; (3) devices train their sub-models; (4) the cloud
aggregates module-wise, weighted by normalised importance (5.2); selector and shared
layers are averaged by data size. Modules nobody trained keep their weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from models.eclm.knapsack import InfeasibleBudget, module_order, select_modules
from models.eclm.layer import module_of_key, parse_module_id
from strategies.aggregate import has_non_finite, update_divergence, weighted_average
from strategies.base import EdgeCloudStrategy
from strategies.metrics import metric_record
from strategies.protocol import ARRAYS_RECORD, CONFIG_RECORD, METRICS_RECORD, WEIGHT_KEY

#: Prefix of the selector's keys in a modular network's state dict.
SELECTOR_PREFIX = "selector."
#: Suffix of the per-device ``active`` buffers (which modules a sub-model holds): never aggregated.
ACTIVE_SUFFIX = ".active"
#: Array record of the profiling query: the unified module selector.
SELECTOR_RECORD = "selector"
#: Metric record of the profiling reply: each module's importance on the device's data.
IMPORTANCE_RECORD = "importance"
#: Config entry of a train message listing the sub-model's module ids, and their separator.
MODULES_KEY = "modules"
MODULE_SEPARATOR = ","


@dataclass(frozen=True)
class ModuleCatalog:
    """What the cloud precomputes about its modular network (ECLM 5.1: costs known in advance).

    Attributes
    ----------
    layer_of : Mapping[str, int]
        Module id -> module layer.
    costs : Mapping[str, Sequence[float]]
        Module id -> (communication bytes, training FLOPs per sample, training memory bytes).
    shared_cost : Sequence[float]
        The same for what every sub-model carries (stem, head, selector).
    """

    layer_of: Mapping[str, int]
    costs: Mapping[str, Sequence[float]]
    shared_cost: Sequence[float]

    @property
    def total_bytes(self) -> float:
        """Bytes of the whole cloud model."""
        return float(self.shared_cost[0]) + sum(float(c[0]) for c in self.costs.values())


def device_budget(
    budget: Mapping[str, float | str],
    samples: int,
    epochs: int,
    round_budget_s: float,
    size_cap_bytes: float,
) -> np.ndarray:
    """A device's knapsack budget (comm bytes, FLOPs per sample, memory bytes), ECLM 5.1.

    - communication: bytes that go down and come back up within ``round_budget_s``
      (``t / (1/up + 1/down)``), capped at ``size_cap_bytes`` (ECLM 7.5's size constraint);
    - computation: FLOPs per training sample the device can spend on ``samples x epochs``
      samples within ``round_budget_s``;
    - memory: the training memory it reported.
    """
    up, down = float(budget["uplink_bps"]), float(budget["downlink_bps"])
    comm = min(round_budget_s / (1.0 / up + 1.0 / down), size_cap_bytes)
    comp = round_budget_s * float(budget["flops_per_s"]) / max(samples * max(epochs, 1), 1)
    return np.array([comm, comp, float(budget["memory_bytes"])])


def submodel_arrays(full: ArrayRecord, ids: Sequence[str], layer_sizes: Sequence[int]) -> ArrayRecord:
    """The sub-model's state: shared keys, the chosen modules' keys and ``active`` masks.

    Keys are the cloud model's own (the model contract in models/eclm/modular.py), so a device
    rebuilds the skeleton with ``extract(ids)`` and loads these arrays strictly.
    """
    chosen = set(ids)
    out = {}
    for key, arr in full.items():
        if key.endswith(ACTIVE_SUFFIX):
            continue
        owner = module_of_key(key)
        if owner is None or owner in chosen:
            out[key] = arr
    for layer, size in enumerate(layer_sizes):
        mask = np.zeros(size, dtype=bool)
        for module_id in chosen:
            lay, idx = parse_module_id(module_id)
            if lay == layer:
                mask[idx] = True
        out[f"layers.{layer}{ACTIVE_SUFFIX}"] = Array(mask)
    return ArrayRecord(out)


def modulewise_average(
    full: ArrayRecord,
    updates: Sequence[tuple[ArrayRecord, Mapping[str, float], float]],
) -> ArrayRecord:
    """ECLM 5.2: ``w_i' = sum_k normalised Importance(i | D_k) * w_ik`` over holders of module i.

    ``updates`` holds (arrays, importance by module id, the reply's ``num-examples``) per device. Shared
    keys (stem, head, selector) are averaged by ``num-examples`` over every device; module
    keys over the devices that hold the module, weighted by their normalised importance
    of it; keys nobody sent keep the cloud's value; ``active`` masks are never averaged.
    """
    out = {}
    for key, cloud_value in full.items():
        if key.endswith(ACTIVE_SUFFIX):
            out[key] = cloud_value
            continue
        owner = module_of_key(key)
        holders = [(arrays[key], imp, n) for arrays, imp, n in updates if key in arrays]
        if not holders:
            out[key] = cloud_value
            continue
        if owner is None:
            weights = [n for _, _, n in holders]
        else:
            weights = [max(float(imp.get(owner, 0.0)), 0.0) for _, imp, _ in holders]
            if sum(weights) <= 0:  # every holder reported zero importance: plain mean
                weights = [1.0] * len(holders)
        mean = weighted_average([ArrayRecord({key: a}) for a, _, _ in holders], weights)[key].numpy()
        out[key] = Array(mean.astype(cloud_value.numpy().dtype, copy=False))  # the cloud's dtype rules
    return ArrayRecord(out)


class ECLM(EdgeCloudStrategy):
    """ECLM's cloud: profile, derive personalized sub-models, aggregate module-wise.

    Parameters
    ----------
    catalog : ModuleCatalog
        Module layers and precomputed costs of the cloud's modular network.
    layer_sizes : Sequence[int]
        Modules per layer (for the ``active`` masks).
    samples_per_device : int
        Expected training samples per device (the knapsack's compute budget divides by it;
        each device's reported data size (discovery's ``num-examples``) is used when known).
    epochs : int
        Local epochs per round.
    round_budget_s : float
        Time a round may take on a device, for compute and for communication.
    size_cap : float
        Largest sub-model as a fraction of the cloud model's bytes (ECLM 7.5).
    **base
        :class:`EdgeCloudStrategy` arguments.
    """

    def __init__(
        self,
        *,
        catalog: ModuleCatalog,
        layer_sizes: Sequence[int],
        samples_per_device: int,
        epochs: int,
        round_budget_s: float,
        size_cap: float,
        **base,
    ) -> None:
        super().__init__(**base)
        self.catalog = catalog
        self.layer_sizes = tuple(layer_sizes)
        self.samples_per_device = samples_per_device
        self.epochs = epochs
        self.round_budget_s = round_budget_s
        self.size_cap = size_cap
        self.importance: dict[int, dict[str, float]] = {}
        self.selections: dict[int, tuple[str, ...]] = {}

    # ------------------------------------------------------------------ profiling
    def profile(self, grid, server_round: int, arrays: ArrayRecord) -> list[int]:
        """Send the selector to the cohort; collect each device's module importance."""
        selector = ArrayRecord({k: v for k, v in arrays.items() if k.startswith(SELECTOR_PREFIX)})
        content = RecordDict({SELECTOR_RECORD: selector, CONFIG_RECORD: self.round_config(server_round)})
        messages = self.messages_for(server_round, MessageType.QUERY, lambda pid: content)
        self.importance = {}
        for reply in self.exchange(grid, messages, "profile"):
            pid = self.partition_of(reply)
            record = reply.content.metric_records.get(IMPORTANCE_RECORD)
            if record is None or set(record.keys()) != set(self.catalog.layer_of):
                self.ledger.fail(pid, "profile", "importance record missing or not one value per module")
                self.ledger.completed.discard(pid)
                continue
            bad = [k for k, v in record.items() if not isinstance(v, (int, float)) or not 0 <= v < np.inf]
            bad.sort(key=module_order)
            if bad:  # the knapsack would raise on these and end the round for everyone
                self.ledger.fail(pid, "profile", f"importance of {bad} is not a finite number >= 0")
                self.ledger.completed.discard(pid)
                continue
            self.importance[pid] = {k: float(v) for k, v in record.items()}
        return sorted(self.importance)

    def derive(self, pid: int) -> tuple[str, ...] | None:
        """Solve the device's knapsack (ECLM 5.1); None (and a recorded failure) if it cannot fit."""
        info = self.devices[pid]
        samples = info.num_examples or self.samples_per_device
        budget = device_budget(
            info.budget, samples, self.epochs, self.round_budget_s, self.size_cap * self.catalog.total_bytes
        )
        try:
            selection = select_modules(
                self.importance[pid], self.catalog.layer_of, self.catalog.costs, self.catalog.shared_cost, budget
            )
        except InfeasibleBudget as exc:
            self.ledger.fail(pid, "derive", f"skipped: {exc}")
            return None
        return tuple(selection.ids)

    # ------------------------------------------------------------------ Flower contract
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Profile the cohort, then one message per device carrying exactly its sub-model."""
        self._cloud = arrays
        self.selections = {}
        for pid in self.profile(grid, server_round, arrays):
            ids = self.derive(pid)
            if ids is not None:
                self.selections[pid] = ids
        self.ledger.completed.clear()  # a device completes the round only with an accepted sub-model

        def content(pid: int) -> RecordDict:
            ids = self.selections[pid]
            cfg = self.round_config(server_round, **{MODULES_KEY: MODULE_SEPARATOR.join(ids)})
            return RecordDict({ARRAYS_RECORD: submodel_arrays(arrays, ids, self.layer_sizes), CONFIG_RECORD: cfg})

        return self.messages_for(server_round, MessageType.TRAIN, content, partition_ids=sorted(self.selections))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Module-wise importance-weighted aggregation of the valid sub-models."""
        replies = list(replies)
        updates = []
        for reply in replies:
            pid = self.partition_of(reply)
            arrays = reply.content.array_records.get(ARRAYS_RECORD)
            problem = self._check_reply(pid, arrays)
            if problem is not None:
                self.ledger.fail(pid, "train", f"rejected reply: {problem}")
                self.ledger.completed.discard(pid)
                continue
            updates.append((arrays, self.importance[pid], float(reply.content[METRICS_RECORD][WEIGHT_KEY])))
        kept = [r for r in replies if self.partition_of(r) in self.ledger.completed]
        metrics = self.mean_metrics(kept)
        if updates:
            sizes = {str(self.partition_of(r)): _bytes(r.content[ARRAYS_RECORD]) for r in kept}
            metrics["submodel_fraction"] = float(np.mean(list(sizes.values()))) / self.catalog.total_bytes
            metrics["submodel_bytes_by_device"] = sizes
            divergence = update_divergence(self._cloud, [a for a, _, _ in updates])
            if divergence is not None:
                metrics["update_divergence"] = divergence
            return modulewise_average(self._cloud, updates), metric_record(metrics)
        return None, metric_record(metrics)

    def _check_reply(self, pid: int, arrays: ArrayRecord | None) -> str | None:
        if arrays is None:
            return "no arrays"
        sent = set(self.selections.get(pid, ()))
        for key, arr in arrays.items():
            if key not in self._cloud:
                return f"unknown key {key}"
            owner = module_of_key(key)
            if owner is not None and owner not in sent:
                return f"module {owner} was not sent to this device"
            if not key.endswith(ACTIVE_SUFFIX) and tuple(arr.shape) != tuple(self._cloud[key].shape):
                return f"{key} has shape {tuple(arr.shape)}, expected {tuple(self._cloud[key].shape)}"
        bad = has_non_finite(arrays)
        return None if bad is None else f"non-finite values in {bad}"


def _bytes(arrays: ArrayRecord) -> float:
    return float(sum(len(a.data) for a in arrays.values()))
