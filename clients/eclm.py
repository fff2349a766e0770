"""ECLM's edge (seed 001 sections 3, 5.1): profile module importance, train the sub-model.

Two messages a round: a profiling query carrying the unified module selector, answered
with each module's importance on local data (mean gate, ECLM 5.1); then a train message
carrying exactly this device's sub-model. Before training, a device whose co-running apps
slow it down keeps the most important subset of its modules that fits its current compute
budget (ECLM 3/5.1: devices adjust their module set locally).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord

from clients.base import ClientHandler, MalformedMessage, content_reply, derive_seed, round_of
from clients.protocol import (
    ACCURACY_KEY,
    ARRAYS_RECORD,
    COMPUTE_TIME_KEY,
    CONFIG_RECORD,
    PARTITION_KEY,
    WEIGHT_KEY,
)
from models.eclm.knapsack import InfeasibleBudget, Selection, fit_to_load, forced_modules
from models.eclm.layer import parse_module_id
from models.eclm.modular import ModularNet
from models.training import accuracy, train_epochs

#: Samples per forward pass while profiling importance (memory bound, not a tuning knob).
PROFILE_BATCH = 256
#: Array record of the profiling query (the unified module selector), and the prefix of its keys.
SELECTOR_RECORD = "selector"
SELECTOR_PREFIX = "selector."
#: Metric record of the profiling reply: each module's importance on the device's data.
IMPORTANCE_RECORD = "importance"
#: Config entry of a train message listing the sub-model's module ids, and their separator.
MODULES_KEY = "modules"
MODULE_SEPARATOR = ","
#: Suffix of the sub-model's ``active`` buffers (which modules it holds): never sent back.
ACTIVE_SUFFIX = ".active"


_CATALOGS: dict[tuple[str, int], tuple[dict, tuple, dict]] = {}
_TEMPLATES: dict[str, ModularNet] = {}


def _template_key(build) -> str | None:
    """A stable key for a model factory (a functools.partial of plain arguments), else None."""
    if isinstance(build, functools.partial):
        return repr((build.func.__module__, build.func.__qualname__, build.args, sorted(build.keywords.items())))
    return None


def catalog_of(model: ModularNet, batch_size: int) -> tuple[dict, tuple, dict]:
    """(costs by module id, shared cost, layer by module id) of ``model``'s architecture.

    Measured once per process and architecture (ECLM 5.1: costs are known in advance).
    """
    key = (repr(sorted(model.config.items())), batch_size)
    if key not in _CATALOGS:
        costs = {mid: c.as_tuple() for mid, c in model.module_costs(batch_size).items()}
        layer_of = {mid: parse_module_id(mid)[0] for mid in costs}
        _CATALOGS[key] = (costs, model.shared_cost(batch_size).as_tuple(), layer_of)
    return _CATALOGS[key]


class ECLMClient(ClientHandler):
    """ECLM's device: importance profiling, local module adjustment, sub-model training.

    Reads from ``device.options``: ``load_balance_weight`` (the load-balancing term of
    local training), ``round_budget_s`` (time a round may take), ``local_adjust`` (drop
    modules under load).
    """

    # ------------------------------------------------------------------ profiling
    def query(self, msg: Message, context: Context) -> Message:
        """Discovery (no selector) or ECLM profiling (selector present)."""
        selector = msg.content.array_records.get(SELECTOR_RECORD)
        if selector is None:
            return super().query(msg, context)
        server_round = round_of(msg)
        model = self._full_model()
        state = {k.removeprefix(SELECTOR_PREFIX): v for k, v in selector.to_torch_state_dict().items()}
        try:
            model.selector.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError) as exc:
            raise MalformedMessage(f"selector does not fit the device's model: {exc}") from exc
        data = self.device.data(self.device.slot_of_round(server_round))
        importance = self.importance(model, data.train_x)
        metrics = {WEIGHT_KEY: len(data.train_y), PARTITION_KEY: self.device.partition_id}
        reply = content_reply(msg, metrics)
        reply.content[IMPORTANCE_RECORD] = MetricRecord(importance)
        return reply

    @staticmethod
    @torch.no_grad()
    def importance(model: ModularNet, x: torch.Tensor) -> dict[str, float]:
        """ECLM 5.1: ``Importance(i | D_k) = mean_j g(x_j)_i`` over the device's samples.

        ``g`` is the selector's softmax over all N_l modules of a layer, also on a sub-model:
        its held modules get exactly the values the cloud's profiling query returned, so a
        device adjusting its sub-model ranks and forces modules as the cloud did.
        """
        model.eval()
        sums = [torch.zeros(n) for n in model.layer_sizes()]
        for start in range(0, len(x), PROFILE_BATCH):
            for layer, logits in enumerate(model.selector(x[start : start + PROFILE_BATCH])):
                sums[layer] += torch.softmax(logits, dim=1).sum(dim=0)
        count = max(len(x), 1)
        return {f"l{l}.m{i}": float(s[i]) / count for l, s in enumerate(sums) for i in range(len(s))}

    # ------------------------------------------------------------------ training
    def train(self, msg: Message, context: Context) -> Message:
        """Rebuild the sub-model, adjust it to the current load, train, reply its arrays."""
        server_round = round_of(msg)
        device, options = self.device, self.device.options
        ids = self._module_ids(msg)
        full = self._full_model()
        try:
            model = full.extract(ids)
        except ValueError as exc:  # unknown, malformed or layer-emptying module ids
            raise MalformedMessage(f"config {MODULES_KEY!r} does not name a sub-model of this network: {exc}") from exc
        arrays = msg.content.array_records.get(ARRAYS_RECORD)
        if arrays is None:
            raise MalformedMessage(f"message has no array record {ARRAYS_RECORD!r}")
        try:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        except (RuntimeError, KeyError) as exc:
            raise MalformedMessage(f"arrays do not fit the sub-model {','.join(ids)}: {exc}") from exc
        data = device.data(device.slot_of_round(server_round))
        kept = self._adjust(model, ids, len(data.train_y), server_round) if options.get("local_adjust", True) else ids
        if kept != ids:
            model = model.extract(kept)
        model.reseed_noise(derive_seed(device.seed, device.partition_id, server_round))
        weight = float(options.get("load_balance_weight", 0.0))
        loss = train_epochs(
            model, data.train_x, data.train_y, device.train,
            seed=derive_seed(device.seed, device.partition_id, server_round),
            extra_loss=(lambda m: m.last_routing.load_balance_loss) if weight > 0 else None,
        )
        samples = len(data.train_y) * device.train.epochs
        flops = self._flops_per_sample(model)
        metrics = {
            WEIGHT_KEY: len(data.train_y),
            ACCURACY_KEY: accuracy(model, data.test_x, data.test_y),
            "train_loss": loss,
            "modules": len(kept),
            "modules_dropped": len(ids) - len(kept),
            "submodel_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
            "train_memory_bytes": self._memory(kept),
            COMPUTE_TIME_KEY: self.compute_time_s(samples, server_round) * flops / device.flops_per_sample,
            "load_factor": device.load_factor(server_round),
            PARTITION_KEY: device.partition_id,
        }
        state = {k: v for k, v in model.state_dict().items() if not k.endswith(ACTIVE_SUFFIX)}
        return content_reply(msg, metrics, arrays=ArrayRecord(state))

    # ------------------------------------------------------------------ helpers
    def _full_model(self) -> ModularNet:
        """The device's full modular network: a per-process template, built once.

        Safe to share: profiling overwrites its whole selector, and training works on
        ``extract(ids)`` copies whose every tensor is then loaded from the message.
        """
        key = _template_key(self.device.build_model)
        model = _TEMPLATES.get(key) if key is not None else None
        if model is None:
            model = self.device.build_model()
            if not isinstance(model, ModularNet):
                raise MalformedMessage("ECLM needs a modular network (model.name=modular_*)")
            if key is not None:
                _TEMPLATES[key] = model
        model.balance_weight = float(self.device.options.get("load_balance_weight", model.balance_weight))
        return model

    def _module_ids(self, msg: Message) -> tuple[str, ...]:
        config = msg.content.config_records.get(CONFIG_RECORD)
        raw = "" if config is None else config.get(MODULES_KEY, "")
        if not isinstance(raw, str) or not raw:
            raise MalformedMessage(f"config {MODULES_KEY!r} must list the sub-model's module ids")
        return tuple(raw.split(MODULE_SEPARATOR))

    def _costs(self) -> tuple[dict, tuple, dict]:
        return catalog_of(self._full_model(), self.device.train.batch_size)

    def _flops_per_sample(self, model: ModularNet) -> float:
        """Training FLOPs per sample of a sub-model: shared parts + k active modules per layer
        (each at the mean cost of the layer's held modules; top-k routing runs only k)."""
        costs, shared, _ = self._costs()
        total = shared[1]
        for layer_index, layer in enumerate(model.layers):
            held = [costs[f"l{layer_index}.m{i}"][1] for i in layer.held()]
            if held:
                total += min(layer.k, len(held)) * sum(held) / len(held)
        return total

    def _memory(self, ids) -> float:
        costs, shared, _ = self._costs()
        return shared[2] + sum(costs[mid][2] for mid in ids)

    def _adjust(self, model: ModularNet, ids: tuple[str, ...], samples: int, server_round: int) -> tuple[str, ...]:
        """The best subset of the held modules whose compute fits this round's load (ECLM 3, 5.1).

        The forced module of every layer is the cloud's (same importance, same tie order:
        :func:`models.eclm.knapsack.forced_modules`), so it is never dropped.
        """
        costs, shared, layer_of = self._costs()
        load = self.device.load_factor(server_round)
        epochs = max(self.device.train.epochs, 1)
        seconds = float(self.device.options.get("round_budget_s", float("inf")))
        comp = seconds * float(self.device.budget["flops_per_s"]) / load / max(samples * epochs, 1)
        budget = (float("inf"), comp, float(self.device.budget["memory_bytes"]))
        importance = self._local_importance(model, ids, samples, server_round)
        chosen = {mid: costs[mid] for mid in ids}
        layers = {mid: layer_of[mid] for mid in ids}
        selection = Selection(ids=tuple(ids), forced=forced_modules(importance, layers), importance=0.0, cost=None)
        try:
            fitted = fit_to_load(selection, importance, layers, chosen, shared, budget)
        except InfeasibleBudget:
            return ids  # even the forced set is over: train what the cloud chose (counted as slow)
        return tuple(fitted.ids)

    def _local_importance(self, model, ids, samples, server_round) -> Mapping[str, float]:
        data = self.device.data(self.device.slot_of_round(server_round))
        scores = self.importance(model, data.train_x)
        return {mid: scores[mid] for mid in ids}
