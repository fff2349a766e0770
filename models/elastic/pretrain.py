"""Offline pre-training of ElasticDNN's master DNN and domain-knowledge bank (sec. III-B1).

Per mini-batch of the labelled source (proxy) data, with a target sparsity drawn at random:

    loss = CE(master(x), y) + gate_l1_weight * sum_i ||p_i||_1 + bank_weight * bank_loss

* The master runs with top-k gating keeping a share ``s ~ U(sparsity_range)`` of every
  layer's gates (FBS's k-winners-take-all; EdgeTailor ``EdgeTailorCL/pretrain.py`` draws the
  share of zeroed gates from ``[0, max_sparsity]`` with ``max_sparsity`` up to 0.8, i.e. a kept
  share in ``[0.2, 1.0]``, our default). EdgeTailor also trains the extreme sparsities in each
  step, the *sandwich rule* of slimmable networks (Yu & Huang, ICCV 2019: the largest and the
  smallest width every step, besides random ones). ``sandwich`` (:data:`SANDWICH_MODES`) adds
  the CE of those extremes to the drawn sparsity's on the same step: ``both`` (default) the
  full (ungated-by-top-k) master and the smallest share ``sparsity_range[0]``, ``largest`` the
  full master only, ``none`` neither. Measured on digits: the full master alone kept learning
  where one random sparsity per step stalled (CE 2.19 vs 1.33 after 3 epochs on 1,000
  samples); adding the smallest share lifted the claims preset's ElasticDNN from 81.7 % to
  86.1 % (docs/RESULTS.md, ``elasticdnn_sandwich_largest``).
* The gate L1 is FBS's lasso on the gate values (Gao et al. 2019, sec. 3.4), summed over the
  batch as in EdgeTailor (``raw_w.norm(1)``), weight 1e-8 (EdgeTailor ``l1_wds[0]``).
* The bank loss (:func:`~models.elastic.bank.bank_loss`) ties every filter to a linear combination
  of its layer's bank. The paper gives no weight; a bank can always match the filters
  exactly, so the term does not constrain the master and its weight only sets how fast the
  bank follows: default 1.0 (our assumption). At the end :func:`sync_master_to_bank` makes
  the bank loss exactly 0, so eq. 4 is a no-op until the first master update.

Both the master and the bank (``theta*`` and ``W``) are trained. Batches come in an order
drawn from ``torch.Generator().manual_seed(seed)``, sparsities from
``np.random.default_rng([seed, SPARSITY_STREAM])``: the same call gives the same losses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from models.elastic.bank import DomainKnowledgeBank, bank_loss, sync_master_to_bank
from models.elastic.fbs import check_fraction
from models.elastic.surrogate import apply_keep_masks, clear_keep_masks, gate_relevance, hardest_sample, select_filters

#: Kept share of gates per step, drawn uniformly (EdgeTailor pretrain.py: zeroed share in [0, 0.8]).
SPARSITY_RANGE = (0.2, 1.0)
#: Weight of the gate L1 (EdgeTailor pretrain.py ``l1_wds = [1e-8, ...]``; FBS's lasso).
GATE_L1_WEIGHT = 1e-8
#: Weight of the bank loss (paper silent; our assumption, see the module docstring).
BANK_WEIGHT = 1.0
#: SGD momentum when ``optimizer="sgd"`` (EdgeTailor pretrain.py: ``momentum=0.9``).
SGD_MOMENTUM = 0.9
#: How the drawn sparsity is applied: ``topk`` (FBS's per-sample k-winners-take-all in every
#: unit) or ``surrogate`` (the static keep plan a surrogate of that size would use: filters and
#: residual-stream channels chosen from the batch's hardest sample, III-B steps 1-2). Top-k
#: alone left the 20 % surrogates at chance on digits (measured: 0.10 before retraining, the
#: residual streams never saw static pruning), so the master is trained for its surrogates.
MASK_MODES = ("surrogate", "topk")
#: What every step trains besides the drawn share (module docstring): both extremes, the full
#: master only, or nothing more.
SANDWICH_MODES = ("both", "largest", "none")
#: Stream id of the sparsity draws in ``np.random.default_rng([seed, SPARSITY_STREAM])``.
SPARSITY_STREAM = 1

__all__ = ["pretrain_master", "sync_master_to_bank", "SPARSITY_RANGE", "GATE_L1_WEIGHT", "BANK_WEIGHT"]


def _check_args(x: Tensor, y: Tensor, epochs: int, lr: float, batch_size: int,
                sparsity_range: tuple[float, float], optimizer: str) -> None:
    """ValueError naming the first bad pre-training argument."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must hold the same number (>= 1) of samples, got {len(x)} and {len(y)}")
    if int(epochs) < 0 or int(batch_size) < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    low, high = (check_fraction(s, "sparsity_range bound") for s in sparsity_range)
    if low > high:
        raise ValueError(f"sparsity_range must be (low, high) with low <= high, got {sparsity_range}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adam' or 'sgd'")


def _optimizer(params, name: str, lr: float) -> torch.optim.Optimizer:
    """Adam or SGD with momentum :data:`SGD_MOMENTUM` over ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)


def pretrain_master(
    master: nn.Module,
    bank: DomainKnowledgeBank,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    sparsity_range: tuple[float, float] = SPARSITY_RANGE,
    gate_l1_weight: float = GATE_L1_WEIGHT,
    bank_weight: float = BANK_WEIGHT,
    optimizer: str = "adam",
    sync_bank: bool = True,
    sandwich: str = "both",
    mask_mode: str = "surrogate",
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Pre-train ``master`` and ``bank`` in place on labelled source data (module docstring).

    Parameters
    ----------
    master : nn.Module
        A gated network exposing ``set_sparsity`` and ``gate_l1`` (e.g. ``fbs_resnet_cpu``).
    bank : DomainKnowledgeBank
        Built from ``master`` (:func:`~models.elastic.bank.build_bank`).
    x, y : Tensor
        Source images ``[N, C, H, W]`` and labels ``[N]``.
    epochs, lr, batch_size, seed : int, float, int, int
        Passes over the data, learning rate, mini-batch size, seed of batches and sparsities.
    sparsity_range : (float, float)
        Kept share of gates per step is drawn uniformly from it (both bounds in (0, 1]).
    gate_l1_weight, bank_weight : float
        Weights of the gate L1 and of the bank loss.
    optimizer : str
        ``"adam"`` or ``"sgd"`` (momentum 0.9), over the master's and the bank's parameters.
    sync_bank : bool
        Finish with :func:`sync_master_to_bank` (bank loss exactly 0).
    sandwich : str
        ``both``, ``largest`` or ``none``: the extreme shares every step also trains (:data:`SANDWICH_MODES`).
    mask_mode : str
        ``surrogate`` (default) or ``topk``: how the drawn sparsity gates the step (:data:`MASK_MODES`).
    on_epoch : callable or None
        ``(epoch, mean total loss) -> None``, called after each epoch (from 0), e.g. to show
        progress; it changes no draw or weight.

    Returns
    -------
    dict of str to list of float
        Per-epoch sample-weighted means of ``"total"``, ``"ce"``, ``"gate_l1"`` (unweighted)
        and ``"bank"`` (unweighted, before the final sync), and ``"sparsity"`` (mean draw).
        A one-sample last batch is skipped (BatchNorm cannot train on one sample).
    """
    _check_args(x, y, epochs, lr, batch_size, sparsity_range, optimizer)
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mask_mode!r}; choose one of {MASK_MODES}")
    if sandwich not in SANDWICH_MODES:
        raise ValueError(f"sandwich={sandwich!r}; choose one of {SANDWICH_MODES}")
    order_gen = torch.Generator().manual_seed(int(seed))
    sparsity_rng = np.random.default_rng([int(seed), SPARSITY_STREAM])
    opt = _optimizer(list(master.parameters()) + list(bank.parameters()), optimizer, lr)
    history: dict[str, list[float]] = {key: [] for key in ("total", "ce", "gate_l1", "bank", "sparsity")}
    master.train()
    try:
        for epoch in range(int(epochs)):
            sums, count = dict.fromkeys(history, 0.0), 0
            order = torch.randperm(len(x), generator=order_gen)
            for start in range(0, len(x), int(batch_size)):
                idx = order[start : start + int(batch_size)]
                if len(idx) < 2:
                    continue
                sparsity = float(sparsity_rng.uniform(*sparsity_range))
                _apply_sparsity(master, x[idx], sparsity, mask_mode)
                opt.zero_grad(set_to_none=True)
                ce = nn.functional.cross_entropy(master(x[idx]), y[idx])
                l1, tie = master.gate_l1(), bank_loss(master, bank)
                total = ce + gate_l1_weight * l1 + bank_weight * tie
                total.backward()  # before the masks change in place (autograd saved them)
                clear_keep_masks(master)
                for keep in _extremes(sandwich, sparsity_range):  # their gradients add onto the same step
                    extra = _extreme_ce(master, x[idx], y[idx], keep, mask_mode)
                    ce, total = ce + extra, total + extra
                opt.step()
                for key, value in (("total", total), ("ce", ce), ("gate_l1", l1), ("bank", tie)):
                    sums[key] += float(value.detach()) * len(idx)
                sums["sparsity"] += sparsity * len(idx)
                count += len(idx)
            for key in history:
                history[key].append(sums[key] / count if count else float("nan"))
            if on_epoch is not None:
                on_epoch(epoch, history["total"][-1])
    finally:
        master.set_sparsity(None)
    if sync_bank:
        sync_master_to_bank(master, bank)
    return history


def _extremes(sandwich: str, sparsity_range: tuple[float, float]) -> tuple[float | None, ...]:
    """Kept shares the sandwich adds to a step: None is the full master (no top-k, no masks)."""
    return {"both": (None, float(sparsity_range[0])), "largest": (None,), "none": ()}[sandwich]


def _extreme_ce(master: nn.Module, x: Tensor, y: Tensor, keep: float | None, mask_mode: str) -> float:
    """Back-propagate the CE of ``master`` at the kept share ``keep`` (None: full); returns its value."""
    if keep is None:
        master.set_sparsity(None)
    else:
        _apply_sparsity(master, x, keep, mask_mode)
    loss = nn.functional.cross_entropy(master(x), y)
    loss.backward()
    clear_keep_masks(master)
    master.set_sparsity(None)
    return float(loss.detach())


def _apply_sparsity(master: nn.Module, batch: Tensor, keep: float, mask_mode: str) -> None:
    """Gate ``master`` for one step at the kept share ``keep`` (see :data:`MASK_MODES`)."""
    if mask_mode == "topk":
        master.set_sparsity(keep)
        return
    master.set_sparsity(None)
    with torch.no_grad():
        relevance = gate_relevance(master, batch[hardest_sample(master, batch)])
    apply_keep_masks(master, select_filters(relevance, master.channel_groups(), keep))
