"""The federated data of one run: cloud proxy set, global test set, every device's stream.

Built once per process per (dataset, scenario, devices, seed) and lazy: originals are split
and the edge pool laid out at build time (indices only); partitions are computed on first
use; pixels are rendered only for what is asked, with an LRU of recent devices.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np

from experiments.data import online, partition_cache, stream
from experiments.data import partition as part
from experiments.data.arrays import CLEAN, DeviceData, StreamBatch
from experiments.data.checks import (
    check_classes,
    check_config,
    check_device,
    check_index,
    check_slot,
)
from experiments.data.imagenet_c import ImageNetCData
from experiments.data.rendering import load_source, render_in_domains, seed_rows, slot_domain
from experiments.schema import ConfigError, DatasetConfig, ScenarioConfig

DEVICE_CACHE_SIZE = 32  # device parts (train or test) kept rendered; both parts of a cohort of 10 (fleet.per_round) fit
BUILD_CACHE_SIZE = 4  # FederatedData objects kept per process
IMAGE_SHAPE = (3, 32, 32)  # CHW as the models see it (digits canvas and CIFAR: 32x32 RGB)
_TAG_PROXY, _TAG_GLOBAL_TEST, _TAG_DEVICE, _TAG_DEVICE_TEST = 31, 32, 33, 34  # seed tags
_TAG_STREAM = 36  # seed tag of online stream renders (35 is the corruption tag)
IMAGENET_C = "imagenet_c"  # dataset.name of ImageNet-C read from disk (experiments/data/imagenet_c.py)


class FederatedData:
    """Proxy, global test and per-device data of one run.

    Parameters
    ----------
    dataset : DatasetConfig
    scenario : ScenarioConfig
    num_devices : int
    seed : int

    Attributes
    ----------
    num_classes : int
    image_shape : tuple of int
        (3, 32, 32): CHW, as ``to_tensor`` delivers it.
    split : partition.OriginalSplit
        Originals of the test, proxy, edge and tuning parts (disjoint); devices hold edge
        originals only (the tuning part is streamed by ``experiments/data/tuning.py``).
    pool_originals, pool_labels : np.ndarray
        Edge original, and its label, behind every pool row.
    """

    image_shape = IMAGE_SHAPE

    def __init__(
        self, dataset: DatasetConfig, scenario: ScenarioConfig, num_devices: int, seed: int
    ):
        dataset = part.with_scenario_partition(dataset, scenario)
        check_config(dataset, scenario, num_devices, seed)
        self.dataset, self.scenario = dataset, scenario
        self.num_devices, self.seed = num_devices, seed
        self.source = load_source(dataset)
        self.num_classes = self.source.num_classes
        check_classes(dataset, self.num_classes)
        labels = self.source.labels
        self.split = part.split_originals(
            labels, dataset.test_fraction, dataset.proxy_fraction, seed, self.source.fixed_test
        )
        self.pool_originals = part.build_pool(
            self.split.edge, num_devices, dataset.partition.size_max, seed
        )
        self.pool_labels = labels[self.pool_originals]
        self._test_by_label = stream.rows_by_label(self.split.test, labels)
        self._check_test_covers_edge()
        self._devices: OrderedDict[tuple[str, int, int], tuple] = OrderedDict()
        self._parts: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}

    def _check_test_covers_edge(self) -> None:
        """Every class a device can hold needs test originals for its local test set."""
        missing = sorted(set(np.unique(self.pool_labels).tolist()) - set(self._test_by_label))
        if missing:
            raise ConfigError(
                f"classes {missing} of {self.dataset.name} have edge originals but no test "
                "original; raise dataset.test_fraction or use a larger dataset"
            )

    @functools.cached_property
    def partitions(self) -> list[np.ndarray]:
        """Pool rows of every device (flwr-datasets partitioner), computed once."""
        return partition_cache.partitions(
            self.pool_labels, self.dataset.partition, self.num_devices, self.seed, self.dataset.cache_dir
        )

    def proxy(self) -> tuple[np.ndarray, np.ndarray]:
        """Cloud proxy set, clean: ``proxy_samples`` renders of proxy originals (digits) or
        every proxy original as it is (CIFAR). Returns (uint8 NHWC images, int64 labels)."""
        count = self.dataset.proxy_samples
        return self._render_part(self.split.proxy, count, _TAG_PROXY, CLEAN)

    def global_test(self, slot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cloud test set: ``global_test_samples`` renders of test originals (digits) or the
        official test set (CIFAR); clean, or in ``slot``'s domain when a slot is given."""
        domain = CLEAN if slot is None else slot_domain(self.scenario, check_slot(slot))
        count = self.dataset.global_test_samples
        return self._render_part(self.split.test, count, _TAG_GLOBAL_TEST, domain)

    def _render_part(self, originals: np.ndarray, count: int, tag: int, domain: str):
        """Render once (then cache) ``count`` samples cycling over a seeded permutation of
        ``originals``; a source that does not expand gives every original once. Returns
        copies, so callers may modify them."""
        if (tag, domain) not in self._parts:
            if self.source.expands:
                perm = np.random.default_rng([self.seed, tag]).permutation(len(originals))
                originals = originals[perm[np.arange(count) % len(originals)]]
            seeds = seed_rows(self.seed, tag, np.arange(len(originals)))
            x = self._render(originals, seeds, [domain] * len(originals))
            self._parts[tag, domain] = (x, self.source.labels[originals])
        x, y = self._parts[tag, domain]
        return x.copy(), y.copy()

    def _render(self, originals: np.ndarray, seeds: np.ndarray, domains: list[str]):
        """Render with this run's augmentation and severity."""
        return render_in_domains(
            self.source, originals, seeds, self.dataset.augment, domains, self.scenario.severity
        )

    def device_plan(self, partition_id: int, slot: int = 0) -> tuple[stream.DevicePlan, np.ndarray]:
        """A device's bookkeeping at ``slot``: its training plan (pool rows, draw counters,
        draw slots) and its local test originals. Indices only, no pixels."""
        k, t = check_device(partition_id, slot, self.num_devices)
        config = self.dataset.partition
        groups = stream.rows_by_label(self.partitions[k], self.pool_labels)
        size = stream.device_size(self.seed, k, config.size_min, config.size_max)
        fraction = self.scenario.replace_fraction
        plan = stream.plan_at(groups, self.pool_labels, size, fraction, self.seed, k, t)
        train_labels = self.pool_labels[plan.rows]
        tests = stream.pick_test_originals(
            train_labels, self._test_by_label, config.test_size, self.seed, k
        )
        return plan, tests

    def device(self, partition_id: int, slot: int = 0) -> DeviceData:
        """Device ``partition_id``'s data at time ``slot``: a pure function of (config,
        seed, device, slot). Recent devices are kept in an LRU; callers get copies."""
        train_x, train_y = self.device_train(partition_id, slot)
        test_x, test_y, domain = self.device_test(partition_id, slot)
        return DeviceData(train_x, train_y, test_x, test_y, domain=domain)

    def device_train(self, partition_id: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The training part of :meth:`device` alone (uint8 NHWC images, int64 labels), copies."""
        x, y = self._cached(("train", *check_device(partition_id, slot, self.num_devices)), self._render_train)
        return x.copy(), y.copy()

    def device_test(self, partition_id: int, slot: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
        """The local test part of :meth:`device` alone (images, labels, the slot's domain), copies.

        A device asked only to evaluate renders this part, not its training set.
        """
        x, y, domain = self._cached(("test", *check_device(partition_id, slot, self.num_devices)), self._render_test)
        return x.copy(), y.copy(), domain

    def _cached(self, key: tuple[str, int, int], render):
        """``render(k, t)`` for ``key = (part, k, t)``, kept in an LRU of recent device parts."""
        if key in self._devices:
            self._devices.move_to_end(key)
        else:
            self._devices[key] = render(*key[1:])
            if len(self._devices) > DEVICE_CACHE_SIZE:
                self._devices.popitem(last=False)
        return self._devices[key]

    def slot_domain(self, partition_id: int, slot: int) -> str:
        """The domain of device ``partition_id``'s data drawn at ``slot``.

        The scenario's domain of the slot (``corruptions[slot % len]``, every device alike), or,
        with ``per_device_domains``, the device's own seeded order of the corruptions
        (:func:`~experiments.data.online.device_domains`), so the fleet holds a mix of domains
        in every slot.
        """
        if self.scenario.per_device_domains and self.scenario.corruptions:
            order = online.device_domains(self.scenario, self.seed, partition_id)
            return order[slot % len(order)]
        return slot_domain(self.scenario, slot)

    def _render_train(self, k: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Each training sample of device ``k``'s plan in the domain of the slot it was drawn in."""
        plan, _ = self.device_plan(k, t)
        originals = self.pool_originals[plan.rows]
        train_seeds = seed_rows(self.seed, _TAG_DEVICE, k, plan.draws)
        train_x = self._render(originals, train_seeds, [self.slot_domain(k, int(s)) for s in plan.slots])
        return train_x, self.source.labels[originals]

    def _render_test(self, k: int, t: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Device ``k``'s local test set in slot ``t``'s domain."""
        _, tests = self.device_plan(k, t)
        domain = self.slot_domain(k, t)
        test_seeds = seed_rows(self.seed, _TAG_DEVICE_TEST, k, np.arange(len(tests)))
        test_x = self._render(tests, test_seeds, [domain] * len(tests))
        return test_x, self.source.labels[tests], domain

    def preflight(self) -> None:
        """Render device 0 at slot 0 (the run's door calls this before Ray starts): the
        source loads and the fleet splits, or a ``ConfigError`` says why not."""
        self.device(0)

    def device_domains(self, partition_id: int) -> tuple[str, ...]:
        """The cycle of domains device ``partition_id``'s online stream goes through
        (``online.device_domains``): ``("clean",)`` without corruptions."""
        k, _ = check_device(partition_id, 0, self.num_devices)
        return online.device_domains(self.scenario, self.seed, k)

    def device_originals(self, partition_id: int) -> np.ndarray:
        """The distinct edge originals device ``partition_id``'s partition holds (sorted)."""
        k, _ = check_device(partition_id, 0, self.num_devices)
        return np.unique(self.pool_originals[self.partitions[k]])

    def stream_originals(self, partition_id: int, index: int) -> np.ndarray:
        """The originals behind batch ``index`` of device ``partition_id``'s stream (indices only).

        :func:`~experiments.data.online.batch_originals` on the device's originals, keyed
        (seed, 42, device): batches 2m and 2m+1 share none.
        """
        k, _ = check_device(partition_id, 0, self.num_devices)
        key = (self.seed, online.TAG_BATCH, k)
        return online.batch_originals(self.device_originals(k), self.scenario.stream_batch, key, check_index(index))

    def stream_batch(self, partition_id: int, index: int) -> StreamBatch:
        """Batch ``index`` of device ``partition_id``'s online test-time stream (CEMA, ElasticDNN).

        ``scenario.stream_batch`` originals of the device's own partition (edge originals,
        its label mix), drawn by :meth:`stream_originals` (batches 2m and 2m+1 share no
        original: the evolving scenario's adaptation and held-out batch),
        rendered from seeds (seed, 36, device, index, sample), corrupted at
        ``scenario.severity`` in domain ``sequence[(index // batches_per_domain) % len]``.
        A pure function of (config, seed, device, index): cheap, nothing cached or replayed.

        Raises
        ------
        ValueError
            A partition id outside [0, num_devices) or an index that is not an int >= 0.
        """
        k, _ = check_device(partition_id, 0, self.num_devices)
        i = check_index(index)
        scenario = self.scenario
        domain = online.batch_domain(
            online.device_domains(scenario, self.seed, k), i, scenario.batches_per_domain
        )
        originals = self.stream_originals(k, i)
        seeds = seed_rows(self.seed, _TAG_STREAM, k, i, np.arange(len(originals)))
        x = self._render(originals, seeds, [domain] * len(originals))
        return StreamBatch(x=x, y=self.source.labels[originals], domain=domain, index=i,
                           originals=originals, seeds=seeds)

    def sizes(self) -> dict:
        """A summary for the README: originals per part, pool and partition sizes."""
        rows = [len(p) for p in self.partitions]
        config, expands = self.dataset, self.source.expands
        return {
            "dataset": config.name,
            "num_classes": self.num_classes,
            "originals": {
                "total": len(self.source.labels),
                "test": len(self.split.test),
                "proxy": len(self.split.proxy),
                "edge": len(self.split.edge),
                "tune": len(self.split.tune),
            },
            "pool_rows": len(self.pool_originals),
            "devices": self.num_devices,
            "partition": config.partition.kind,
            "partition_rows": {"min": min(rows), "max": max(rows)},
            "device_size": [config.partition.size_min, config.partition.size_max],
            "device_test_size": config.partition.test_size,
            "proxy_samples": config.proxy_samples if expands else len(self.split.proxy),
            "global_test_samples": (
                config.global_test_samples if expands else len(self.split.test)
            ),
            "replace_fraction": self.scenario.replace_fraction,
            "domains": list(self.scenario.corruptions) or [CLEAN],
        }


@functools.lru_cache(maxsize=BUILD_CACHE_SIZE)
def build_federated_data(
    dataset: DatasetConfig, scenario: ScenarioConfig, num_devices: int, seed: int
) -> FederatedData | ImageNetCData:
    """Build (once per process per arguments) the federated data of a run.

    ``dataset.name=imagenet_c`` gives :class:`experiments.data.imagenet_c.ImageNetCData`
    (online streams read from disk; the ``online`` scenario only), every other dataset a
    :class:`FederatedData`.

    Parameters
    ----------
    dataset : DatasetConfig
    scenario : ScenarioConfig
    num_devices : int
        Number of partitions (fleet.devices).
    seed : int
        Run seed; every split, partition, draw and render derives from it.

    Returns
    -------
    FederatedData or ImageNetCData
        Lazy: nothing is rendered (or read) until asked.

    Raises
    ------
    ValueError
        A ``ConfigError`` naming the bad key and its fix (for ImageNet-C also a scenario
        other than ``online``, a missing root or a wrong folder layout).
    """
    if dataset.name == IMAGENET_C:
        return ImageNetCData(dataset, scenario, num_devices, seed)
    return FederatedData(dataset, scenario, num_devices, seed)
