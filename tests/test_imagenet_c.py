"""ImageNet-C from disk (experiments/data/imagenet_c.py), its config and the torchvision ResNets.

A tiny fake ImageNet-C tree is written in a temporary folder: 2 corruptions at severity 5,
each with the 1000 wnid folders a real release has (labels are indices among all of them),
3 of which hold 4 small PNG files whose colour encodes (wnid, file, corruption).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.algorithms.cema import foundation_config
from experiments.config import from_dict, scenario_named
from experiments.data import build_federated_data, to_tensor
from experiments.data.imagenet_c import (
    LAYOUT,
    ImageNetCData,
    batch_positions,
    device_share,
    domain_batch,
    index_folder,
)
from experiments.pretrain.cache import pretrained_model
from experiments.schema import ConfigError, DatasetConfig, ScenarioConfig
from models.catalog import build_model
from models.tv_resnet import IMAGENET_MEAN, IMAGENET_STD, load_checkpoint

#: ECLM 7.2's scenario (conf/scenario/one_step.yaml): clean edge data unless corruptions are
#: named, every device in the same order (the default scenario mixes corruptions per device)
OneStep = functools.partial(scenario_named, "one_step")

CORRUPTIONS = ("gaussian_noise", "fog")
SEVERITY = 5
FILLED = (0, 421, 999)  # sorted positions of the wnids that hold images: their labels
FILES_PER_WNID = 4
SMALL = {"resize": 40, "crop": 32}  # a shrunk test transform keeps most tests fast


def _wnids() -> list[str]:
    """1000 distinct wnid-like names (n + 8 digits), sorted; not 0..999, so labels are positions."""
    numbers = np.random.default_rng(7).choice(10**8, size=1000, replace=False)
    return sorted(f"n{n:08d}" for n in numbers)


def _colour(wnid_slot: int, file: int, corruption: int) -> tuple[int, int, int]:
    return 80 * wnid_slot, 50 * file, 100 * corruption


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet-c")
    wnids = _wnids()
    for c, corruption in enumerate(CORRUPTIONS):
        folder = root / corruption / str(SEVERITY)
        for wnid in reversed(wnids):  # creation order must not matter
            (folder / wnid).mkdir(parents=True)
        for slot, position in enumerate(FILLED):
            for f in range(FILES_PER_WNID):
                image = Image.new("RGB", (20, 16), _colour(slot, f, c))
                image.save(folder / wnids[position] / f"ILSVRC2012_val_{slot}{f}.PNG")
            (folder / wnids[position] / "notes.txt").write_text("not an image")
    return root


def _dataset(root, **kw) -> DatasetConfig:
    return DatasetConfig(name="imagenet_c", root=str(root), **kw)


def _scenario(**kw) -> ScenarioConfig:
    values = {"corruptions": CORRUPTIONS, "severity": SEVERITY, "stream_batch": 2, "batches_per_domain": 2,
              "per_device_domains": False, **kw}
    return scenario_named(values.pop("name", "online"), **values)


def _data(root, devices=3, seed=0, **scenario) -> ImageNetCData:
    return ImageNetCData(_dataset(root), _scenario(**scenario), devices, seed, **SMALL)


# ------------------------------------------------------------------ layout and labels
def test_labels_are_wnid_positions_in_sorted_order_like_imagefolder(tree):
    from torchvision.datasets.folder import find_classes

    folder = str(tree / "fog" / str(SEVERITY))
    index = index_folder(folder)
    assert len(index.wnids) == 1000 and list(index.wnids) == sorted(index.wnids)
    assert len(index.files) == 12  # notes.txt is not an image
    assert index.labels.tolist() == [0] * 4 + [421] * 4 + [999] * 4
    _, class_to_idx = find_classes(folder)  # torchvision ImageFolder's own mapping
    assert [class_to_idx[f.split("/")[0]] for f in index.files] == index.labels.tolist()


def test_a_batch_holds_the_pixels_and_labels_of_its_files(tree):
    data = _data(tree, devices=1, stream_batch=12, batches_per_domain=1)
    label_of_slot = dict(enumerate(FILLED))
    for index, c in ((0, 0), (1, 1)):  # batch 0: gaussian_noise, batch 1: fog
        batch = data.stream_batch(0, index)
        assert batch.x.shape == (12, 32, 32, 3) and batch.x.dtype == np.uint8
        assert batch.domain == CORRUPTIONS[c] and batch.index == index
        assert (batch.x[:, :, :, 2] == 100 * c).all()  # blue = the corruption
        assert [label_of_slot[r // 80] for r in batch.x[:, 0, 0, 0]] == batch.y.tolist()
        assert sorted(zip(batch.y.tolist(), batch.x[:, 0, 0, 1].tolist())) == [
            (label, 50 * f) for label in FILLED for f in range(FILES_PER_WNID)
        ]  # one pass over the folder: every file exactly once


def test_batches_are_deterministic_and_seeded(tree):
    a = _data(tree, seed=3).stream_batch(1, 2)
    b = _data(tree, seed=3).stream_batch(1, 2)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) and a.domain == b.domain == "fog"
    orders = {tuple(_data(tree, seed=s).stream_files(0, 0)[0]) for s in range(4)}
    assert len(orders) > 1  # the seed changes which files a device streams


def test_device_shares_are_disjoint_and_cover_the_folder(tree):
    data = _data(tree, devices=3)
    for domain_first_batch in (0, 2):  # gaussian_noise: batches 0-1; fog: batches 2-3
        seen = []
        for device in range(3):
            files = [p for i in (domain_first_batch, domain_first_batch + 1) for p in data.stream_files(device, i)[0]]
            assert len(set(files)) == 4  # two batches of 2 walk through the device's share of 12 / 3
            seen.append(set(files))
        assert set.union(*seen) == {os.path.join(data.folder(CORRUPTIONS[domain_first_batch // 2]).folder, f)
                                    for f in data.folder(CORRUPTIONS[domain_first_batch // 2]).files}
        assert sum(len(s) for s in seen) == 12  # disjoint
    # batch 4 is gaussian_noise again (cycle 2): the device starts its share over
    assert data.stream_files(1, 4)[0] == data.stream_files(1, 0)[0]


def test_share_and_position_arithmetic_by_hand():
    assert domain_batch(35, 10, 3) == 15  # 2nd cycle (10 earlier batches of the domain) + 5
    assert [domain_batch(i, 2, 2) for i in range(8)] == [0, 1, 0, 1, 2, 3, 2, 3]
    assert batch_positions(np.array([7, 3, 5]), 2, 1).tolist() == [5, 7]  # positions 2, 3 mod 3
    shares = [device_share(10, 3, k, 0, "fog") for k in range(3)]
    assert [len(s) for s in shares] == [4, 3, 3]
    assert sorted(np.concatenate(shares).tolist()) == list(range(10))
    assert np.array_equal(device_share(2, 5, 3, 0, "fog"), device_share(2, 5, 1, 0, "fog"))  # more devices than files


def test_per_device_domain_order_and_global_test(tree):
    data = _data(tree, devices=4, per_device_domains=True)
    assert {data.device_domains(k) for k in range(4)} <= {CORRUPTIONS, CORRUPTIONS[::-1]}
    data = ImageNetCData(_dataset(tree, global_test_samples=5), _scenario(), 3, 0, **SMALL)
    x, y = data.global_test()
    assert x.shape == (5, 32, 32, 3) and (x[:3, 0, 0, 2] == 0).all() and (x[3:, 0, 0, 2] == 100).all()  # 3 + 2
    assert set(y.tolist()) <= set(FILLED)
    x_fog, _ = data.global_test(slot=1)
    assert (x_fog[:, 0, 0, 2] == 100).all() and len(x_fog) == 5
    proxy_x, proxy_y = data.proxy()
    assert proxy_x.shape == (0, 32, 32, 3) and proxy_y.shape == (0,)


# ------------------------------------------------------------------ the build path
def test_build_path_gives_standard_224_batches_with_1000_classes(tree):
    scenario = _scenario(stream_batch=3)
    data = build_federated_data(_dataset(tree), scenario, 3, 0)
    assert isinstance(data, ImageNetCData)
    assert data.num_classes == 1000 and data.image_shape == (3, 224, 224)
    batch = data.stream_batch(2, 0)
    assert batch.x.shape == (3, 224, 224, 3)
    assert to_tensor(batch.x).shape == (3, 3, 224, 224)
    assert data.sizes()["files_per_folder"] == {"gaussian_noise": 12}  # only the folder asked for is listed
    plan, tests = data.device_plan(2)
    assert len(plan.rows) == 4 and len(tests) == 0  # discovery's num_examples: the device's share
    with pytest.raises(ConfigError, match="online streams only"):
        data.device(0)


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        (scenario_named("shifting", corruptions=CORRUPTIONS, severity=SEVERITY), "run with scenario=online"),
        (scenario_named("online", corruptions=()), "no clean folder"),
        (scenario_named("online", corruptions=CORRUPTIONS, severity=3), "gaussian_noise/3 is missing"),
    ],
)
def test_other_scenarios_and_missing_severity_fail_clearly(tree, scenario, message):
    with pytest.raises(ConfigError, match=message):
        build_federated_data(_dataset(tree), scenario, 3, 0)


def test_missing_root_and_wrong_layouts_name_the_expected_layout(tree, tmp_path):
    for root in (None, str(tmp_path / "nowhere")):
        with pytest.raises(ConfigError) as info:
            ImageNetCData(DatasetConfig(name="imagenet_c", root=root), _scenario(), 3, 0)
        assert LAYOUT in str(info.value) and "dataset.root" in str(info.value)
    partial = tmp_path / "partial" / "fog" / str(SEVERITY)  # 3 wnid folders instead of 1000
    for wnid in ("n01440764", "n01443537", "n01484850"):
        (partial / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(partial / wnid / "a.JPEG")
    data = ImageNetCData(_dataset(tmp_path / "partial"), _scenario(corruptions=("fog",)), 1, 0, **SMALL)
    with pytest.raises(ConfigError, match="holds 3 wnid folders, ImageNet-C has 1000"):
        data.stream_batch(0, 0)
    empty = tmp_path / "empty" / "fog" / str(SEVERITY)
    for wnid in _wnids():
        (empty / wnid).mkdir(parents=True)
    data = ImageNetCData(_dataset(tmp_path / "empty"), _scenario(corruptions=("fog",)), 1, 0, **SMALL)
    with pytest.raises(ConfigError, match="no image file"):
        data.stream_batch(0, 0)


# ------------------------------------------------------------------ config validation
def _raw(root, algorithm="cema", **model) -> dict:
    return {
        "algorithm": {"name": algorithm, "cema": {"foundation_model": "tv_resnet50"}},
        "dataset": {"name": "imagenet_c", "root": str(root)},
        "model": {"name": "tv_resnet18", **model},
        "scenario": {"name": "online", "corruptions": list(CORRUPTIONS), "severity": SEVERITY},
        "fleet": {"devices": 3, "per_round": 3},
    }


def test_validation_names_each_missing_checkpoint(tree):
    with pytest.raises(ConfigError, match=r"^model.checkpoint is null"):
        from_dict(_raw(tree))
    with pytest.raises(ConfigError, match=r"^algorithm.cema.foundation_checkpoint is null.*tv_resnet50"):
        from_dict(_raw(tree, checkpoint="edge.pt"))
    raw = _raw(tree, checkpoint="edge.pt")
    raw["algorithm"]["cema"]["foundation_checkpoint"] = "foundation.pt"
    cfg = from_dict(raw)
    assert foundation_config(cfg).model.checkpoint == "foundation.pt"
    assert foundation_config(cfg).model.name == "tv_resnet50"
    assert from_dict(_raw(tree, algorithm="tent", checkpoint="edge.pt")).model.checkpoint == "edge.pt"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dataset": {"name": "imagenet_c", "root": None}}, "needs dataset.root"),
        ({"dataset": {"name": "imagenet_c", "download": True}}, "dataset.download must be false"),
        ({"scenario": {"name": "one_step"}}, "run with scenario=online"),
        ({"scenario": {"name": "online", "corruptions": ["fog", "snow"], "severity": SEVERITY}}, "snow/5 is missing"),
    ],
)
def test_validation_rejects_bad_imagenet_c_setups(tree, change, message):
    raw = {**_raw(tree, checkpoint="edge.pt"), **change}
    if "root" not in raw["dataset"]:
        raw["dataset"] = {**raw["dataset"], "root": str(tree)}
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


# ------------------------------------------------------------------ torchvision networks
def test_tv_resnet18_builds_1000_classes_offline_with_torchvision_keys(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # where a download would land
    model = build_model("tv_resnet18", num_classes=1000, width=16)
    assert model.fc.out_features == 1000
    assert not (tmp_path / "torch-home").exists()
    reference = torchvision.models.resnet18(weights=None)
    assert list(model.state_dict()) == list(reference.state_dict())  # the input layer saves nothing
    with pytest.raises(ValueError, match="RGB"):
        build_model("tv_resnet18", num_classes=1000, width=16, in_channels=1)


def test_input_layer_turns_project_input_into_imagenet_normalisation():
    import torchvision

    torch.manual_seed(0)
    model = build_model("tv_resnet18", num_classes=10, width=16).eval()
    reference = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    reference.load_state_dict(model.state_dict())
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    imagenet_input = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        assert torch.allclose(model(to_tensor(pixels)), reference(imagenet_input), atol=1e-4)


def test_checkpoint_round_trip_wrappers_and_mismatch(tmp_path):
    torch.manual_seed(1)
    saved = build_model("tv_resnet18", num_classes=1000, width=16)
    torch.save(saved.state_dict(), tmp_path / "plain.pt")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in saved.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    for name in ("plain.pt", "wrapped.pt"):
        fresh = load_checkpoint(build_model("tv_resnet18", num_classes=1000, width=16), tmp_path / name)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.state_dict().items())
    torch.save(build_model("tv_resnet18", num_classes=10, width=16).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(build_model("tv_resnet18", num_classes=1000, width=16), tmp_path / "ten.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(saved, tmp_path / "missing.pt")


def test_a_checkpoint_replaces_pre_training(tmp_path):
    torch.manual_seed(2)
    saved = build_model("tv_resnet18", num_classes=10, width=16)
    torch.save(saved.state_dict(), tmp_path / "edge.pt")
    raw = {"algorithm": {"name": "tent"}, "pretrain": {"cache_dir": str(tmp_path / "cache")}}
    cfg = from_dict({**raw, "model": {"name": "tv_resnet18", "checkpoint": str(tmp_path / "edge.pt")}})
    empty_x, empty_y = torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)
    model = pretrained_model(cfg, build_model("tv_resnet18", num_classes=10, width=16), None, proxy=(empty_x, empty_y))
    assert torch.equal(model.fc.weight, saved.fc.weight)
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached
    cfg = from_dict({**raw, "model": {"name": "tv_resnet18", "checkpoint": str(tmp_path / "gone.pt")}})
    with pytest.raises(ConfigError, match="set model.checkpoint"):
        pretrained_model(cfg, build_model("tv_resnet18", num_classes=10, width=16), None, proxy=(empty_x, empty_y))
