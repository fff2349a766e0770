"""ElasticDNN's cloud: ship the pre-trained master and bank once, tally accuracy per domain (seed 003).

ElasticDNN is on-device remodeling (III): the cloud's part is the offline master DNN
constructor (pre-training on the source domain, done by the apps before the run) and the
delivery of the master and its domain-knowledge bank. Afterwards each device adapts to its
own evolving domains and reports accuracy after adaptation on each domain's held-out batch.
"""

from __future__ import annotations

from typing import Any

from strategies.tta import OnlineTTA


class ElasticDNN(OnlineTTA):
    """Serve master + bank on a device's first participation; cumulative accuracy per domain.

    Same protocol as :class:`strategies.tta.OnlineTTA` (arrays once per device, counts from
    the replies' ``correct``/``num_examples`` and ``stream.domain``); the counts here are of
    predictions made AFTER the device adapted to the domain, so they are reported as
    ``adapted_accuracy`` and ``adapted_accuracy_by_domain``.
    """

    def online_metrics(self) -> dict[str, Any]:
        """``adapted_accuracy`` (all domains) and ``adapted_accuracy_by_domain``, cumulative over the run."""
        online = super().online_metrics()
        return {
            "adapted_accuracy": online["online_accuracy"],
            "adapted_accuracy_by_domain": online["online_accuracy_by_domain"],
        }
