"""ElasticDNN's domain-knowledge bank (sec. III-B1, eq. 1) and the master update (III-B3, eq. 3-4).

For every gated conv ``i`` of the master with ``N_i`` filters ``theta_ij`` the bank holds

* ``Theta*_i`` -- ``N_i`` weight matrices ``theta*_ik`` of the filters' shape (eq. 1),
  initialised from the filters themselves;
* ``W_i`` -- an ``N_i x N_i`` relevance matrix ``w_i(j, k)``, initialised to the identity
  plus small Gaussian noise and trainable.

Pre-training adds ``sum_i sum_j ||theta_ij - sum_k W_i(j,k) theta*_ik||^2`` (:func:`bank_loss`)
so each filter becomes a linear combination of its layer's bank. After a surrogate learned
filter changes ``delta_theta_ij``, :func:`update_bank_and_master` stores them in the bank and
rebuilds the master's filters from it, layer by layer:

    eq. 3:  theta*_ik <- theta*_ik + W_i(j,k) * delta_theta_ij   for every changed j, every k
    eq. 4:  theta_ij  <- sum_k W_i(j,k) * theta*_ik              for every filter j of the layer

Eq. 4 is applied to ALL filters of a layer with at least one changed filter (a change of
``theta*`` moves every filter that mixes it); a layer with no changed filter is left
untouched. With ``W_i = I`` the two steps give ``theta_ij += delta_theta_ij`` exactly; with
``W_i`` near I, approximately (``theta <- W theta* + W W^T delta``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.elastic.fbs import gated_units

#: Std of the Gaussian noise added to the identity relevance matrices. The paper gives no
#: value ("relevance"); a small one keeps W_i invertible and near I (our assumption).
RELEVANCE_NOISE_STD = 1e-3


class DomainKnowledgeBank(nn.Module):
    """The bank ``Theta*`` and relevance ``W`` of every gated conv, keyed by the unit's name.

    Parameters
    ----------
    layers : mapping of str to (Tensor, Tensor)
        ``name -> (theta_star [N, *filter_shape], relevance [N, N])``, in master order.
    """

    def __init__(self, layers: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        super().__init__()
        self.layer_names = tuple(layers)
        self.thetas = nn.ParameterList()
        self.relevances = nn.ParameterList()
        for name, (theta_star, relevance) in layers.items():
            n = theta_star.shape[0]
            if tuple(relevance.shape) != (n, n):
                raise ValueError(f"bank layer {name!r}: relevance must be {n}x{n} for {n} filters, "
                                 f"got {tuple(relevance.shape)}")
            self.thetas.append(nn.Parameter(theta_star.detach().clone()))
            self.relevances.append(nn.Parameter(relevance.detach().clone()))
        self._index = {name: i for i, name in enumerate(self.layer_names)}

    def layer(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """``(theta_star, relevance)`` of the layer ``name``; ValueError for an unknown name."""
        if name not in self._index:
            raise ValueError(f"unknown bank layer {name!r}; the bank holds {list(self.layer_names)}")
        i = self._index[name]
        return self.thetas[i], self.relevances[i]


def build_bank(master: nn.Module, *, noise_std: float = RELEVANCE_NOISE_STD, seed: int = 0) -> DomainKnowledgeBank:
    """A bank for ``master``: ``theta*_i`` = the filters, ``W_i = I + noise_std * N(0, 1)``.

    The noise of layer number ``l`` is drawn from ``np.random.default_rng([seed, l])``.
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    layers = {}
    for position, (name, unit) in enumerate(gated_units(master)):
        n = unit.out_channels
        noise = np.random.default_rng([int(seed), position]).standard_normal((n, n))
        relevance = torch.eye(n) + noise_std * torch.as_tensor(noise, dtype=unit.conv.weight.dtype)
        layers[name] = (unit.conv.weight.detach(), relevance)
    if not layers:
        raise ValueError("the master has no gated conv unit (GatedConvBN); a bank needs at least one")
    return DomainKnowledgeBank(layers)


def _paired_layers(master: nn.Module, bank: DomainKnowledgeBank):
    """``(name, unit, theta_star, relevance)`` for every gated unit; ValueError if names differ."""
    units = gated_units(master)
    names = tuple(name for name, _ in units)
    if names != bank.layer_names:
        raise ValueError(f"the bank was built for another network: bank layers {list(bank.layer_names)[:4]}... "
                         f"vs master units {list(names)[:4]}...; build the bank from this master")
    return [(name, unit, *bank.layer(name)) for name, unit in units]


def bank_loss(master: nn.Module, bank: DomainKnowledgeBank) -> Tensor:
    """``sum_i sum_j ||theta_ij - sum_k W_i(j,k) theta*_ik||^2`` (III-B1), differentiable in both.

    Parameters
    ----------
    master : nn.Module
        The network whose gated convs hold ``theta``.
    bank : DomainKnowledgeBank
        Built from ``master`` (same unit names).

    Returns
    -------
    Tensor
        A scalar.
    """
    total = None
    for _, unit, theta_star, relevance in _paired_layers(master, bank):
        combined = relevance @ theta_star.flatten(1)
        term = (unit.conv.weight.flatten(1) - combined).pow(2).sum()
        total = term if total is None else total + term
    return total


def _check_deltas(master: nn.Module, bank: DomainKnowledgeBank, deltas: Mapping) -> dict[str, tuple[Tensor, Tensor]]:
    """Validate ``deltas`` against the master (names, indices, shapes) before anything changes."""
    units = dict(gated_units(master))
    checked = {}
    for name, (indices, delta) in deltas.items():
        if name not in units:
            raise ValueError(f"unknown layer {name!r} in deltas; use names from master.gated_units()")
        bank.layer(name)
        weight = units[name].conv.weight
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= weight.shape[0] or len(torch.unique(idx)) != len(idx)):
            raise ValueError(f"layer {name!r}: filter indices must be distinct values in 0..{weight.shape[0] - 1}, "
                             f"got {idx.tolist()}")
        if tuple(delta.shape) != (len(idx), *weight.shape[1:]):
            raise ValueError(f"layer {name!r}: delta must have shape {(len(idx), *weight.shape[1:])} "
                             f"(one full filter per index), got {tuple(delta.shape)}")
        checked[name] = (idx, delta.detach().to(weight.dtype))
    return checked


@torch.no_grad()
def update_bank_and_master(
    master: nn.Module, bank: DomainKnowledgeBank, deltas: Mapping[str, tuple[Sequence[int] | Tensor, Tensor]]
) -> tuple[str, ...]:
    """Store filter changes in the bank (eq. 3), then rebuild the changed layers' filters (eq. 4).

    Parameters
    ----------
    master : nn.Module
        The master DNN; its gated convs' weights are overwritten in place.
    bank : DomainKnowledgeBank
        Its ``theta*`` are updated in place; ``W`` stays fixed.
    deltas : mapping
        ``layer name -> (filter indices j [m], delta_theta [m, *filter_shape])``.

    Returns
    -------
    tuple of str
        The layers whose filters were rebuilt (those with >= 1 listed filter).

    Notes
    -----
    Processed layer by layer (no whole-model copy). All of ``deltas`` is validated first
    (ValueError naming the bad layer), so a bad entry changes nothing.
    """
    checked = _check_deltas(master, bank, deltas)
    units = dict(gated_units(master))
    updated = []
    for name, (idx, delta) in checked.items():
        if len(idx) == 0:
            continue
        theta_star, relevance = bank.layer(name)
        flat_star = theta_star.view(theta_star.shape[0], -1)
        flat_star += relevance[idx].T @ delta.reshape(len(idx), -1)  # eq. 3, summed over the changed j
        weight = units[name].conv.weight
        weight.copy_((relevance @ flat_star).view_as(weight))  # eq. 4, every filter j of the layer
        updated.append(name)
    return tuple(updated)


@torch.no_grad()
def sync_master_to_bank(master: nn.Module, bank: DomainKnowledgeBank) -> None:
    """Make the bank reproduce the master exactly: ``theta*_i = W_i^{-1} theta_i`` for every layer.

    Run after pre-training, it makes the bank loss 0 (up to float rounding) and eq. 4 a no-op
    until the next change, WITHOUT touching the trained master (solving for the bank rather
    than overwriting the filters with a bank that may lag them). ``W_i`` starts near the
    identity and stays invertible in practice; a singular one raises ``torch.linalg.LinAlgError``.
    """
    for _, unit, theta_star, relevance in _paired_layers(master, bank):
        solved = torch.linalg.solve(relevance.double(), unit.conv.weight.flatten(1).double())
        theta_star.copy_(solved.to(theta_star.dtype).view_as(theta_star))


def bank_thetas(bank: DomainKnowledgeBank) -> dict[str, Tensor]:
    """``layer name -> theta*_i`` (detached copies): what a device shares when banks are averaged."""
    return {name: bank.layer(name)[0].detach().clone() for name in bank.layer_names}


@torch.no_grad()
def load_bank_thetas(master: nn.Module, bank: DomainKnowledgeBank, thetas: Mapping[str, Tensor]) -> None:
    """Set every layer's ``theta*_i`` to ``thetas[name]`` and rebuild all its filters from it (eq. 4).

    The extension beyond the paper that averages devices' banks (FedAvg over ``theta*``;
    ``W`` is the pre-trained one on every device and stays fixed, so the rebuilt filters are
    the average of the devices' filters where their banks reproduced them). All of ``thetas``
    is validated first (ValueError naming the layer), so a bad entry changes nothing.
    """
    layers = _paired_layers(master, bank)
    names = {name for name, *_ in layers}
    if set(thetas) != names:
        raise ValueError(f"thetas must name exactly the bank's layers: missing {sorted(names - set(thetas))[:3]}, "
                         f"unknown {sorted(set(thetas) - names)[:3]}")
    for name, _, theta_star, _ in layers:
        if tuple(thetas[name].shape) != tuple(theta_star.shape):
            raise ValueError(f"bank layer {name!r}: theta* must have shape {tuple(theta_star.shape)}, "
                             f"got {tuple(thetas[name].shape)}")
    for name, unit, theta_star, relevance in layers:
        theta_star.copy_(thetas[name].to(theta_star.dtype))
        unit.conv.weight.copy_((relevance @ theta_star.flatten(1)).view_as(unit.conv.weight))
