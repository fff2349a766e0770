"""ECLM's modular network (sections 4.1-4.2, 5.1-5.2): module layers, sub-model extract and merge.

A :class:`ModularNet` is ``head(layer_L(... layer_1(trunk(x)) ...))`` where every module
layer holds N substitutable modules (shrunk blocks and parameter-free residual bypasses)
and a :class:`~models.eclm.selector.UnifiedSelector` picks the top-k modules of every layer in
one pass over the input.

Contract with strategies and clients (see the ECLM model API note):

- module id ``"l{layer}.m{index}"``; all its state-dict keys start with
  ``"layers.{layer}.modules.m{index}."`` (residual modules have none);
- every other key is shared (trunk, head, ``selector.``); ``layers.{l}.active`` (bool [N])
  marks the modules a (sub-)model holds and is per-device: never aggregate it;
- ``extract(ids)`` builds a physically smaller copy holding the same keys for what it keeps,
  ``merge(sub)`` copies a sub-model's tensors back by key.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.eclm.costs import ZERO_COST, ModuleCost, PartProfile, profile_part
from models.eclm.layer import ACTIVE_SUFFIX, ModuleLayer, module_id, parse_module_id
from models.eclm.selector import LOAD_BALANCE_WEIGHT, UnifiedSelector, load_balance_loss, noisy_top_k

#: Salt of the routing-noise seed ("nois"): keeps the noise stream apart from init seeds.
NOISE_STREAM = 0x6E6F6973


@dataclass
class RoutingInfo:
    """What the last forward pass routed (ECLM 4.3 needs it for the auxiliary losses).

    Attributes
    ----------
    gates : list[Tensor]
        Per layer (B, N_l) sparse gates; each row has min(k, active) nonzeros summing to 1.
    logits : list[Tensor]
        Per layer (B, N_l) clean selector logits (before masking and noise).
    load_balance_loss : Tensor
        Sum over layers of ``w * (CV^2(importance) + CV^2(load))`` on the active modules.
    loads, importances : list[Tensor]
        Per layer (N_l,) load and importance (see :func:`models.eclm.selector.noisy_top_k`).
    """

    gates: list[torch.Tensor]
    logits: list[torch.Tensor]
    load_balance_loss: torch.Tensor
    loads: list[torch.Tensor]
    importances: list[torch.Tensor]


@contextmanager
def _eval_mode(module: nn.Module):
    """Temporarily put every submodule in eval mode, restoring each one's own flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class ModularNet(nn.Module):
    """ECLM's modularized network with a unified module selector.

    Parameters
    ----------
    trunk : nn.Module
        Shared, non-modularized layers before the first module layer.
    layers : list[ModuleLayer]
        The module layers, applied in order.
    head : nn.Module
        Shared layers after the last module layer (pooling, classifier).
    selector : UnifiedSelector
        Decides every layer's gates from the raw input.
    config : dict
        Keyword arguments of :func:`models.eclm.families.build_modular` that rebuild the same architecture.
    input_shape : tuple[int, ...]
        Shape of one input sample (used to measure costs).
    balance_weight : float
        w of the load-balancing loss.
    seed : int
        Seeds the routing-noise generator (see :meth:`reseed_noise`).
    """

    def __init__(
        self,
        trunk: nn.Module,
        layers: list[ModuleLayer],
        head: nn.Module,
        selector: UnifiedSelector,
        config: Mapping,
        input_shape: tuple[int, ...],
        balance_weight: float = LOAD_BALANCE_WEIGHT,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.selector, self.trunk = selector, trunk
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.config = dict(config)
        self.input_shape = tuple(input_shape)
        self.balance_weight = balance_weight
        self.last_routing: RoutingInfo | None = None
        self._profiles: dict[str, PartProfile] = {}
        self.reseed_noise(seed)

    def __getstate__(self) -> dict:
        """Copy and pickle without :attr:`last_routing` (its tensors belong to an autograd graph)."""
        state = self.__dict__.copy()
        state["last_routing"] = None
        return state

    # ------------------------------------------------------------------ routing
    def reseed_noise(self, seed: int) -> None:
        """Restart the routing-noise stream from ``seed`` (e.g. per device and round)."""
        draw = np.random.default_rng([int(seed), NOISE_STREAM]).integers(2**62)
        self._noise = torch.Generator().manual_seed(int(draw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits; the routing of this pass is kept in :attr:`last_routing`."""
        logits, noise = self.selector.logits_and_noise(x)
        h = self.trunk(x)
        routing = RoutingInfo([], logits, x.new_zeros(()), [], [])
        for layer, clean, noisy in zip(self.layers, logits, noise):
            gates, load, importance = noisy_top_k(clean, noisy, layer.k, self.training, layer.active, self._noise)
            h = layer(h, gates)
            routing.load_balance_loss = routing.load_balance_loss + load_balance_loss(
                importance[layer.active], load[layer.active], self.balance_weight
            )
            routing.gates.append(gates)
            routing.loads.append(load)
            routing.importances.append(importance)
        self.last_routing = routing
        return self.head(h)

    def gate_probs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """ECLM's g(x): per layer (B, N_l) softmax of the clean logits over the active modules.

        No noise, no top-k; inactive modules get exactly 0. ECLM 5.1's importance of module
        i on device k is the mean of these rows over the device's samples.
        """
        return [
            torch.softmax(lg.masked_fill(~layer.active, float("-inf")), dim=1)
            for lg, layer in zip(self.selector(x), self.layers)
        ]

    # ------------------------------------------------------------------ module catalogue
    def module_ids(self) -> list[str]:
        """Ids of the modules this network holds, layer by layer, ascending."""
        return [module_id(l, i) for l, layer in enumerate(self.layers) for i in layer.held()]

    def layer_sizes(self) -> list[int]:
        """N_l of every module layer of the full architecture (also for a sub-model)."""
        return [layer.size for layer in self.layers]

    def module_kinds(self) -> dict[str, str]:
        """``"shrunk"`` or ``"residual"`` for every held module id."""
        return {
            module_id(l, i): "residual" if i in layer.residual else "shrunk"
            for l, layer in enumerate(self.layers)
            for i in layer.held()
        }

    def _checked_ids(self, ids: Iterable[str]) -> dict[int, set[int]]:
        """Group ids by layer; ValueError for malformed, unknown or unheld ids and empty layers."""
        if isinstance(ids, str):
            raise ValueError(f"ids must be an iterable of module ids, got the single string {ids!r}")
        chosen: dict[int, set[int]] = {l: set() for l in range(len(self.layers))}
        for mid in ids:
            layer, index = parse_module_id(mid)
            if layer >= len(self.layers) or index >= self.layers[layer].size:
                raise ValueError(f"unknown module id {mid!r}; this network has layer sizes {self.layer_sizes()}")
            if index not in self.layers[layer].held():
                raise ValueError(f"module {mid!r} is not held by this network; it holds {self.module_ids()}")
            chosen[layer].add(index)
        empty = [l for l, idx in chosen.items() if not idx]
        if empty:
            raise ValueError(f"ids leave module layer(s) {empty} empty; pick at least one module per layer")
        return chosen

    def set_active(self, ids: Iterable[str]) -> None:
        """Restrict routing to ``ids`` without removing modules (a masked, same-size network)."""
        chosen = self._checked_ids(ids)
        for l, layer in enumerate(self.layers):
            layer.active.zero_()
            layer.active[sorted(chosen[l])] = True

    # ------------------------------------------------------------------ surgery
    def extract(self, ids: Iterable[str]) -> "ModularNet":
        """A physically smaller copy holding only ``ids`` plus deep copies of the shared parts.

        Kept tensors keep their keys; ``active`` marks the held modules, so the copy's
        selector routes among them only. Raises ValueError for unknown/unheld ids or when
        a layer would be left empty.
        """
        chosen = self._checked_ids(ids)
        saved = [dict(layer.module_dict._modules) for layer in self.layers]
        try:
            for l, layer in enumerate(self.layers):
                for name in list(layer.module_dict):
                    if int(name[1:]) not in chosen[l]:
                        del layer.module_dict[name]
            sub = copy.deepcopy(self)
        finally:
            for layer, modules in zip(self.layers, saved):
                layer.module_dict._modules.clear()
                layer.module_dict._modules.update(modules)
        for l, layer in enumerate(sub.layers):
            layer.active.zero_()
            layer.active[sorted(chosen[l])] = True
        return sub

    @torch.no_grad()
    def merge(self, sub: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy a sub-model's parameters and buffers back by key (its modules and the shared parts).

        ``.active`` masks are skipped (they are per-device); every key this network has and
        ``sub`` lacks stays bit-identical. ``sub`` may also be a state dict.
        """
        theirs = sub.state_dict() if isinstance(sub, nn.Module) else dict(sub)
        own = self.state_dict()
        for key, value in theirs.items():
            if key.endswith(ACTIVE_SUFFIX):
                continue
            if key not in own:
                raise ValueError(f"sub-model key {key!r} does not exist in this network; merge only its own sub-models")
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"{key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        for key, value in theirs.items():
            if not key.endswith(ACTIVE_SUFFIX):
                own[key].copy_(torch.as_tensor(value))

    # ------------------------------------------------------------------ costs (ECLM 5.1)
    def module_costs(self, batch_size: int) -> dict[str, ModuleCost]:
        """Measured :class:`ModuleCost` of every held module (see models/eclm/costs.py).

        Residual modules cost exactly 0 (ECLM 4.1). ECLM 5.1: a sub-model costs
        ``shared_cost + sum of its modules' costs``.
        """
        self._profile_all()
        kinds = self.module_kinds()
        return {
            mid: ZERO_COST if kinds[mid] == "residual" else self._profiles[mid].cost(batch_size)
            for mid in self.module_ids()
        }

    def shared_cost(self, batch_size: int) -> ModuleCost:
        """Cost of what every sub-model carries: trunk, head, selector (and ``active`` masks)."""
        self._profile_all()
        shared = self._profiles["shared"]
        active_bytes = sum(layer.active.numel() * layer.active.element_size() for layer in self.layers)
        return PartProfile(active_bytes, 0.0, 0.0, 0.0).cost(batch_size) + shared.cost(batch_size)

    def _profile_all(self) -> None:
        """Measure every held module and the shared parts once (structure never changes)."""
        missing = [
            (l, i) for l, layer in enumerate(self.layers) for i in layer.held()
            if i not in layer.residual and module_id(l, i) not in self._profiles
        ]
        if not missing and "shared" in self._profiles:
            return
        shapes = self._part_input_shapes()
        for l, i in missing:
            module = self.layers[l].module_dict[f"m{i}"]
            self._profiles[module_id(l, i)] = profile_part(module, shapes[l], input_grad=True)
        if "shared" not in self._profiles:
            self._profiles["shared"] = (
                profile_part(self.trunk, self.input_shape, input_grad=False)
                + profile_part(self.head, shapes[-1], input_grad=True)
                + profile_part(self.selector.embed, self.input_shape, input_grad=False)
                + _heads_profile(self.selector)
            )

    @torch.no_grad()
    def _part_input_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample input shape of every module layer, then of the head (eval-mode probe)."""
        with _eval_mode(self):
            h = self.trunk(torch.zeros((1, *self.input_shape)))
            shapes = []
            for layer in self.layers:
                shapes.append(tuple(h.shape[1:]))
                h = layer.module_dict[f"m{layer.held()[0]}"](h)
            shapes.append(tuple(h.shape[1:]))
        return shapes


def _heads_profile(selector: UnifiedSelector) -> PartProfile:
    """Profile of the selector's gating and noise heads at the embedding's output width."""
    width = selector.heads[0].in_features
    total = PartProfile(0.0, 0.0, 0.0, 0.0)
    for head in [*selector.heads, *selector.noise_heads]:
        total = total + profile_part(head, (width,), input_grad=True)
    return total

