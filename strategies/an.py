"""AN, AdaptiveNet (Wen et al., MobiCom 2023) as an ECLM 7.1 baseline: the cloud only ships the supernet.

The cloud pre-trains a multi-branch supernet (``models.multibranch.training.train_supernet``) and
sends it, unchanged, to every cohort device; each device picks and fine-tunes its own path
(``clients/an.py``). Nothing is aggregated, like LA (``strategies/local.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from strategies.base import EdgeCloudStrategy
from strategies.metrics import metric_record
from strategies.protocol import ARRAYS_RECORD, CONFIG_RECORD

#: Config key of the per-round compute allowance the devices read.
COMPUTE_BUDGET_KEY = "compute_budget_s"
#: Config record of a training reply naming the path the device chose, and its entry with the
#: path's label (e.g. ``"0-1-3"``).
PATH_RECORD = "path"
PATH_LABEL_KEY = "label"


class AdaptiveNet(EdgeCloudStrategy):
    """Every cohort device gets the pre-trained supernet; the round reports mean metrics and chosen paths.

    Parameters
    ----------
    compute_budget_s : float or None
        Seconds of on-device compute a device may spend per round, sent in every train
        message. ``None`` (default) sends the run's ``deadline_s`` instead, so devices pick
        paths that finish before the cloud drops them; with no deadline either, nothing is
        sent and the devices' own default applies.
    **base
        :class:`EdgeCloudStrategy` arguments (per_round, seed, expected_devices,
        deadline_s, on_round, after_round).
    """

    def __init__(self, *, compute_budget_s: float | None = None, **base) -> None:
        super().__init__(**base)
        if compute_budget_s is not None and not compute_budget_s >= 0:
            raise ValueError(f"compute_budget_s={compute_budget_s} must be >= 0, or None to use deadline_s")
        self.compute_budget_s = compute_budget_s

    def allowance_s(self) -> float | None:
        """The compute allowance sent to devices: ``compute_budget_s``, else ``deadline_s``."""
        return self.compute_budget_s if self.compute_budget_s is not None else self.deadline_s

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every cohort device gets the (unchanged) supernet and the compute allowance."""
        allowance = self.allowance_s()
        extra = {} if allowance is None else {COMPUTE_BUDGET_KEY: float(allowance)}
        content = RecordDict({ARRAYS_RECORD: arrays, CONFIG_RECORD: self.round_config(server_round, **extra)})
        return self.messages_for(server_round, MessageType.TRAIN, lambda pid: content)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """No aggregation: keep the supernet; average the metrics and count the chosen paths (group ``paths``)."""
        replies = list(replies)
        metrics = self.mean_metrics(replies)
        if not metrics:
            return None, None
        labels = [r.content[PATH_RECORD][PATH_LABEL_KEY] for r in replies if PATH_RECORD in r.content.config_records]
        metrics["paths"] = dict(sorted(Counter(labels).items()))
        return None, metric_record(metrics)
