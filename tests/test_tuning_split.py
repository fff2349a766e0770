"""The tuning split shares no device, stream or original with the evaluated runs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from experiments.claims import elastic_tune
from experiments.data import FederatedData, to_tensor
from experiments.data.corruptions import CORRUPTIONS
from experiments.data.online import device_domains
from experiments.data.partition import TUNE_FRACTION, tuning_reserve
from experiments.data.tuning import TAG_TUNE_ORDER, TuningStreams
from experiments.schema import ConfigError, DatasetConfig, PartitionConfig, ScenarioConfig

#: conf/scenario/evolving.yaml as the ElasticDNN preset runs it (4 devices, iid, 100 + 100 a domain).
EVOLVING = ScenarioConfig(name="evolving", replace_fraction=0.0, slot_rounds=1, corruptions=tuple(CORRUPTIONS),
                          severity=5, per_device_domains=True, stream_batch=100, batches_per_domain=2)
DIGITS = DatasetConfig(proxy_samples=200, global_test_samples=100, partition=PartitionConfig(kind="iid"))
EVALUATED_DEVICES = 4
DOMAINS = len(CORRUPTIONS)


@pytest.fixture(scope="module")
def evaluation():
    return FederatedData(DIGITS, EVOLVING, num_devices=EVALUATED_DEVICES, seed=0)


@pytest.fixture(scope="module")
def tuning(evaluation):
    """What the search runs on: elastic_tune's own streams and sequences (two tuning devices)."""
    return elastic_tune.tuning_sequences(evaluation, devices=2)


def _originals(data, devices) -> set[int]:
    """The originals of every batch of every device's evolving sequence (adaptation and held-out)."""
    return {o for k in devices for i in range(2 * DOMAINS) for o in data.stream_originals(k, i).tolist()}


def _rendered(data, devices, batches: int = 2):
    """The first domain's batches of every device, rendered (seed rows and pixels)."""
    return [data.stream_batch(k, i) for k in devices for i in range(batches)]


def _image_digests(batches) -> set[bytes]:
    return {hashlib.sha1(image.tobytes()).digest() for batch in batches for image in batch.x}


def test_the_search_streams_only_tuning_originals_that_no_evaluated_device_holds(evaluation, tuning):
    streams, _ = tuning
    used = _originals(streams, range(2))
    assert used <= set(evaluation.split.tune.tolist())
    assert len(used) == len(evaluation.split.tune)  # every tuning original reaches the search
    assert not used & _originals(evaluation, range(EVALUATED_DEVICES))
    for fleet, seed in ((EVALUATED_DEVICES, 0), (100, 0), (EVALUATED_DEVICES, 1), (EVALUATED_DEVICES, 2)):
        # any fleet size and any run seed: its devices hold none of the originals searched at seed 0
        data = FederatedData(DIGITS, EVOLVING, num_devices=fleet, seed=seed)
        held = set(np.concatenate([data.device_originals(k) for k in range(fleet)]).tolist())
        assert not used & held, (fleet, seed)


def test_the_search_shares_no_device_or_stream_with_the_evaluated_runs(evaluation, tuning):
    streams, _ = tuning
    tuned, evaluated = _rendered(streams, range(2)), _rendered(evaluation, range(EVALUATED_DEVICES))
    # a seed row is (seed, stream tag, device, batch, sample): its (tag, device) names the device's stream
    device_keys = {tuple(row[1:3]) for batch in tuned for row in batch.seeds.tolist()}
    assert not device_keys & {tuple(row[1:3]) for batch in evaluated for row in batch.seeds.tolist()}
    assert not _image_digests(tuned) & _image_digests(evaluated)  # not one rendered image in common
    assert [streams.device_name(t) for t in range(2)] == ["tune-0", "tune-1"]
    assert streams.device_domains(1) == device_domains(EVOLVING, 0, 1, tag=TAG_TUNE_ORDER)


def test_the_searched_sequences_are_the_tuning_streams_pairs(tuning):
    streams, sequences = tuning
    assert len(sequences) == 2 and all(len(batches) == DOMAINS for batches in sequences)
    for t in range(2):
        assert [b.domain for b in sequences[t]] == list(streams.device_domains(t))
        for position in (0, DOMAINS - 1):
            adapt, held = streams.stream_batch(t, 2 * position), streams.stream_batch(t, 2 * position + 1)
            assert torch.equal(sequences[t][position].x, to_tensor(adapt.x))
            assert torch.equal(sequences[t][position].held_x, to_tensor(held.x))
            assert not set(adapt.originals.tolist()) & set(held.originals.tolist())


def test_the_tuning_part_is_the_edge_share_of_the_reserve(evaluation):
    split, labels = evaluation.split, evaluation.source.labels
    reserve = tuning_reserve(labels)
    # round(0.2 * count) of every class (digits: 174-183 originals a class)
    assert np.bincount(labels[reserve], minlength=10).tolist() == [
        int(np.floor(TUNE_FRACTION * c + 0.5)) for c in np.bincount(labels, minlength=10)]
    assert set(split.tune.tolist()) <= set(reserve.tolist()) and not set(split.edge.tolist()) & set(reserve.tolist())
    # a tuning device holds as many originals as an evaluated device (~200: 100 + 100 distinct a domain)
    assert len(split.tune) >= 2 * EVOLVING.stream_batch


def test_the_split_is_described_for_the_search_output(evaluation, tuning):
    streams, _ = tuning
    text = streams.describe()
    assert "tune-0, tune-1" in text and f"{len(evaluation.split.tune)} tuning originals" in text
    assert f"evaluated devices 0..{EVALUATED_DEVICES - 1} hold none" in text


def test_bad_tuning_requests(evaluation):
    with pytest.raises(ConfigError, match="tuning devices=0 must be an integer >= 1"):
        TuningStreams(evaluation, 0)
    with pytest.raises(ConfigError, match="needs a dataset of originals"):
        TuningStreams(object())
    streams = TuningStreams(evaluation, 1)
    with pytest.raises(ValueError, match=r"tuning device=1 is out of range \[0, 1\)"):
        streams.stream_batch(1, 0)
    with pytest.raises(ValueError, match="index=-1 must be an integer >= 0"):
        streams.stream_batch(0, -1)
