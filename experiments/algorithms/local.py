"""LA (ECLM 7.1): each device fine-tunes the cloud model on its own data; nothing goes back to the cloud."""

from __future__ import annotations

from clients.local import LocalOnlyClient
from experiments.algorithms.plugin import Algorithm
from strategies.local import LocalAdaptation

ALGORITHMS = (Algorithm("local", "LA: local fine-tuning only (ECLM 7.1)", LocalAdaptation, LocalOnlyClient),)
