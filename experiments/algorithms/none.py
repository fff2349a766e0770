"""NA (ECLM 7.1): the pre-trained cloud model as it is, measured on the devices' data."""

from __future__ import annotations

from clients.base import ClientHandler
from experiments.algorithms.plugin import Algorithm
from strategies.none import NoAdaptation

ALGORITHMS = (
    Algorithm("none", "NA: the pre-trained cloud model (ECLM 7.1)", NoAdaptation, ClientHandler,
              caveat="the same model before and after; the round weights its devices' accuracy by test-set size, "
                     "the pre-trained score by training-set size, so the two means can differ by a fraction of a point"),
)
