"""Online test-time streams (CEMA setting): which domain and which samples batch i holds.

Each device holds an unlabeled stream of batches. Batch ``index`` of device k is in domain
``sequence_k[(index // batches_per_domain) % len(sequence_k)]``: a device sees
``batches_per_domain`` batches of one corruption, then the next, cycling. ``sequence_k`` is
``scenario.corruptions`` as given, or (``per_device_domains``) a seeded permutation of it
per device. A batch's samples are originals of the device's own partition (so its label mix),
seeded by (seed, device, index): indices only here, pixels in ``FederatedData.stream_batch``.
Batches come in pairs, 2m and 2m+1, drawn from the two halves of one seeded shuffle of the
device's originals, so the two share no original image: in the ``evolving`` scenario (two
batches a domain) they are a domain's adaptation batch and its held-out batch.
Every batch is a pure function of (config, seed, device, index); nothing is replayed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from experiments.data.arrays import CLEAN
from experiments.schema import ScenarioConfig

TAG_ORDER, TAG_BATCH = 41, 42  # stream tags for seeded generators of the fleet's devices
#: Consecutive batches 2m, 2m+1 draw from disjoint halves of the device's originals (the
#: ``evolving`` scenario's adaptation and held-out batch of one domain, clients/elastic.py).
PAIR = 2


def device_domains(scenario: ScenarioConfig, seed: int, device: int, tag: int = TAG_ORDER) -> tuple[str, ...]:
    """The cycle of domains device ``device`` streams through.

    Returns
    -------
    tuple of str
        ``("clean",)`` when ``scenario.corruptions`` is empty; ``scenario.corruptions`` in
        its order when ``per_device_domains`` is False; otherwise a permutation of it drawn
        with ``np.random.default_rng([seed, tag, device])`` (``tag`` 41 for the fleet's
        devices; the tuning devices have a tag of their own).
    """
    if not scenario.corruptions:
        return (CLEAN,)
    order = tuple(scenario.corruptions)
    if not scenario.per_device_domains:
        return order
    perm = np.random.default_rng([seed, tag, device]).permutation(len(order))
    return tuple(order[i] for i in perm)


def batch_domain(sequence: tuple[str, ...], index: int, batches_per_domain: int) -> str:
    """Domain of batch ``index``: ``sequence[(index // batches_per_domain) % len(sequence)]``.

    E.g. with ``("fog", "snow")`` and 10 batches per domain: batches 0-9 fog, 10-19 snow,
    20-29 fog again.
    """
    return sequence[(index // batches_per_domain) % len(sequence)]


def batch_originals(originals: np.ndarray, batch: int, key: Sequence[int], index: int) -> np.ndarray:
    """Pick the originals of stream batch ``index`` (pairs of batches share none).

    Pair ``m = index // 2`` shuffles the distinct ``originals`` with
    ``np.random.default_rng([*key, m])`` and cuts the shuffle in two halves
    (``np.array_split``: the first half takes an odd one out); batch ``index`` draws from half
    ``index % 2`` only. It takes the half's first ``batch`` originals (a draw without
    replacement), or, when the half holds fewer (h < batch), every original of the half
    ``batch // h`` times plus ``batch % h`` of them once more, in shuffled order (the renders
    still differ: each sample has its own seed).

    Parameters
    ----------
    originals : np.ndarray
        The device's originals (its partition's, distinct); at least 2 so both halves hold one.
    batch : int
        Samples per batch (``scenario.stream_batch``).
    key : sequence of int
        Seed parts of the device's stream, e.g. ``(seed, 42, device)``.
    index : int
        Position of the batch in the stream.

    Returns
    -------
    np.ndarray
        ``batch`` int64 original indices; batches ``2m`` and ``2m + 1`` share none.

    Raises
    ------
    ValueError
        Fewer than 2 distinct originals (a pair cannot be disjoint).
    """
    originals = np.unique(np.asarray(originals, dtype=np.int64))
    if len(originals) < PAIR:
        raise ValueError(f"a device streams {len(originals)} distinct original(s); its batch pairs need >= {PAIR} "
                         "(give each device more data: fewer fleet.devices or a larger dataset)")
    pair, half = divmod(index, PAIR)
    rng = np.random.default_rng([*key, pair])
    own = np.array_split(rng.permutation(originals), PAIR)[half]
    if batch <= len(own):
        return own[:batch]
    repeats, extra = divmod(batch, len(own))
    picks = np.concatenate([np.tile(own, repeats), rng.choice(own, size=extra, replace=False)])
    return rng.permutation(picks)
