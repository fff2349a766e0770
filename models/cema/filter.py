"""CEMA's edge side: the upload filter (sample selection) by prediction entropy.

The edge predicts each incoming batch and uploads only the samples the cloud can learn from
(CEMA poster, "Dynamic entropy-based sample filtration"):

* reliable: ``E(x) < E_max^t``, a threshold that follows the stream's mean entropy;
* informative: ``E(x) > E_min``, a fixed threshold;
* non-redundant (EATA-style, official code ``SimilarityCriterion``): ``|cos(m, p(x))| < d``
  with ``m`` a moving average of the softmaxes already uploaded.

Details settled from the official code (chenyaofo/CEMA, ``codebase/core/tta/cema.py``,
``EntropyCriterion``, ``AverageMetric``, ``SimilarityCriterion``):

* The running mean entropy counts *samples* (``AverageMetric.update`` adds ``numel``), and
  the current batch is added to it *before* the batch is thresholded.
* Warm-up ends on the first batch after which at least ``warmup_samples`` samples have been
  seen; the mean at that moment is frozen as the reference. Before that ``E_max^t = E_max^0``
  (lambda is not applied); afterwards ``E_max^t = lambda * E_max^0 * mean / reference``.
* The redundancy test runs only on the entropy survivors. With no history yet, every
  survivor is kept and the history becomes their mean softmax; afterwards the history moves
  as ``0.9 * m + 0.1 * mean(kept softmaxes)`` (unchanged when nothing is kept).

Defaults: the setting the official repository's ``tools/results.txt`` reports as chosen
(``E_min=0.02, lambda=1.0``, uploads 51 % -> 35 % at severity 3), which is the poster's
filter. The example ``conf/cema.conf`` the repository runs turns both of CEMA's own filter
rules off (``ent_low_margin: null``, ``warm_up_batch_size: null``: ``E_max^t = E_max^0``
throughout, so ``ent_high_margin_coeff: 0.6`` never applies), which leaves EATA's filter;
pass ``e_min_fraction=None`` and ``warmup_samples=None`` for it. No warm-up length is
published: :data:`WARMUP_SAMPLES` is ours.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models.losses import prediction_entropy

#: E_max^0 = 0.4 ln C (poster; official conf ``ent_high_margin: 0.4``; EATA's E0).
E_MAX_FRACTION = 0.4
#: E_min = e_min ln C (official ``tools/results.txt``); None: no lower bound (``conf/cema.conf``).
E_MIN_FRACTION = 0.02
#: lambda of the dynamic rule (official ``tools/results.txt``; ``conf/cema.conf``: 0.6, which
#: never applies there because it never warms up).
THRESHOLD_COEFF = 1.0
#: Samples seen before the reference mean is frozen: 10 edge batches of 64 (assumption; the
#: official code publishes none). None: never, so the threshold stays E_max^0 (``conf/cema.conf``).
WARMUP_SAMPLES = 640
#: Redundancy margin on |cos(m, p)| for ImageNet-sized label sets (official conf
#: ``d_margin: 0.05``; EATA ``main.py --d_margin``). 10-class data use 0.4
#: (``experiments.algorithms.cema.d_margin``).
COSINE_MARGIN = 0.05
#: Weight of the old history in the moving average of uploaded softmaxes (official/EATA 0.9).
HISTORY_MOMENTUM = 0.9


def default_e_max0(num_classes: int, e_max_fraction: float = E_MAX_FRACTION) -> float:
    """``E_max^0 = e_max_fraction ln C`` (poster; official ``ent_high_margin * math.log(n_class)``).

    Also the cloud's reference entropy ``E0`` of the loss weights ``exp(E0 - E)``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; entropy thresholds need at least 2 classes")
    if not 0 < e_max_fraction <= 1:
        raise ValueError(f"e_max_fraction={e_max_fraction}; use a value in (0, 1] (official 0.4)")
    return e_max_fraction * math.log(num_classes)


class UploadFilter:
    """The edge's sample selection of CEMA (module docstring gives the rules and sources).

    Parameters
    ----------
    num_classes : int
        C, the number of classes of the edge model's output.
    e_max_fraction : float
        ``E_max^0 = e_max_fraction * ln C``, in (0, 1].
    e_min_fraction : float or None
        ``E_min = e_min_fraction * ln C``, in [0, e_max_fraction); None: no lower bound.
    threshold_coeff : float
        lambda of the dynamic rule ``E_max^t = lambda E_max^0 mean / reference``, > 0.
    warmup_samples : int or None
        Samples after which the reference mean entropy is frozen (>= 1); None: never.
    cosine_margin : float
        Redundancy margin on ``|cos|``, > 0 (above 1 nothing is redundant).
    history_momentum : float
        Moving-average weight of the old history, in [0, 1).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        e_max_fraction: float = E_MAX_FRACTION,
        e_min_fraction: float | None = E_MIN_FRACTION,
        threshold_coeff: float = THRESHOLD_COEFF,
        warmup_samples: int | None = WARMUP_SAMPLES,
        cosine_margin: float = COSINE_MARGIN,
        history_momentum: float = HISTORY_MOMENTUM,
    ) -> None:
        check_filter_settings(
            num_classes, e_max_fraction, e_min_fraction, threshold_coeff, warmup_samples, cosine_margin,
            history_momentum,
        )
        self.num_classes = num_classes
        self.e_max0 = default_e_max0(num_classes, e_max_fraction)
        self.e_min = None if e_min_fraction is None else e_min_fraction * math.log(num_classes)
        self.threshold_coeff = threshold_coeff
        self.warmup_samples = warmup_samples
        self.cosine_margin = cosine_margin
        self.history_momentum = history_momentum
        self.samples_seen = 0
        self.entropy_sum = 0.0
        self.reference_mean: float | None = None
        self.history: torch.Tensor | None = None

    @property
    def mean_entropy(self) -> float:
        """Mean entropy of every sample seen so far (0 before the first batch)."""
        return self.entropy_sum / self.samples_seen if self.samples_seen else 0.0

    @property
    def threshold(self) -> float:
        """The current ``E_max^t`` (``E_max^0`` until warm-up ends)."""
        if self.reference_mean is None:
            return self.e_max0
        ratio = self.mean_entropy / self.reference_mean if self.reference_mean > 0 else 1.0
        return self.threshold_coeff * self.e_max0 * ratio

    @torch.no_grad()
    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Which samples of one edge batch to upload; updates the filter's state.

        Parameters
        ----------
        logits : Tensor, shape (B, C)
            The edge model's outputs on the batch.

        Returns
        -------
        Tensor of bool, shape (B,)
            True where ``E_min < E < E_max^t`` and the softmax is not redundant.
        """
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match (batch, {self.num_classes})")
        ents = prediction_entropy(logits.detach().double(), log_space=True)
        self._observe(ents)
        keep = ents < self.threshold
        if self.e_min is not None:
            keep &= ents > self.e_min
        keep[keep.clone()] = self._non_redundant(logits.detach().double()[keep].softmax(dim=-1))
        return keep

    def _observe(self, ents: torch.Tensor) -> None:
        """Add a batch to the running mean; freeze the reference once warm-up is over."""
        self.samples_seen += ents.numel()
        self.entropy_sum += float(ents.sum())
        if self.reference_mean is None and self.warmup_samples is not None and self.samples_seen >= self.warmup_samples:
            self.reference_mean = self.mean_entropy

    def _non_redundant(self, probs: torch.Tensor) -> torch.Tensor:
        """Keep-mask over ``probs`` (entropy survivors) and the history update (EATA)."""
        if self.history is None:
            keep = torch.ones(len(probs), dtype=torch.bool)
        else:
            cos = F.cosine_similarity(self.history.unsqueeze(0), probs, dim=1)
            keep = cos.abs() < self.cosine_margin
        if keep.any():
            batch_mean = probs[keep].mean(dim=0)
            m = self.history_momentum
            self.history = batch_mean if self.history is None else m * self.history + (1 - m) * batch_mean
        return keep

    def state_dict(self) -> dict:
        """The filter's running state as plain numbers and lists (fits a Flower ConfigRecord).

        ``history`` is always C floats; ``has_history`` and ``warmed_up`` say whether
        ``history`` and ``reference_mean`` hold values yet.
        """
        history = self.history if self.history is not None else torch.zeros(self.num_classes, dtype=torch.float64)
        return {
            "num_classes": self.num_classes,
            "samples_seen": self.samples_seen,
            "entropy_sum": self.entropy_sum,
            "warmed_up": self.reference_mean is not None,
            "reference_mean": self.reference_mean if self.reference_mean is not None else 0.0,
            "has_history": self.history is not None,
            "history": [float(v) for v in history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the running state written by :meth:`state_dict` (lists or numpy arrays)."""
        history = np.asarray(state["history"], dtype=np.float64)
        if int(state["num_classes"]) != self.num_classes or history.shape != (self.num_classes,):
            raise ValueError(
                f"state is for {state['num_classes']} classes (history shape {history.shape}), "
                f"this filter has {self.num_classes}; build the filter with the same num_classes"
            )
        self.samples_seen = int(state["samples_seen"])
        self.entropy_sum = float(state["entropy_sum"])
        self.reference_mean = float(state["reference_mean"]) if bool(state["warmed_up"]) else None
        self.history = torch.from_numpy(history.copy()) if bool(state["has_history"]) else None


def check_filter_settings(
    num_classes: int,
    e_max_fraction: float,
    e_min_fraction: float | None,
    threshold_coeff: float,
    warmup_samples: int | None,
    cosine_margin: float,
    history_momentum: float,
) -> None:
    """Raise ValueError naming the first bad filter setting (the rules of :class:`UploadFilter`).

    ``experiments.validation`` applies the same rules to ``algorithm.cema``, so a run the
    validation accepts never fails on a device.
    """
    default_e_max0(num_classes, e_max_fraction)
    if e_min_fraction is not None and not 0 <= e_min_fraction < e_max_fraction:
        raise ValueError(
            f"need 0 <= e_min_fraction < e_max_fraction, got {e_min_fraction} and {e_max_fraction} "
            "(or e_min_fraction=None: no lower bound)"
        )
    if threshold_coeff <= 0:
        raise ValueError(f"threshold_coeff={threshold_coeff}; lambda must be > 0 (official 0.6, poster 1.0)")
    if warmup_samples is not None and warmup_samples < 1:
        raise ValueError(f"warmup_samples={warmup_samples}; use at least 1 sample, or None for no warm-up")
    if cosine_margin <= 0:
        raise ValueError(f"cosine_margin={cosine_margin}; use a margin > 0 (EATA: 0.05 ImageNet, 0.4 CIFAR-10)")
    if not 0 <= history_momentum < 1:
        raise ValueError(f"history_momentum={history_momentum}; use a value in [0, 1) (EATA uses 0.9)")
