"""ElasticDNN's cloud: ship the pre-trained master and bank once, tally accuracy per domain (seed 003).

ElasticDNN is on-device remodeling (III): the cloud's part is the offline master DNN
constructor (pre-training on the source domain, done by the apps before the run) and the
delivery of the master and its domain-knowledge bank (and, for the same-size baselines, of
the compressed model the cloud pruned from the master and fine-tuned). Afterwards each device adapts to its
own evolving domains and reports accuracy after adaptation on each domain's held-out batch.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord

from strategies.tta import OnlineTTA

#: Array record key of the compressed same-size model (clients.elastic.COMPRESSED_KEY).
COMPRESSED_KEY = "compressed"


class ElasticDNN(OnlineTTA):
    """Serve master + bank on a device's first participation; cumulative accuracy per domain.

    Same protocol as :class:`strategies.tta.OnlineTTA` (arrays once per device, counts from
    the replies' ``correct``/``num_examples`` and ``stream.domain``); the counts here are of
    predictions made AFTER the device adapted to the domain, so they are reported as
    ``adapted_accuracy`` and ``adapted_accuracy_by_domain``.

    Parameters
    ----------
    compressed : ArrayRecord, optional
        The same-size baselines' compressed model (the master's largest filters, fine-tuned on
        the source data by the cloud); shipped beside the master on a device's first round.
    **base
        The arguments of :class:`strategies.base.EdgeCloudStrategy`.
    """

    def __init__(self, compressed: ArrayRecord | None = None, **base: Any) -> None:
        super().__init__(**base)
        self.compressed = compressed

    def first_arrays(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """Master and bank as ``arrays``, plus the compressed model when the cloud has one."""
        first = super().first_arrays(arrays)
        if self.compressed is not None:
            first[COMPRESSED_KEY] = self.compressed
        return first

    def online_metrics(self) -> dict[str, Any]:
        """``adapted_accuracy`` (all domains) and ``adapted_accuracy_by_domain``, cumulative over the run."""
        online = super().online_metrics()
        return {
            "adapted_accuracy": online["online_accuracy"],
            "adapted_accuracy_by_domain": online["online_accuracy_by_domain"],
        }
