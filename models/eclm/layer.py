"""One ECLM module layer and the module-id contract shared by strategies and clients.

A module is named ``"l{layer}.m{index}"``; all its state-dict keys in a
:class:`models.eclm.modular.ModularNet` start with ``"layers.{layer}.modules.m{index}."``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

_ID = re.compile(r"^l(\d+)\.m(\d+)$")
_KEY = re.compile(r"^layers\.(\d+)\.modules\.m(\d+)\.")
#: State-dict suffix of the per-device ``active`` masks.
ACTIVE_SUFFIX = ".active"


def module_id(layer: int, index: int) -> str:
    """The stable id ``"l{layer}.m{index}"`` of module ``index`` in module layer ``layer``."""
    return f"l{layer}.m{index}"


def parse_module_id(mid: str) -> tuple[int, int]:
    """(layer, index) of a module id; ValueError for anything not shaped ``"l<int>.m<int>"``."""
    match = _ID.match(mid) if isinstance(mid, str) else None
    if match is None:
        raise ValueError(f"bad module id {mid!r}; ids look like 'l0.m3' (layer 0, module 3)")
    return int(match.group(1)), int(match.group(2))


def module_of_key(key: str) -> str | None:
    """The module id a state-dict key belongs to, or None for shared keys (and ``.active``)."""
    match = _KEY.match(key)
    return None if match is None else module_id(int(match.group(1)), int(match.group(2)))


class ModuleLayer(nn.Module):
    """One module layer: N substitutable modules combined by sparse gates (ECLM 4.2).

    Parameters
    ----------
    held : Mapping[int, nn.Module]
        The modules this layer holds, by index (a sub-model holds a subset of 0..N-1).
    size : int
        N, the number of modules of the full layer.
    k : int
        Modules activated per sample (top-k).
    residual : Iterable[int]
        Indices of the parameter-free residual modules.

    Notes
    -----
    The ``nn.ModuleDict`` is registered under the name ``modules`` so state-dict keys read
    ``modules.m{i}.``; since ``nn.Module.modules`` is a method, reach it as :attr:`module_dict`.
    """

    def __init__(self, held: Mapping[int, nn.Module], size: int, k: int, residual: Iterable[int] = ()) -> None:
        super().__init__()
        if not held:
            raise ValueError("a module layer must hold at least one module")
        if any(not 0 <= i < size for i in held):
            raise ValueError(f"module indices {sorted(held)} must lie in 0..{size - 1}")
        # add_module refuses the name (nn.Module.modules exists): register it directly.
        self._modules["modules"] = nn.ModuleDict({f"m{i}": held[i] for i in sorted(held)})
        active = torch.zeros(size, dtype=torch.bool)
        active[sorted(held)] = True
        self.register_buffer("active", active)
        self.size, self.k = size, k
        self.residual = frozenset(residual)

    @property
    def module_dict(self) -> nn.ModuleDict:
        """The held modules, keyed ``"m{i}"``."""
        return self._modules["modules"]

    def held(self) -> list[int]:
        """Indices of the modules this layer holds, ascending."""
        return sorted(int(name[1:]) for name in self.module_dict)

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``sum_i gates[:, i] * module_i(x)``; each module runs only on the samples routed to it.

        Like Shazeer et al.'s dispatcher: the (sample, module) pairs with a nonzero gate are
        gathered in one indexing op, module i runs on its own rows only (so in training its
        BatchNorm statistics come from its own samples), and the gated outputs are summed
        back per sample in one ``index_add``.
        """
        if gates.shape != (x.shape[0], self.size):
            raise ValueError(f"gates must have shape ({x.shape[0]}, {self.size}), got {tuple(gates.shape)}")
        pairs = gates.t().nonzero()  # (P, 2) rows (module, sample), grouped by module
        if len(pairs) == 0:
            raise ValueError("every gate is zero: each sample must be routed to at least one module")
        modules, counts = torch.unique_consecutive(pairs[:, 0], return_counts=True)
        missing = [i for i in modules.tolist() if f"m{i}" not in self.module_dict]
        if missing:
            raise ValueError(f"gates route to modules {missing}, which this layer does not hold")
        samples = pairs[:, 1]
        weights = gates[samples, pairs[:, 0]]
        inputs = x[samples].split(counts.tolist())
        outputs = torch.cat([self.module_dict[f"m{i}"](part) for i, part in zip(modules.tolist(), inputs)])
        outputs = outputs * weights.view(-1, *([1] * (outputs.dim() - 1)))
        return outputs.new_zeros((x.shape[0], *outputs.shape[1:])).index_add(0, samples, outputs)
