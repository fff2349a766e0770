"""The on-device TTA baselines (models/tta*.py) against fixtures of their official implementations.

Every adapter is built as the apps build it, ``build_adapter(name, model, C, family=...)``, so the
per-family reference values of ``models/tta/settings.py`` are checked along with the computation.
Fixtures: ``python -m tests.golden.make_tta <reference> ...`` (``tests/golden/make_tta.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.catalog import build_model, model_names
from models.tta.augment import cotta_augment
from models.tta.lame import affinity_matrix, laplacian_assignment, penultimate_features
from models.tta.methods import eta_keep_mask
from models.tta.registry import build_adapter
from models.tta.settings import CIFAR, IMAGENET
from tests.golden.fixture import Fixture, check, exact, load
from tests.golden.nets import TinyBNNet, load_state, shifted_images

torch.set_num_threads(1)
CLASSES, CHANNELS = 5, 4
# The input scaling of the fixtures' images: the reference transforms them as they are.
RAW_PIXELS = {"pixel_mean": 0.0, "pixel_std": 1.0}


def _net(fixture: Fixture) -> nn.Module:
    return load_state(TinyBNNet(CHANNELS, CLASSES), fixture.arrays, "init")


def _x(fixture: Fixture) -> torch.Tensor:
    return torch.from_numpy(fixture["x"])


def _online(adapter, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([adapter.predict_then_adapt(batch) for batch in x])


def _check_tensors(fixture: Fixture, tensors: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    """Compare every ``prefix/<name>`` array of the fixture with ``tensors[name]``, as one recorded row."""
    names = sorted(key[len(prefix) + 1:] for key in fixture.arrays if key.startswith(prefix + "/"))
    assert names and set(names) <= set(tensors), f"{fixture.name}: {prefix} names {names} vs {sorted(tensors)}"
    expected = np.concatenate([fixture[f"{prefix}/{name}"].ravel() for name in names])
    actual = np.concatenate([tensors[name].detach().numpy().ravel() for name in names])
    check(Fixture(fixture.name, {**fixture.arrays, prefix: expected}, fixture.source), actual, prefix, what)


# --------------------------------------------------------------------------- Tent, PL, BN adaptation
@pytest.mark.parametrize("name, family", [("tent_cifar", CIFAR), ("tent_imagenet", IMAGENET)])
def test_tent_matches_the_official_tent(name, family):
    fixture = load(name)
    adapter = build_adapter("tent", _net(fixture), CLASSES, family=family)
    check(fixture, _online(adapter, _x(fixture)), "logits", f"Tent ({family} setting): logits of 2 batches")
    _check_tensors(fixture, dict(adapter.model.named_parameters()), "after", "Tent: parameters after 2 steps")


def test_pl_matches_cemas_pseudo_label_baseline():
    fixture = load("pl_cema")
    adapter = build_adapter("pl", _net(fixture), CLASSES)
    x = _x(fixture)[:2]
    check(fixture, _online(adapter, x), "logits", "PL (every argmax, SGD lr 1e-3): logits of 2 batches")
    _check_tensors(fixture, dict(adapter.model.named_parameters()), "after", "PL: parameters after 2 steps")


def test_bn_adapt_mixed_matches_cemas_bn_adaptation():
    fixture = load("bn_adapt_mixed")
    adapter = build_adapter("bn_adapt", _net(fixture), CLASSES)
    check(fixture, _online(adapter, _x(fixture)[:2]), "logits", "BN adaptation, mixed statistics (momentum 0.5)")


def test_bn_adapt_batch_matches_tents_norm():
    fixture = load("bn_adapt_batch")
    adapter = build_adapter("bn_adapt", _net(fixture), CLASSES, stats="batch")
    check(fixture, _online(adapter, _x(fixture)), "logits", "BN adaptation, batch statistics")


# --------------------------------------------------------------------------- ONDA
@pytest.mark.parametrize("name, update", [("onda_layerwise", "layerwise"), ("onda_two_pass", "two_pass")])
def test_onda_matches_its_reference(name, update):
    fixture = load(name)
    adapter = build_adapter("onda", _net(fixture), CLASSES, update=update)
    check(fixture, _online(adapter, _x(fixture)), "logits", f"ONDA ({update}): logits of 3 batches")
    _check_tensors(fixture, dict(adapter.model.named_buffers()), "after", f"ONDA ({update}): running statistics")


# --------------------------------------------------------------------------- ETA
@pytest.mark.parametrize("name, family", [("eta_cifar", CIFAR), ("eta_imagenet", IMAGENET)])
def test_eta_matches_eata_without_fisher(name, family):
    fixture = load(name)
    adapter = build_adapter("eta", _net(fixture), CLASSES, family=family)
    assert adapter.d_margin == float(fixture["d_margin"])
    logits, kept, averages = [], [], []
    for batch in _x(fixture):
        logits.append(adapter.predict_then_adapt(batch))
        kept.append(adapter.last_kept_mask)
        averages.append(adapter.moving_average)
    logits = torch.stack(logits)
    reliable = torch.stack([eta_keep_mask(b, None, 0.4 * math.log(CLASSES), adapter.d_margin) for b in logits])
    check(fixture, logits, "logits", f"ETA ({family} setting): logits of 4 batches")
    exact(fixture, reliable.numpy(), "reliable", "ETA: reliable masks (E < 0.4 ln C)")
    exact(fixture, torch.stack(kept).numpy(), "kept", "ETA: kept masks (reliable and |cos| < d)")
    check(fixture, torch.stack(averages), "moving_average", "ETA: moving average of kept softmaxes")
    _check_tensors(fixture, dict(adapter.model.named_parameters()), "after", "ETA: parameters after 4 batches")


# --------------------------------------------------------------------------- CoTTA
def test_cotta_augmentation_matches_get_tta_transforms():
    fixture = load("cotta_augment")
    images = [cotta_augment(shifted_images(int(image_seed), 1, 32), torch.Generator().manual_seed(int(seed)),
                            **RAW_PIXELS)
              for image_seed, seed in zip(fixture["image_seeds"], fixture["seeds"])]
    check(fixture, torch.stack(images), "augmented", "CoTTA augmentation (same random draws)")


def _cotta_run(fixture: Fixture, x: torch.Tensor, **hyper):
    adapter = build_adapter("cotta", _net(fixture), CLASSES, **RAW_PIXELS, **hyper)
    logits = torch.stack([adapter.step(batch, torch.Generator().manual_seed(int(seed))).detach()
                          for batch, seed in zip(x, fixture["batch_seeds"])])
    return adapter, logits


def _check_cotta(fixture: Fixture, adapter, logits: torch.Tensor, what: str) -> None:
    check(fixture, logits, "logits", f"CoTTA {what}: teacher logits of 2 batches")
    _check_tensors(fixture, dict(adapter.model.named_parameters()), "student", f"CoTTA {what}: student after")
    _check_tensors(fixture, dict(adapter.teacher.named_parameters()), "teacher", f"CoTTA {what}: teacher after")


def test_cotta_cifar_with_augmentations_matches_the_reference():
    fixture = load("cotta_cifar_augment")
    x = shifted_images(int(fixture["image_seed"]), 8, 32).reshape(2, 4, 3, 32, 32)
    assert x.double().sum().item() == float(fixture["checksum"])
    adapter, logits = _cotta_run(fixture, x, family=CIFAR)
    assert adapter.anchor(x[0]).softmax(1).max(1).values.mean() < adapter.anchor_threshold  # augmented path
    _check_cotta(fixture, adapter, logits, "(CIFAR, 32 augmentations)")


def test_cotta_cifar_confident_with_restore_matches_the_reference():
    fixture = load("cotta_cifar_confident")
    x = _x(fixture)
    adapter, logits = _cotta_run(fixture, x, family=CIFAR, restore_prob=float(fixture["restore_prob"]))
    assert adapter.anchor(x[0]).softmax(1).max(1).values.mean() >= adapter.anchor_threshold  # no augmentation
    _check_cotta(fixture, adapter, logits, "(CIFAR, confident anchor, restore 0.2)")


def test_cotta_imagenet_matches_the_reference():
    fixture = load("cotta_imagenet_confident")
    adapter, logits = _cotta_run(fixture, _x(fixture), family=IMAGENET)
    _check_cotta(fixture, adapter, logits, "(ImageNet: Nesterov SGD, symmetric loss)")


# --------------------------------------------------------------------------- LAME
@pytest.mark.parametrize("affinity", ["knn", "rbf", "linear"])
def test_lame_matches_laplacian_optimization(affinity):
    fixture = load(f"lame_{affinity}")
    features = F.normalize(torch.from_numpy(fixture["features"]), p=2, dim=1)
    kernel = affinity_matrix(features, affinity, int(fixture["knn"]))
    check(fixture, kernel, "kernel", f"LAME {affinity} affinity")
    log_y = laplacian_assignment(torch.from_numpy(fixture["logits"]).softmax(1), kernel)
    check(fixture, log_y.exp(), "assignment", f"LAME ({affinity}): refined assignment Y")


def test_lame_reads_the_last_linear_input_as_cemas_baseline():
    fixture = load("lame_hook")
    adapter = build_adapter("lame", _net(fixture), CLASSES, affinity="knn")
    log_y = adapter.predict_then_adapt(_x(fixture)[0])
    check(fixture, log_y.exp(), "assignment", "LAME on a network (kNN, last-Linear features): Y")


@pytest.mark.parametrize("name", model_names())
def test_lame_runs_on_every_registered_network(name):
    """LAME reads the last Linear's input, as CEMA's baseline does, so it runs on every network (tv_resnet18 too)."""
    torch.manual_seed(0)
    classes = 10
    model = build_model(name, num_classes=classes, width=8)
    x = torch.from_numpy(np.random.default_rng([14, 7]).standard_normal((6, 3, 32, 32))).float()
    with torch.no_grad():
        feats, logits = penultimate_features(model.eval(), x)
        torch.testing.assert_close(logits, model(x))  # the hook does not change the forward
    assert feats.dim() == 2 and feats.shape[0] == 6
    log_y = build_adapter("lame", model, classes).predict_then_adapt(x)
    assert log_y.shape == (6, classes) and torch.isfinite(log_y).all()
