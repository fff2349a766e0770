"""Split originals into test / proxy / edge / tuning parts, build the edge pool, partition it.

Originals are split FIRST (stratified by label, seeded), so no original image feeds two
parts. The edge originals that fall in a fixed reserve (:func:`tuning_reserve`) form the
tuning part, which no device of any run holds (hyper-parameter searches stream it instead,
``experiments/data/tuning.py``). The rest of the edge part is then repeated into a pool with
one row per sample the fleet may need; the pool's label column is partitioned over devices by
flwr-datasets partitioners (label skew: ``PathologicalPartitioner``; ``DirichletPartitioner``;
``IidPartitioner``).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from experiments.schema import ConfigError, DatasetConfig, PartitionConfig, ScenarioConfig

PARTITION_KINDS = ("label_skew", "dirichlet", "iid")
# Label skew: partition k's first class is k % num_classes, the others random, so every
# class is used once devices >= classes (the mode of Li et al. 2022, arXiv 2102.02079).
CLASS_ASSIGNMENT_MODE = "first-deterministic"
# Devices redraw n_k samples from their partition, so a Dirichlet partition only has to be
# non-empty (flwr-datasets' default of 10 fails for alpha 0.1 with >= 500 devices).
DIRICHLET_MIN_PARTITION_SIZE = 1
# Self-balancing as in the code of Yurochkin et al. 2019 (arXiv 1905.12022), which
# flwr-datasets' DirichletPartitioner implements; it also makes empty partitions rarer.
DIRICHLET_SELF_BALANCING = True
_SPLIT_FIXES = {
    "dirichlet": "raise dataset.partition.alpha or lower the number of devices",
    "label_skew": "lower dataset.partition.classes_per_device or the number of devices",
}
_TAG_SPLIT, _TAG_POOL, _TAG_PARTITION = 11, 12, 13  # stream tags for seeded generators
_TAG_TUNE_RESERVE = 14  # stream tag of the tuning reserve's draw
#: Share of every class's originals in the tuning reserve. A fifth: with the ElasticDNN preset's
#: 4 devices (iid) an evaluated device and a tuning device then hold ~200 digits originals each,
#: enough for a 100-sample adaptation batch and a disjoint 100-sample held-out batch (evolving).
TUNE_FRACTION = 0.2
#: Seed of the tuning reserve's draw: fixed, not the run's, so the reserve is the same for every
#: run seed and no run seed's edge devices hold what another seed's tuning searched on.
TUNE_SEED = 0


@dataclass(frozen=True)
class OriginalSplit:
    """Indices of the originals in each part; disjoint by construction.

    ``edge`` feeds the devices; ``tune`` (the edge originals in the tuning reserve) feeds only
    hyper-parameter searches and may be empty on tiny datasets.
    """

    test: np.ndarray
    proxy: np.ndarray
    edge: np.ndarray
    tune: np.ndarray


def split_originals(
    labels: np.ndarray,
    test_fraction: float,
    proxy_fraction: float,
    seed: int,
    fixed_test: np.ndarray | None = None,
    tune_fraction: float = TUNE_FRACTION,
) -> OriginalSplit:
    """Split originals, stratified by label: test first, then proxy and edge of the rest,
    then the edge originals in the tuning reserve out of the edge part into the tuning part.

    Parameters
    ----------
    labels : np.ndarray
        Label of every original.
    test_fraction : float
        Share of each class kept for testing (ignored when ``fixed_test`` is given).
    proxy_fraction : float
        Share of each class of the remaining originals given to the cloud proxy part
        (ECLM section 7.2: 30 %).
    seed : int
        Seed of the split.
    fixed_test : np.ndarray, optional
        Originals that ARE the test part (CIFAR's official test set).
    tune_fraction : float
        Share of every class in the tuning reserve (:func:`tuning_reserve`); 0 keeps every
        edge original on the devices.

    Returns
    -------
    OriginalSplit
        Sorted index arrays; test, proxy and edge non-empty.
    """
    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    if fixed_test is None:
        test, rest = stratified_take(everything, labels, test_fraction, [seed, _TAG_SPLIT, 0])
    else:
        test = np.sort(np.asarray(fixed_test, dtype=np.int64))
        rest = np.setdiff1d(everything, test)
    proxy, edge = stratified_take(rest, labels, proxy_fraction, [seed, _TAG_SPLIT, 1])
    reserve = tuning_reserve(labels, tune_fraction)
    tune, edge = np.intersect1d(edge, reserve), np.setdiff1d(edge, reserve)
    for part, name in ((test, "test"), (proxy, "proxy"), (edge, "edge")):
        if len(part) == 0:
            raise ConfigError(
                f"the {name} part has no originals ({len(labels)} originals in all): "
                "move dataset.test_fraction / dataset.proxy_fraction away from 0 and 1"
            )
    return OriginalSplit(test=test, proxy=proxy, edge=edge, tune=tune)


def tuning_reserve(labels: np.ndarray, fraction: float = TUNE_FRACTION) -> np.ndarray:
    """Originals set aside for hyper-parameter tuning: ``round(fraction * count)`` of each class.

    Drawn with :data:`TUNE_SEED`, whatever the run's seed, after which a run's edge originals in
    the reserve are its tuning part and the others its devices' part. So a search run at any
    seed streams only reserve originals, and no run at any seed puts one on a device.

    Returns
    -------
    np.ndarray
        Sorted int64 indices of the reserved originals.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"tune_fraction={fraction} must lie in [0, 1) (the devices need edge originals)")
    labels = np.asarray(labels)
    reserve, _ = stratified_take(np.arange(len(labels)), labels, fraction, [TUNE_SEED, _TAG_TUNE_RESERVE])
    return reserve


def stratified_take(
    candidates: np.ndarray, labels: np.ndarray, fraction: float, seed: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Take ``round(fraction * count)`` (half up) random candidates of every class.

    Returns
    -------
    tuple of np.ndarray
        (taken, left), both sorted.
    """
    rng = np.random.default_rng(seed)
    taken = []
    for label in np.unique(labels[candidates]):
        members = rng.permutation(candidates[labels[candidates] == label])
        taken.append(members[: int(np.floor(fraction * len(members) + 0.5))])
    taken = np.sort(np.concatenate(taken)).astype(np.int64)
    return taken, np.setdiff1d(candidates, taken).astype(np.int64)


def build_pool(edge: np.ndarray, num_devices: int, size_max: int, seed: int) -> np.ndarray:
    """Map each pool row to an edge original: row r -> edge[perm[r % len(edge)]].

    The pool has ``max(len(edge), num_devices * size_max)`` rows, enough for every device
    to hold ``size_max`` distinct rows; originals repeat evenly when the fleet needs more
    samples than there are originals (augmentation then makes the repeats differ).

    Returns
    -------
    np.ndarray
        int64 original index of every pool row.
    """
    size = max(len(edge), num_devices * size_max)
    perm = np.random.default_rng([seed, _TAG_POOL]).permutation(len(edge))
    return np.asarray(edge, dtype=np.int64)[perm[np.arange(size) % len(edge)]]


#: ``dataset.partition.kind`` that takes the scenario's own partition (``scenario.partition``).
AUTO_KIND = "auto"


def with_scenario_partition(dataset: DatasetConfig, scenario: ScenarioConfig) -> DatasetConfig:
    """``dataset`` with ``partition.kind=auto`` replaced by the scenario's own (label skew for ECLM's
    settings, iid streams for the online and evolving ones); any other kind is kept.

    Raises
    ------
    ConfigError
        When the kind is ``auto`` and the scenario names no partition.
    """
    if dataset.partition.kind != AUTO_KIND:
        return dataset
    if scenario.partition is None:
        raise ConfigError(f"dataset.partition.kind=auto takes the scenario's partition, and scenario "
                          f"{scenario.name!r} names none: set scenario.partition or dataset.partition.kind")
    partition = dataclasses.replace(dataset.partition, kind=scenario.partition)
    return dataclasses.replace(dataset, partition=partition)


def make_partitioner(partition: PartitionConfig, num_partitions: int, seed: int):
    """Build the flwr-datasets partitioner named by ``partition.kind``.

    Returns
    -------
    flwr_datasets.partitioner.Partitioner
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    part_seed = int(np.random.default_rng([seed, _TAG_PARTITION]).integers(2**31))
    if partition.kind == "label_skew":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=partition.classes_per_device,
            class_assignment_mode=CLASS_ASSIGNMENT_MODE,
            seed=part_seed,
        )
    if partition.kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(partition.alpha),
            min_partition_size=DIRICHLET_MIN_PARTITION_SIZE,
            self_balancing=DIRICHLET_SELF_BALANCING,
            seed=part_seed,
        )
    if partition.kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    raise ConfigError(
        f"dataset.partition.kind={partition.kind!r} is unknown; use one of {PARTITION_KINDS}"
    )


def partition_pool(
    pool_labels: np.ndarray, partition: PartitionConfig, num_partitions: int, seed: int
) -> list[np.ndarray]:
    """Split the pool's rows over devices with a flwr-datasets partitioner.

    The label column is wrapped in a ``datasets.Dataset`` (int columns ``label`` and
    ``row`` only, no images), so this stays cheap for 1000 devices.

    Returns
    -------
    list of np.ndarray
        Pool rows of every partition, sorted.
    """
    from datasets import Dataset

    columns = {"label": np.asarray(pool_labels), "row": np.arange(len(pool_labels))}
    # Arrow format: `pool["label"]` is then one Arrow array; unformatted, datasets>=4 hands
    # the partitioners a Column that numpy reads row by row (~6 us a row, ~1 s at 150k rows).
    pool = Dataset.from_dict(columns).with_format("arrow")
    partitioner = make_partitioner(partition, num_partitions, seed)
    partitioner.dataset = pool
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # retries are reported below
            return partition_rows(partitioner, num_partitions)
    except ValueError as error:
        fix = _SPLIT_FIXES.get(partition.kind, "lower the number of devices")
        raise ConfigError(
            f"flwr-datasets could not split {len(pool_labels)} edge samples over "
            f"{num_partitions} devices with {partition}: {error} ({fix})"
        ) from error


def partition_rows(partitioner, num_partitions: int) -> list[np.ndarray]:
    """Read every partition's rows at once.

    The fast path reads the index lists the partitioner computed for all partitions in
    its first call (``_partition_id_to_indices``, present in flwr-datasets 0.2-0.6 for
    the index-based partitioners); ``load_partition`` + ``Dataset.select`` costs ~3 ms per
    partition, too slow for 1000 devices. Any other partitioner (e.g. ``IidPartitioner``,
    which shards contiguously) goes through the public ``load_partition``.
    ``tests/test_partition.py`` pins that both paths agree.
    """
    partitioner.num_partitions  # noqa: B018 - triggers the one-off index computation
    indices = getattr(partitioner, "_partition_id_to_indices", None)
    if indices and len(indices) == num_partitions:
        return [np.sort(np.asarray(indices[k], dtype=np.int64)) for k in range(num_partitions)]
    return [
        np.sort(np.asarray(partitioner.load_partition(k)["row"], dtype=np.int64))
        for k in range(num_partitions)
    ]
