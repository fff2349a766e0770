"""Device partitions cached on disk: same rows as flwr-datasets computes, never trusted when broken."""

import subprocess
import sys

import numpy as np
import pytest

from experiments.data import partition as part
from experiments.data import partition_cache as pc
from experiments.schema import PartitionConfig

LABELS = np.repeat(np.arange(5), 40)  # a pool of 200 rows, 5 classes
SKEW = PartitionConfig(kind="label_skew", classes_per_device=2)


def _no_partitioner(*args, **kwargs):
    raise AssertionError("flwr-datasets was asked although the split is cached")


def test_the_cached_rows_are_the_partitioners_and_a_second_call_reads_them(tmp_path, monkeypatch):
    computed = part.partition_pool(LABELS, SKEW, 8, seed=3)
    first = pc.partitions(LABELS, SKEW, 8, 3, str(tmp_path))
    assert len(first) == 8 and all(np.array_equal(a, b) for a, b in zip(first, computed))
    assert len(list((tmp_path / "partitions").glob("partitions-*.npz"))) == 1
    monkeypatch.setattr(part, "partition_pool", _no_partitioner)
    again = pc.partitions(LABELS, SKEW, 8, 3, str(tmp_path))
    assert all(np.array_equal(a, b) and a.dtype == np.int64 for a, b in zip(again, computed))


def test_every_input_of_the_split_is_in_the_key(tmp_path):
    base = pc.cache_path(LABELS, SKEW, 8, 3, str(tmp_path))
    others = [pc.cache_path(LABELS, SKEW, 8, 4, str(tmp_path)), pc.cache_path(LABELS, SKEW, 9, 3, str(tmp_path)),
              pc.cache_path(LABELS, PartitionConfig(kind="iid"), 8, 3, str(tmp_path)),
              pc.cache_path(LABELS[::-1], SKEW, 8, 3, str(tmp_path))]
    assert len({base, *others}) == 5 and base == pc.cache_path(LABELS.copy(), SKEW, 8, 3, str(tmp_path))


@pytest.mark.parametrize("damage", ["garbage", "rows_out_of_the_pool"])
def test_a_broken_file_is_split_again_and_rewritten(tmp_path, caplog, damage):
    path = pc.cache_path(LABELS, SKEW, 8, 3, str(tmp_path))
    path.parent.mkdir(parents=True)
    if damage == "garbage":
        path.write_bytes(b"not a zip")
    else:
        np.savez(path, rows=np.full(10, 10_000, dtype=np.int64), offsets=np.array([0] + [10] * 8, dtype=np.int64))
    rows = pc.partitions(LABELS, SKEW, 8, 3, str(tmp_path))
    assert all(np.array_equal(a, b) for a, b in zip(rows, part.partition_pool(LABELS, SKEW, 8, seed=3)))
    assert "unusable" in caplog.text
    with np.load(path) as saved:  # rewritten with the right rows
        assert saved["offsets"][-1] == sum(len(r) for r in rows)


def test_an_empty_cache_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = pc.partitions(LABELS, SKEW, 8, 3, "")
    assert len(rows) == 8 and not any(tmp_path.iterdir())


def test_a_run_with_cached_partitions_imports_neither_flwr_datasets_nor_datasets(tmp_path):
    code = ("import sys\n"
            "from experiments.config import from_dict\n"
            "from experiments.data import build_federated_data\n"
            f"cfg = from_dict({{'dataset': {{'cache_dir': {str(tmp_path)!r}}}, 'fleet': {{'devices': 20}}}})\n"
            "data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)\n"
            "print(len(data.partitions), 'flwr_datasets' in sys.modules, 'datasets' in sys.modules)\n")
    outputs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
               for _ in range(2)]
    assert outputs[0] == ["20", "True", "True"]  # the first run splits with flwr-datasets
    assert outputs[1] == ["20", "False", "False"]  # the second reads the file


def test_a_cache_that_cannot_be_written_leaves_no_partial_file_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pc.np, "savez", full_disk)
    rows = pc.partitions(LABELS, SKEW, 8, 3, str(tmp_path))
    assert len(rows) == 8 and "could not cache" in caplog.text
    assert list((tmp_path / "partitions").iterdir()) == []
