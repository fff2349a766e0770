"""Online test-time streams (CEMA setting): which domain and which samples batch i holds.

Each device holds an unlabeled stream of batches. Batch ``index`` of device k is in domain
``sequence_k[(index // batches_per_domain) % len(sequence_k)]``: a device sees
``batches_per_domain`` batches of one corruption, then the next, cycling. ``sequence_k`` is
``scenario.corruptions`` as given, or (``per_device_domains``) a seeded permutation of it
per device. A batch's samples are drawn from the device's own partition (so its label mix),
seeded by (seed, device, index): indices only here, pixels in ``FederatedData.stream_batch``.
Every batch is a pure function of (config, seed, device, index); nothing is replayed.
"""

from __future__ import annotations

import numpy as np

from experiments.data.arrays import CLEAN
from experiments.schema import ScenarioConfig

_TAG_ORDER, _TAG_BATCH = 41, 42  # stream tags for seeded generators


def device_domains(scenario: ScenarioConfig, seed: int, device: int) -> tuple[str, ...]:
    """The cycle of domains device ``device`` streams through.

    Returns
    -------
    tuple of str
        ``("clean",)`` when ``scenario.corruptions`` is empty; ``scenario.corruptions`` in
        its order when ``per_device_domains`` is False; otherwise a permutation of it drawn
        with ``np.random.default_rng([seed, 41, device])``.
    """
    if not scenario.corruptions:
        return (CLEAN,)
    order = tuple(scenario.corruptions)
    if not scenario.per_device_domains:
        return order
    perm = np.random.default_rng([seed, _TAG_ORDER, device]).permutation(len(order))
    return tuple(order[i] for i in perm)


def batch_domain(sequence: tuple[str, ...], index: int, batches_per_domain: int) -> str:
    """Domain of batch ``index``: ``sequence[(index // batches_per_domain) % len(sequence)]``.

    E.g. with ``("fog", "snow")`` and 10 batches per domain: batches 0-9 fog, 10-19 snow,
    20-29 fog again.
    """
    return sequence[(index // batches_per_domain) % len(sequence)]


def batch_rows(rows: np.ndarray, batch: int, seed: int, device: int, index: int) -> np.ndarray:
    """Pick the partition rows of one stream batch.

    Parameters
    ----------
    rows : np.ndarray
        The device's partition (pool rows); a uniform draw keeps its label mix in
        expectation.
    batch : int
        Samples per batch (``scenario.stream_batch``).
    seed, device, index : int
        Seed the draw: ``np.random.default_rng([seed, 42, device, index])``.

    Returns
    -------
    np.ndarray
        ``batch`` pool rows, distinct unless the partition holds fewer than ``batch``.
    """
    rng = np.random.default_rng([seed, _TAG_BATCH, device, index])
    return rng.choice(rows, size=batch, replace=batch > len(rows)).astype(np.int64)
