"""A domain's adaptation batch and its held-out batch share no original image (evolving scenario)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from experiments.claims.elastic_measure import domain_batches
from experiments.data import FederatedData, to_tensor
from experiments.data.corruptions import CORRUPTIONS
from experiments.data.online import PAIR, TAG_BATCH, batch_originals
from experiments.schema import DatasetConfig, PartitionConfig, ScenarioConfig

#: conf/scenario/evolving.yaml at the ElasticDNN preset's scale: 4 devices, iid, 100 + 100 a domain.
EVOLVING = ScenarioConfig(name="evolving", replace_fraction=0.0, slot_rounds=1, corruptions=tuple(CORRUPTIONS),
                          severity=5, per_device_domains=True, stream_batch=100, batches_per_domain=2)
DIGITS = DatasetConfig(proxy_samples=200, global_test_samples=100, partition=PartitionConfig(kind="iid"))


def test_pair_by_hand():
    # 5 originals: np.array_split cuts the pair's shuffle into halves of 3 and 2
    originals = np.array([50, 10, 40, 20, 30, 30])  # a repeat counts once
    first = batch_originals(originals, 2, (0, TAG_BATCH, 7), 0)
    second = batch_originals(originals, 2, (0, TAG_BATCH, 7), 1)
    assert len(set(first.tolist())) == 2 and len(set(second.tolist())) == 2
    assert not set(first.tolist()) & set(second.tolist())
    whole_first = batch_originals(originals, 3, (0, TAG_BATCH, 7), 0)  # the whole 3-original half
    whole_second = batch_originals(originals, 2, (0, TAG_BATCH, 7), 1)
    assert sorted(whole_first.tolist() + whole_second.tolist()) == [10, 20, 30, 40, 50]
    assert np.array_equal(whole_first[:2], first)  # the first batch's draw is the half's first two
    # 7 samples from the 2-original half: each 7 // 2 = 3 times, 7 % 2 = 1 of them once more
    counts = np.unique(batch_originals(originals, 7, (0, TAG_BATCH, 7), 1), return_counts=True)
    assert sorted(counts[0].tolist()) == sorted(whole_second.tolist()) and sorted(counts[1].tolist()) == [3, 4]
    # 8 samples from the 3-original half: 8 // 3 = 2 each, 8 % 3 = 2 of them a third time
    counts = np.unique(batch_originals(originals, 8, (0, TAG_BATCH, 7), 0), return_counts=True)
    assert sorted(counts[1].tolist()) == [2, 3, 3]


def test_pairs_are_seeded_by_key_and_pair_index():
    originals = np.arange(100, 200)
    again = batch_originals(originals, 10, (3, TAG_BATCH, 1), 4)
    assert np.array_equal(again, batch_originals(originals, 10, (3, TAG_BATCH, 1), 4))
    assert not np.array_equal(again, batch_originals(originals, 10, (3, TAG_BATCH, 2), 4))  # other device
    assert not np.array_equal(again, batch_originals(originals, 10, (3, TAG_BATCH, 1), 2))  # other pair


def test_a_pair_needs_two_originals():
    with pytest.raises(ValueError, match="streams 1 distinct original.*fewer fleet.devices"):
        batch_originals(np.array([4, 4, 4]), 8, (0, TAG_BATCH, 0), 1)


def _shortest_disjoint_pair(data: FederatedData, devices, domains: int) -> int:
    """Every domain's adaptation (2p) and held-out (2p+1) batch of every device share no original;
    returns the fewest distinct originals any of those batches holds."""
    shortest = []
    for k in devices:
        for position in range(domains):
            adapt = data.stream_originals(k, PAIR * position)
            held = data.stream_originals(k, PAIR * position + 1)
            assert len(adapt) == len(held) == data.scenario.stream_batch
            assert not set(adapt.tolist()) & set(held.tolist()), (k, position)
            shortest.append(min(len(np.unique(adapt)), len(np.unique(held))))
    return min(shortest)


def test_every_domain_of_every_device_at_the_preset_scale():
    data = FederatedData(DIGITS, EVOLVING, num_devices=4, seed=0)
    held = min(len(data.device_originals(k)) for k in range(4))
    assert 190 <= held  # ~800 edge originals over 4 devices: both batches (nearly) 100 distinct originals
    assert _shortest_disjoint_pair(data, range(4), len(CORRUPTIONS)) == min(EVOLVING.stream_batch, held // 2)


def test_every_device_at_the_quick_start_scale_where_a_device_holds_fewer_than_two_batches():
    data = FederatedData(DIGITS, EVOLVING, num_devices=100, seed=0)
    held = min(len(data.device_originals(k)) for k in range(100))
    assert held < 2 * EVOLVING.stream_batch  # 150 rows a device: the halves repeat, still apart
    assert _shortest_disjoint_pair(data, range(100), 4) == held // 2


def test_the_rendered_batch_is_the_drawn_originals():
    data = FederatedData(DIGITS, EVOLVING, num_devices=4, seed=0)
    adapt, held = data.stream_batch(1, 6), data.stream_batch(1, 7)
    assert adapt.domain == held.domain == data.device_domains(1)[3]
    assert np.array_equal(adapt.originals, data.stream_originals(1, 6))
    assert np.array_equal(held.y, data.source.labels[data.stream_originals(1, 7)])
    assert not set(adapt.originals.tolist()) & set(held.originals.tolist())


def test_the_claims_domain_batches_are_the_stream_pairs():
    three = dataclasses.replace(EVOLVING, corruptions=("fog", "snow", "contrast"))
    data = FederatedData(DIGITS, three, num_devices=4, seed=0)
    batches = domain_batches(data, 2)
    assert [b.domain for b in batches] == list(data.device_domains(2))
    for position in (0, 2):
        adapt, held = data.stream_batch(2, 2 * position), data.stream_batch(2, 2 * position + 1)
        assert torch.equal(batches[position].x, to_tensor(adapt.x))
        assert torch.equal(batches[position].held_x, to_tensor(held.x))
        assert batches[position].held_y.tolist() == held.y.tolist()
