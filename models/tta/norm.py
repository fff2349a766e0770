"""Statistics-only online TTA baselines of CEMA: BN adaptation and ONDA (no gradient, no parameter update).

Both follow the online protocol of :class:`models.tta.base.OnlineAdapter` (predict, then adapt);
neither has anything to adapt after predicting: BN adaptation keeps no state, and ONDA folds each
batch into its running statistics *before* normalising the batch with them, as the references do.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.batchnorm import bn_forward, use_test_batch_statistics
from models.tta.base import OnlineAdapter, require_batch_norm

#: BN adaptation mixing the source and the batch statistics (chenyaofo/CEMA ``BNAdaptation``).
MIXED = "mixed"
#: BN adaptation with the batch's statistics alone (DequanWang/tent ``norm.py``; test-time-adaptation ``BNTest``).
BATCH = "batch"
BN_STATS = (MIXED, BATCH)
#: Weight of the batch statistics in :data:`MIXED` (chenyaofo/CEMA ``conf/bn_adapt.conf``: momentum 0.5).
BN_ADAPT_MOMENTUM = 0.5

#: ONDA folding each BN layer's batch statistics in, then normalising with them, in one pass
#: (chenyaofo/CEMA ``TEMA``, ``tema_bn_forward_impl``).
LAYERWISE = "layerwise"
#: ONDA folding the batch in with a train-mode pass, then predicting with an eval-mode pass
#: (mariodoebler/test-time-adaptation ``EMABatchNorm``, config ``norm_ema``).
TWO_PASS = "two_pass"
ONDA_UPDATES = (LAYERWISE, TWO_PASS)
#: Weight of each new batch in ONDA's moving average (chenyaofo/CEMA ``conf/tema.conf``: momentum 0.1;
#: test-time-adaptation's ``EMABatchNorm`` uses the layers' own, PyTorch's default 0.1).
ONDA_MOMENTUM = 0.1


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _require_running_statistics(layers: list[_BatchNorm], method: str) -> None:
    for layer in layers:
        if layer.running_mean is None:
            raise ValueError(f"{method} mixes the source running statistics into the batch's, but a "
                             f"{type(layer).__name__} has none (track_running_stats=False)")


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance of a BN input ``(N, C, ...)`` (all dimensions but 1).

    chenyaofo/CEMA ``bn_utils.bn_mean_var`` (``torch.var_mean(..., unbiased=True)``), the batch
    statistics its BN adaptation and ONDA baselines mix into the running ones.
    """
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, unbiased=True)
    return mean, var


def mixed_batch_norm(layer: _BatchNorm, x: Tensor, momentum: float) -> Tensor:
    """``layer`` normalising ``x`` with ``(1 - m) * running + m * batch`` statistics; nothing stored.

    chenyaofo/CEMA ``bn_adapt_bn_forward_impl`` (BN adaptation of Schneider et al., NeurIPS 2020,
    with the prior weight ``N / (N + n) = 1 - m``); the batch variance is the unbiased one.
    """
    mean, var = batch_moments(x)
    mixed_mean = (1 - momentum) * layer.running_mean + momentum * mean
    mixed_var = (1 - momentum) * layer.running_var + momentum * var
    return F.batch_norm(x, mixed_mean, mixed_var, layer.weight, layer.bias, False, 0.0, layer.eps)


def folding_batch_norm(layer: _BatchNorm, x: Tensor, momentum: float) -> Tensor:
    """``layer`` folding ``x``'s statistics into its running ones, then normalising ``x`` with them.

    ``running <- (1 - m) * running + m * batch`` (unbiased batch variance), in place
    (chenyaofo/CEMA ``tema_bn_forward_impl``).
    """
    mean, var = batch_moments(x)
    layer.running_mean.copy_((1 - momentum) * layer.running_mean + momentum * mean)
    layer.running_var.copy_((1 - momentum) * layer.running_var + momentum * var)
    return F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)


class BatchNormAdapt(OnlineAdapter):
    """BN adaptation (Schneider et al., NeurIPS 2020): normalise with test-batch statistics.

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers (never changed).
    stats : {"mixed", "batch"}
        :data:`MIXED` (default: the CEMA poster's "BN Adaptation" row, chenyaofo/CEMA
        ``conf/bn_adapt.conf``) or :data:`BATCH` (batch statistics only, Tent's ``norm.py``).
    momentum : float
        Weight of the batch statistics in :data:`MIXED`, in (0, 1] (:data:`BN_ADAPT_MOMENTUM`).
    """

    def __init__(self, model: nn.Module, stats: str = MIXED, momentum: float = BN_ADAPT_MOMENTUM) -> None:
        super().__init__(model)
        if stats not in BN_STATS:
            raise ValueError(f"stats must be one of {BN_STATS}, got {stats!r}")
        _check_fraction("momentum", momentum)
        layers = require_batch_norm(model, "bn_adapt")
        model.requires_grad_(False)
        self.stats, self.momentum = stats, momentum
        if stats == MIXED:
            _require_running_statistics(layers, "bn_adapt (stats='mixed')")
            model.eval()
        else:
            use_test_batch_statistics(model)

    @torch.no_grad()
    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        if self.stats == BATCH:
            return self.model(x)
        with bn_forward(self.model, partial(mixed_batch_norm, momentum=self.momentum)):
            return self.model(x)


class OnlineBatchNorm(OnlineAdapter):
    """ONDA (Mancini et al., ICRA 2018): BN running statistics as a moving average of the test batches.

    Each batch is folded into the statistics first, ``running = (1 - m) * running + m * batch``,
    and then normalised with them, as both references do (the prediction depends on the batch).

    Parameters
    ----------
    model : nn.Module
        Network with BatchNorm layers holding running statistics.
    momentum : float
        Weight of the new batch, in (0, 1] (:data:`ONDA_MOMENTUM`).
    update : {"layerwise", "two_pass"}
        :data:`LAYERWISE` (default, chenyaofo/CEMA ``TEMA``, the baseline of the CEMA poster): each
        layer folds the statistics of its input as the forward reaches it. :data:`TWO_PASS`
        (test-time-adaptation ``EMABatchNorm``): a train-mode pass folds every layer's batch
        statistics (of inputs normalised with batch statistics), an eval-mode pass predicts.
    """

    def __init__(self, model: nn.Module, momentum: float = ONDA_MOMENTUM, update: str = LAYERWISE) -> None:
        super().__init__(model)
        _check_fraction("momentum", momentum)
        if update not in ONDA_UPDATES:
            raise ValueError(f"update must be one of {ONDA_UPDATES}, got {update!r}")
        self.bn_layers = require_batch_norm(model, "onda")
        _require_running_statistics(self.bn_layers, "onda")
        self.momentum, self.update = momentum, update
        model.requires_grad_(False)
        model.eval()

    @torch.no_grad()
    def _predict_then_adapt(self, x: Tensor) -> Tensor:
        if self.update == LAYERWISE:
            with bn_forward(self.model, partial(folding_batch_norm, momentum=self.momentum)):
                return self.model(x)
        for layer in self.bn_layers:
            layer.train()
            layer.momentum = self.momentum
        self.model(x)
        self.model.eval()
        return self.model(x)
