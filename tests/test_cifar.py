"""CIFAR-10/100 loaders on small fixtures written in the python-pickle release layout."""

from __future__ import annotations

import functools
import pickle
import sys
import types

import numpy as np
import pytest

from experiments.config import scenario_named
from experiments.data import FederatedData
from experiments.data.cifar import load_cifar
from experiments.schema import DatasetConfig, PartitionConfig

#: ECLM 7.2's scenario (conf/scenario/one_step.yaml): clean edge data unless corruptions are
#: named, every device in the same order (the default scenario mixes corruptions per device)
OneStep = functools.partial(scenario_named, "one_step")

PARTITION = PartitionConfig(classes_per_device=2, size_min=4, size_max=8, test_size=3)


def _write(path, labels_key, labels, rng):
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    with open(path, "wb") as handle:  # bytes keys, as in the original python-2 pickles
        pickle.dump({b"batch_label": b"fixture", labels_key: list(labels), b"data": data}, handle)
    return data


def write_cifar10(root, rng=None):
    """5 train batches of 10 images (labels 0..9) and a test batch of 10: 60 images."""
    rng = rng or np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = [_write(folder / f"data_batch_{i}", b"labels", range(10), rng) for i in range(1, 6)]
    test = _write(folder / "test_batch", b"labels", range(10), rng)
    return np.concatenate(train), test


def write_cifar100(root, rng=None):
    """One train file of 48 images over 4 fine classes, one test file of 12."""
    rng = rng or np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    classes = [0, 17, 42, 99]
    train = _write(folder / "train", b"fine_labels", classes * 12, rng)
    test = _write(folder / "test", b"fine_labels", classes * 3, rng)
    return train, test


def test_cifar10_layout_is_read_pixel_exact(tmp_path):
    train, test = write_cifar10(tmp_path)
    source = load_cifar("cifar10", str(tmp_path))
    assert source.images.shape == (60, 32, 32, 3) and source.images.dtype == np.uint8
    assert source.labels.tolist() == list(range(10)) * 6
    assert source.fixed_test.tolist() == list(range(50, 60))
    # row layout: 1024 red, then green, then blue values, each row-major
    r, c = 3, 7
    def pixel(rows, i):
        return [rows[i, channel * 1024 + r * 32 + c] for channel in range(3)]

    assert source.images[12, r, c].tolist() == pixel(train, 12)
    assert source.images[55, r, c].tolist() == pixel(test, 5)
    assert source.num_classes == 10 and not source.expands


def test_cifar100_reads_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    source = load_cifar("cifar100", str(tmp_path))
    assert source.images.shape == (60, 32, 32, 3) and source.num_classes == 100
    assert sorted(set(source.labels.tolist())) == [0, 17, 42, 99]


def test_federated_cifar10_uses_images_as_they_are(tmp_path):
    write_cifar10(tmp_path)
    dataset = DatasetConfig(name="cifar10", root=str(tmp_path), partition=PARTITION)
    fleet = FederatedData(dataset, OneStep(), num_devices=3, seed=0)
    source = fleet.source
    assert fleet.split.test.tolist() == list(range(50, 60))  # the official test batch
    x, y = fleet.proxy()  # every proxy original once: round(0.3 * 5) = 2 per class
    assert len(y) == 20 and np.bincount(y).tolist() == [2] * 10
    assert np.array_equal(x, source.images[fleet.split.proxy])
    gx, gy = fleet.global_test()
    assert np.array_equal(gx, source.images[50:]) and gy.tolist() == list(range(10))
    for k in range(3):
        plan, tests = fleet.device_plan(k)
        data = fleet.device(k)
        originals = fleet.pool_originals[plan.rows]
        assert set(originals.tolist()) <= set(fleet.split.edge.tolist())
        assert np.array_equal(data.train_x, source.images[originals])
        assert np.array_equal(data.test_x, source.images[tests])
        assert set(tests.tolist()) <= set(range(50, 60))
        assert len(np.unique(data.train_y)) == 2 and 4 <= len(data.train_y) <= 8
    originals = fleet.sizes()["originals"]  # the tuning part: the edge originals in the tuning reserve
    assert originals["edge"] + originals["tune"] == 30 and originals["tune"] == len(fleet.split.tune)
    assert {k: originals[k] for k in ("total", "test", "proxy")} == {"total": 60, "test": 10, "proxy": 20}


def test_federated_cifar100_with_a_corruption(tmp_path):
    write_cifar100(tmp_path)
    dataset = DatasetConfig(name="cifar100", root=str(tmp_path), partition=PARTITION)
    fleet = FederatedData(dataset, OneStep(corruptions=("pixelate",)), 4, seed=0)
    assert fleet.num_classes == 100
    data = fleet.device(1)
    plan, _ = fleet.device_plan(1)
    assert data.domain == "pixelate"
    assert not np.array_equal(data.train_x, fleet.source.images[fleet.pool_originals[plan.rows]])
    assert set(data.train_y.tolist()) <= {0, 17, 42, 99}


def test_missing_files_are_a_clear_error(tmp_path):
    dataset = DatasetConfig(name="cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="set dataset.root .* or set dataset.download=true"):
        FederatedData(dataset, OneStep(), 3, seed=0)
    with pytest.raises(ValueError, match="needs dataset.root"):
        FederatedData(DatasetConfig(name="cifar100"), OneStep(), 3, seed=0)
    with pytest.raises(ValueError, match="cifar-100-python"):
        load_cifar("cifar100", str(tmp_path))


def test_download_goes_through_torchvision_only_when_asked(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_cifar10(tmp_path)

    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(CIFAR10=FakeCIFAR10)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    source = load_cifar("cifar10", str(tmp_path), download=True)
    assert calls == [(str(tmp_path), True, True)]
    assert len(source.labels) == 60


def test_test_part_must_cover_the_edge_classes(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write(folder / f"data_batch_{i}", b"labels", range(10), rng)
    _write(folder / "test_batch", b"labels", [0] * 10, rng)  # only class 0 in test
    dataset = DatasetConfig(name="cifar10", root=str(tmp_path), partition=PARTITION)
    with pytest.raises(ValueError, match=r"classes \[1, 2, .*no test original"):
        FederatedData(dataset, OneStep(), 3, seed=0)
