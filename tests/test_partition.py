"""Splitting originals, the edge pool and flwr-datasets partitioning of it."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from experiments.data import partition as part
from experiments.data.stream import allocate
from experiments.schema import PartitionConfig

LABELS = np.array([0] * 10 + [1] * 5)


def test_split_by_hand():
    # test: round(0.2 * 10) = 2 of class 0, round(0.2 * 5) = 1 of class 1;
    # proxy: half of the rest, round(0.5 * 8) = 4 and round(0.5 * 4) = 2
    split = part.split_originals(LABELS, test_fraction=0.2, proxy_fraction=0.5, seed=0, tune_fraction=0.0)
    assert np.bincount(LABELS[split.test], minlength=2).tolist() == [2, 1]
    assert np.bincount(LABELS[split.proxy], minlength=2).tolist() == [4, 2]
    assert np.bincount(LABELS[split.edge], minlength=2).tolist() == [4, 2]
    assert len(split.tune) == 0  # no reserve: every edge original stays on the devices


def test_tuning_reserve_by_hand_is_the_same_for_every_run_seed():
    # round(0.4 * 10) = 4 of class 0, round(0.4 * 5) = 2 of class 1, drawn with TUNE_SEED
    reserve = part.tuning_reserve(LABELS, 0.4)
    assert np.bincount(LABELS[reserve], minlength=2).tolist() == [4, 2]
    for seed in (0, 1, 7):
        split = part.split_originals(LABELS, 0.2, 0.5, seed=seed, tune_fraction=0.4)
        whole = part.split_originals(LABELS, 0.2, 0.5, seed=seed, tune_fraction=0.0)
        assert np.array_equal(split.test, whole.test) and np.array_equal(split.proxy, whole.proxy)
        assert split.tune.tolist() == sorted(set(whole.edge.tolist()) & set(reserve.tolist()))
        assert split.edge.tolist() == sorted(set(whole.edge.tolist()) - set(reserve.tolist()))
    with pytest.raises(ValueError, match=r"tune_fraction=1.0 must lie in \[0, 1\)"):
        part.tuning_reserve(LABELS, 1.0)


def test_split_is_disjoint_complete_and_seeded():
    labels = np.random.default_rng(1).integers(0, 10, 1000)
    split = part.split_originals(labels, 0.2, 0.3, seed=3)
    parts = [set(p.tolist()) for p in (split.test, split.proxy, split.edge, split.tune)]
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert set.union(*parts) == set(range(1000))
    for c in range(10):  # stratified: each class loses round(20 %) to test
        count = (labels == c).sum()
        assert (labels[split.test] == c).sum() == int(np.floor(0.2 * count + 0.5))
    again = part.split_originals(labels, 0.2, 0.3, seed=3)
    other = part.split_originals(labels, 0.2, 0.3, seed=4)
    assert np.array_equal(split.test, again.test) and np.array_equal(split.edge, again.edge)
    assert not np.array_equal(split.test, other.test)


def test_split_with_fixed_test_part():
    split = part.split_originals(LABELS, 0.9, 0.5, seed=0, fixed_test=np.array([14, 0]))
    assert split.test.tolist() == [0, 14]  # test_fraction does not apply
    assert not set(split.test) & (set(split.proxy) | set(split.edge) | set(split.tune))
    assert len(split.proxy) + len(split.edge) + len(split.tune) == 13


def test_split_rejects_an_empty_part():
    with pytest.raises(ValueError, match="proxy part has no originals"):
        part.split_originals(np.array([0, 0, 1, 1]), 0.5, 0.2, seed=0)


def test_stratified_take_rounds_half_up():
    taken, left = part.stratified_take(np.arange(3), np.zeros(3, int), 0.5, [0])
    assert len(taken) == 2 and len(left) == 1


def test_pool_repeats_edge_originals_evenly():
    edge = np.array([10, 20, 30, 40])
    pool = part.build_pool(edge, num_devices=2, size_max=5, seed=0)  # max(4, 2 * 5) = 10 rows
    assert len(pool) == 10
    assert sorted(pool[:4].tolist()) == [10, 20, 30, 40]  # first pass: a permutation
    assert np.array_equal(pool[4:8], pool[:4]) and np.array_equal(pool[8:], pool[:2])
    assert len(part.build_pool(edge, num_devices=1, size_max=2, seed=0)) == 4


def test_allocate_by_hand():
    assert allocate(10, np.array([1, 1, 2])).tolist() == [3, 3, 4]
    assert allocate(7, np.array([1, 1])).tolist() == [4, 3]  # leftover to the lower index
    assert allocate(2, np.array([1, 1, 1])).tolist() == [1, 1, 0]  # too few for the minimum
    assert allocate(100, np.array([5, 95]), minimum=0).tolist() == [5, 95]


@pytest.mark.parametrize("kind", ["label_skew", "dirichlet", "iid"])
def test_fast_partition_read_matches_public_api(kind):
    """The fast read of the partitioner's index lists equals load_partition's rows."""
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    pool = Dataset.from_dict({"label": labels, "row": np.arange(3000)}).with_format("arrow")
    partitioner = part.make_partitioner(PartitionConfig(kind=kind), 20, seed=0)
    partitioner.dataset = pool
    fast = part.partition_rows(partitioner, 20)
    slow = [np.sort(np.asarray(partitioner.load_partition(k)["row"])) for k in range(20)]
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow))


def _partition(kind, devices=100, seed=0, **kwargs):
    labels = np.random.default_rng(7).integers(0, 10, devices * 150)
    rows = part.partition_pool(labels, PartitionConfig(kind=kind, **kwargs), devices, seed)
    return labels, rows


def test_label_skew_gives_every_device_exactly_m_classes():
    for m in (1, 2, 5):
        labels, rows = _partition("label_skew", classes_per_device=m)
        assert all(len(np.unique(labels[r])) == m for r in rows)
        assert len(np.unique(np.concatenate(rows))) == sum(len(r) for r in rows)  # disjoint
        # first-deterministic: device k holds class k % 10
        assert all(k % 10 in labels[r] for k, r in enumerate(rows))


def test_iid_is_balanced():
    labels, rows = _partition("iid")
    assert {len(r) for r in rows} == {150}
    shares = np.array([np.bincount(labels[r], minlength=10) / len(r) for r in rows])
    assert np.abs(shares.mean(axis=0) - 0.1).max() < 0.01
    assert all(len(np.unique(labels[r])) >= 8 for r in rows)


def test_dirichlet_smaller_alpha_is_more_skewed():
    def classes_over_5_percent(alpha):
        labels, rows = _partition("dirichlet", alpha=alpha)
        shares = [np.bincount(labels[r], minlength=10) / len(r) for r in rows]
        return np.mean([(s > 0.05).sum() for s in shares])

    skewed, even = classes_over_5_percent(0.1), classes_over_5_percent(100.0)
    assert skewed < 4 and even > 9.5


def test_partitions_are_seeded():
    _, a = _partition("dirichlet", seed=1)
    _, b = _partition("dirichlet", seed=1)
    _, c = _partition("dirichlet", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_impossible_dirichlet_split_is_a_clear_error():
    labels = np.random.default_rng(0).integers(0, 10, 100)
    with pytest.raises(ValueError, match="raise dataset.partition.alpha"):
        part.partition_pool(labels, PartitionConfig(kind="dirichlet", alpha=0.01), 90, seed=0)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="partition.kind='shards' is unknown"):
        part.make_partitioner(PartitionConfig(kind="shards"), 10, seed=0)


def test_impossible_label_skew_is_a_clear_error():
    labels = np.array([0] * 50 + [1])  # class 1 has one row but two devices need it
    with pytest.raises(ValueError, match="lower dataset.partition.classes_per_device"):
        part.partition_pool(labels, PartitionConfig(kind="label_skew", classes_per_device=1), 4, seed=0)
