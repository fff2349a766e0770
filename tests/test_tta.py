"""Online test-time-adaptation baselines (models/tta*.py): online order, what changes, hand-computed rules.

The agreement with the official implementations is pinned in tests/golden/test_tta.py; these tests
cover behaviour the fixtures do not: every network, state round trips, options and errors.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from experiments.data.arrays import PIXEL_MEAN, PIXEL_STD
from experiments.data.reference_family import FAMILY_OF_DATASET
from models.catalog import build_model
from models.losses import prediction_entropy
from models.tta.augment import PIXEL_MEAN as COTTA_PIXEL_MEAN
from models.tta.augment import PIXEL_STD as COTTA_PIXEL_STD
from models.tta.augment import cotta_augment
from models.tta.base import make_optimizer
from models.tta.lame import affinity_matrix, knn_affinity, laplacian_assignment, penultimate_features, rbf_affinity
from models.tta.methods import eta_keep_mask
from models.tta.registry import adapter_names, build_adapter
from models.tta.settings import CIFAR, FAMILIES, IMAGENET, reference_values, resolve

torch.set_num_threads(1)

NUM_CLASSES = 10
BATCH = 16
# Hyper-parameters that make every adaptation step visible on a tiny random network, so the
# online-order test would fail if an adapter predicted after adapting.
VISIBLE = {
    "source": {}, "bn_adapt": {}, "onda": {"momentum": 0.5}, "lame": {},
    "pl": {"lr": 0.1}, "tent": {"lr": 0.1},
    "eta": {"d_margin": 1.01, "lr": 0.1},
    "cotta": {"anchor_threshold": 0.0, "ema": 0.5, "lr": 0.05, "augmentations": 2},
}
# Adapters whose prediction of a batch is made by the model as it was before the batch.
PREDICT_FIRST = ("source", "pl", "tent", "eta", "cotta")
ADAPTIVE = ("pl", "tent", "eta", "cotta")


def _confident_cnn() -> nn.Module:
    """A seeded SmallCNN whose head is scaled so its softmaxes are confident (entropies below E0)."""
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=NUM_CLASSES, width=4)
    with torch.no_grad():
        model.classifier.weight.mul_(60.0)
    return model


@pytest.fixture(scope="module")
def source_model() -> nn.Module:
    return _confident_cnn()


def _batch(seed: int, n: int = BATCH) -> torch.Tensor:
    rng = np.random.default_rng([seed, 7])
    return torch.from_numpy(rng.standard_normal((n, 3, 32, 32))).float()


# --------------------------------------------------------------------------- the online protocol
@pytest.mark.parametrize("name", PREDICT_FIRST)
def test_logits_are_computed_before_adapting(name, source_model):
    adapter = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **VISIBLE[name])
    adapter.predict_then_adapt(_batch(0))  # move away from the source state first
    for seed in (1, 2):
        x = _batch(seed)
        snapshot = copy.deepcopy(adapter)
        with torch.no_grad():
            expected = snapshot.teacher(x) if name == "cotta" else snapshot.model(x)
        returned = adapter.predict_then_adapt(x)
        torch.testing.assert_close(returned, expected, rtol=0, atol=1e-6)
        after = copy.deepcopy(adapter)
        with torch.no_grad():
            post = after.teacher(x) if name == "cotta" else after.model(x)
        if name in ADAPTIVE:  # the adaptation is visible: predicting after it would fail above
            assert (post - returned).abs().max() > 1e-3
        else:
            torch.testing.assert_close(post, returned, rtol=0, atol=1e-6)


def _one_bn_model(num_features: int = 3) -> nn.Module:
    """A lone BatchNorm2d with non-trivial source statistics and affine parameters."""
    layer = nn.BatchNorm2d(num_features)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        layer.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        layer.weight.copy_(torch.tensor([1.5, 0.5, 1.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return layer


def _normalise(x, mean, var, layer):
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps) * layer.weight.view(shape) \
        + layer.bias.view(shape)


def test_onda_folds_the_batch_in_before_normalising_it():
    layer, x = _one_bn_model(), _batch(8)[:, :3]
    source = copy.deepcopy(layer)
    adapter = build_adapter("onda", layer, NUM_CLASSES, momentum=0.25)
    out = adapter.predict_then_adapt(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    folded_mean = 0.75 * source.running_mean + 0.25 * mean
    folded_var = 0.75 * source.running_var + 0.25 * var
    torch.testing.assert_close(layer.running_mean, folded_mean)
    torch.testing.assert_close(layer.running_var, folded_var)
    with torch.no_grad():  # normalised with the folded statistics, not the source ones
        torch.testing.assert_close(out, _normalise(x, folded_mean, folded_var, source))
        assert (out - _normalise(x, source.running_mean, source.running_var, source)).abs().max() > 0.1


def test_onda_two_pass_folds_then_predicts_in_eval_mode(source_model):
    adapter = build_adapter("onda", copy.deepcopy(source_model), NUM_CLASSES, momentum=0.5, update="two_pass")
    folded = copy.deepcopy(source_model)
    for layer in (m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)):
        layer.momentum = 0.5
    x = _batch(9)
    with torch.no_grad():
        folded.train()(x)
        expected = folded.eval()(x)
    torch.testing.assert_close(adapter.predict_then_adapt(x), expected, rtol=0, atol=1e-6)


def test_bn_adapt_mixes_source_and_batch_statistics_and_stores_nothing():
    layer, x = _one_bn_model(), _batch(10)[:, :3]
    source = copy.deepcopy(layer)
    out = build_adapter("bn_adapt", layer, NUM_CLASSES, momentum=0.5).predict_then_adapt(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    with torch.no_grad():
        expected = _normalise(x, 0.5 * source.running_mean + 0.5 * mean, 0.5 * source.running_var + 0.5 * var, source)
    torch.testing.assert_close(out, expected)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_bn_adapt_batch_equals_train_mode_bn_and_updates_nothing(source_model):
    adapter = build_adapter("bn_adapt", copy.deepcopy(source_model), NUM_CLASSES, stats="batch")
    train_mode = copy.deepcopy(source_model).train()
    for seed in range(2):
        x = _batch(seed)
        with torch.no_grad():
            expected = train_mode(x)
        torch.testing.assert_close(adapter.predict_then_adapt(x), expected, rtol=0, atol=1e-6)
    source_state = source_model.state_dict()
    for key, value in adapter.model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, source_state[key]), key


# --------------------------------------------------------------------------- Tent, PL, ETA
def _changed_parameters(before: nn.Module, after: nn.Module) -> set[str]:
    old = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if not torch.equal(p, old[n])}


def _bn_affine_names(model: nn.Module) -> set[str]:
    return {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)
            for p in ("weight", "bias")}


@pytest.mark.parametrize("name", ["tent", "eta", "pl"])
def test_tent_eta_pl_change_only_bn_affine_parameters(name, source_model):
    adapter = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **VISIBLE[name])
    for seed in range(3):
        adapter.predict_then_adapt(_batch(seed))
    assert _changed_parameters(source_model, adapter.model) == _bn_affine_names(source_model)
    source_buffers = dict(source_model.named_buffers())
    for buffer_name, buffer in adapter.model.named_buffers():
        if "running" in buffer_name:
            assert torch.equal(buffer, source_buffers[buffer_name]), buffer_name


def test_pl_threshold_keeps_only_confident_samples_and_skips_empty_batches():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3) * 4.0)
        model[1].bias.zero_()
    x = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.2, 0.1], [0.0, 0.0, 3.0], [0.1, 0.0, 0.0]])
    every = build_adapter("pl", copy.deepcopy(model), 3, lr=0.1)
    confident = build_adapter("pl", copy.deepcopy(model), 3, lr=0.1, threshold=0.9)
    logits = every.model(x)
    keep = logits.softmax(1).max(1).values > 0.9
    assert 0 < int(keep.sum()) < len(x)  # the threshold really filters
    assert torch.equal(confident._loss(logits), nn.functional.cross_entropy(logits[keep], logits.argmax(1)[keep]))
    assert torch.equal(every._loss(logits), nn.functional.cross_entropy(logits, logits.argmax(1)))
    unsure = copy.deepcopy(model)
    with torch.no_grad():
        unsure[1].weight.mul_(0.01)  # every max softmax ~ 1/3
    nobody = build_adapter("pl", unsure, 3, lr=0.1, threshold=0.9)
    before = copy.deepcopy(dict(nobody.model.named_parameters()))
    nobody.predict_then_adapt(x)
    assert all(torch.equal(p, before[n]) for n, p in nobody.model.named_parameters())


def test_eta_mask_on_hand_built_logits():
    e0 = 0.4 * math.log(10)  # 0.921
    rows = torch.zeros(5, 10)
    rows[0, 0] = 10.0           # confident class 0: E ~ 0.005
    # rows[1] stays uniform:      E = ln 10 = 2.30 > E0
    rows[2, 3] = 10.0           # confident class 3
    rows[3, [4, 5]] = 10.0      # split over 2 classes: E ~ ln 2 = 0.69 < E0
    rows[4, [4, 5, 6]] = 10.0   # split over 3 classes: E ~ ln 3 = 1.10 > E0
    assert eta_keep_mask(rows, None, e0, 0.05).tolist() == [True, False, True, True, False]
    towards_class_0 = torch.zeros(10)
    towards_class_0[0] = 1.0     # cos with row 0 ~ 1 (redundant), with rows 2, 3 ~ 5e-5 (kept)
    assert eta_keep_mask(rows, towards_class_0, e0, 0.05).tolist() == [False, False, True, True, False]
    assert eta_keep_mask(rows, towards_class_0, e0, 1.01).tolist() == [True, False, True, True, False]


def test_eta_mask_moving_average_and_step_match_hand_computation(source_model):
    lr = 0.05
    model = copy.deepcopy(source_model)
    with torch.no_grad():
        model.classifier.weight.mul_(0.5)  # about a third of the batch falls below E0
    adapter = build_adapter("eta", model, NUM_CLASSES, optimizer="sgd", lr=lr)  # first step: plain lr * grad
    e0 = 0.4 * math.log(NUM_CLASSES)
    manual = copy.deepcopy(adapter.model)
    x = _batch(3)
    logits = adapter.predict_then_adapt(x)
    keep = eta_keep_mask(logits, None, e0, adapter.d_margin)
    assert torch.equal(adapter.last_kept_mask, keep)
    assert 0 < int(keep.sum()) < BATCH  # the filter really filters this batch
    torch.testing.assert_close(adapter.moving_average, logits[keep].softmax(1).mean(0))
    entropy = prediction_entropy(manual(x)[keep])
    loss = (torch.exp(e0 - entropy.detach()) * entropy).mean()
    loss.backward()
    with torch.no_grad():
        for param in manual.parameters():
            if param.grad is not None:
                param -= lr * param.grad
    for name, param in adapter.model.named_parameters():
        torch.testing.assert_close(param, dict(manual.named_parameters())[name], rtol=0, atol=1e-6)
    m = adapter.moving_average.clone()
    logits2 = adapter.predict_then_adapt(_batch(4))
    assert torch.equal(adapter.last_kept_mask, eta_keep_mask(logits2, m, e0, adapter.d_margin))


def test_make_optimizer_builds_the_reference_optimisers():
    params = [nn.Parameter(torch.zeros(2))]
    adam = make_optimizer("adam", params, 1e-3)
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.9, 0.999)
    sgd, nesterov = make_optimizer("sgd", params, 0.1), make_optimizer("nesterov", params, 0.1)
    assert sgd.defaults["momentum"] == nesterov.defaults["momentum"] == 0.9
    assert not sgd.defaults["nesterov"] and nesterov.defaults["nesterov"]
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop", params, 0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        make_optimizer("sgd", params, 0.0)


# --------------------------------------------------------------------------- reference settings
def test_reference_values_per_family_and_dataset():
    assert set(FAMILIES) == set(FAMILY_OF_DATASET.values())  # the apps' family names
    assert reference_values("tent", CIFAR) == {"optimizer": "adam", "lr": 1e-3}
    assert reference_values("tent", IMAGENET) == {"optimizer": "sgd", "lr": 2.5e-4}
    assert reference_values("eta", CIFAR)["d_margin"] == 0.4 and reference_values("eta", IMAGENET)["d_margin"] == 0.05
    assert reference_values("eta", CIFAR, "cifar100")["d_margin"] == 0.1
    assert reference_values("cotta", CIFAR, "cifar100")["anchor_threshold"] == 0.72
    assert reference_values("cotta", IMAGENET) == {"optimizer": "nesterov", "lr": 0.01, "restore_prob": 0.001,
                                                   "anchor_threshold": 0.1, "loss": "symmetric"}
    assert resolve("cotta", IMAGENET, "imagenet_c", {"lr": 0.5, "loss": None, "ema": 0.9}) == \
        {"lr": 0.5, "loss": "symmetric", "ema": 0.9}
    with pytest.raises(ValueError, match=r"algorithm.cotta.ema is null"):
        resolve("cotta", CIFAR, "digits", {"ema": None})
    with pytest.raises(ValueError, match="unknown reference family 'svhn'"):
        reference_values("tent", "svhn")


@pytest.mark.parametrize("family", FAMILIES)
def test_build_adapter_takes_the_family_reference_values(family, source_model):
    eta = build_adapter("eta", copy.deepcopy(source_model), NUM_CLASSES, family=family)
    cotta = build_adapter("cotta", copy.deepcopy(source_model), NUM_CLASSES, family=family)
    expected = torch.optim.Adam if family == CIFAR else torch.optim.SGD
    assert isinstance(eta.optimizer, expected) and eta.d_margin == reference_values("eta", family)["d_margin"]
    assert cotta.restore_prob == reference_values("cotta", family)["restore_prob"]
    assert cotta.optimizer.defaults["lr"] == reference_values("cotta", family)["lr"]


# --------------------------------------------------------------------------- CoTTA
def test_cotta_augmentation_keeps_shape_and_range_and_follows_its_generator():
    x = _batch(11, n=4).clamp(-1, 1)
    first = cotta_augment(x, torch.Generator().manual_seed(3))
    again = cotta_augment(x, torch.Generator().manual_seed(3))
    other = cotta_augment(x, torch.Generator().manual_seed(4))
    assert first.shape == x.shape and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (COTTA_PIXEL_MEAN, COTTA_PIXEL_STD) == (PIXEL_MEAN, PIXEL_STD)  # the project's input scaling
    with pytest.raises(ValueError, match=r"image batches \(N, C, H, W\)"):
        cotta_augment(torch.zeros(4, 10), torch.Generator())


def test_cotta_restores_with_the_given_probability(source_model):
    adapter = build_adapter("cotta", copy.deepcopy(source_model), NUM_CLASSES, lr=0.05, restore_prob=1.0,
                            anchor_threshold=0.0)
    adapter.predict_then_adapt(_batch(12))
    source = dict(source_model.named_parameters())
    assert all(torch.equal(p, source[n]) for n, p in adapter.model.named_parameters())  # all reset
    assert any(not torch.equal(p, source[n]) for n, p in adapter.teacher.named_parameters())  # the EMA moved


# --------------------------------------------------------------------------- LAME
def test_lame_returns_distributions_and_leaves_parameters(source_model):
    adapter = build_adapter("lame", copy.deepcopy(source_model), NUM_CLASSES)
    before = copy.deepcopy(adapter.model.state_dict())
    x = _batch(6)
    log_y = adapter.predict_then_adapt(x)
    assert log_y.shape == (BATCH, NUM_CLASSES) and torch.isfinite(log_y).all()
    torch.testing.assert_close(log_y.exp().sum(1), torch.ones(BATCH))
    for key, value in adapter.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        source_probs = source_model.eval()(x).softmax(1)
    assert not torch.allclose(log_y.exp(), source_probs, atol=1e-3)  # LAME did refine


def test_lame_defaults_to_cemas_knn_affinity(source_model):
    adapter = build_adapter("lame", copy.deepcopy(source_model), NUM_CLASSES)
    x = _batch(13)
    with torch.no_grad():
        feats, logits = penultimate_features(source_model.eval(), x)
        feats = nn.functional.normalize(feats, dim=1)
        expected = laplacian_assignment(logits.softmax(1), knn_affinity(feats, 5))
        rbf = laplacian_assignment(logits.softmax(1), rbf_affinity(feats, 5))
    torch.testing.assert_close(adapter.predict_then_adapt(x), expected)
    assert (expected - rbf).abs().max() > 1e-3  # the affinity matters


def test_knn_affinity_on_a_line():
    points = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    expected = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float)
    assert torch.equal(knn_affinity(points, knn=1), expected)


def test_rbf_affinity_by_hand_and_for_a_single_sample():
    points = torch.tensor([[0.0], [1.0], [3.0]])
    # knn 2: the 2nd nearest point, the point itself included: distances 1, 1, 2 -> sigma 4/3
    sigma = 4 / 3
    dist = torch.tensor([[0.0, 1, 3], [1, 0, 2], [3, 2, 0]])
    torch.testing.assert_close(rbf_affinity(points, knn=2), torch.exp(-dist**2 / (2 * sigma**2)))
    assert torch.equal(affinity_matrix(torch.ones(1, 3), "rbf", 5), torch.ones(1, 1))  # the limit, not NaN


def test_laplacian_assignment_hand_cases():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    torch.testing.assert_close(laplacian_assignment(probs, torch.zeros(2, 2)), probs.log())
    linked = laplacian_assignment(probs, torch.tensor([[0.0, 1.0], [1.0, 0.0]])).exp()
    assert linked[1, 0] > 0.4 and linked[0, 0] > 0.9  # neighbours pull each other to class 0


# --------------------------------------------------------------------------- determinism, state, errors
@pytest.mark.parametrize("name", adapter_names())
def test_same_inputs_same_outputs(name, source_model):
    runs = []
    for _ in range(2):
        adapter = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **VISIBLE[name])
        runs.append([adapter.predict_then_adapt(_batch(seed)) for seed in range(2)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("name", ["tent", "eta", "onda", "cotta"])
def test_state_dict_resumes_between_batches(name, source_model):
    straight = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **VISIBLE[name])
    expected = [straight.predict_then_adapt(_batch(seed)) for seed in range(3)]
    first = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **VISIBLE[name])
    first.predict_then_adapt(_batch(0))
    resumed = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **VISIBLE[name])
    resumed.load_state_dict(first.state_dict())
    for seed in (1, 2):
        assert torch.equal(resumed.predict_then_adapt(_batch(seed)), expected[seed])


def test_bad_inputs_raise_clear_errors(source_model):
    with pytest.raises(ValueError, match="unknown adapter 'shot'"):
        build_adapter("shot", copy.deepcopy(source_model), NUM_CLASSES)
    with pytest.raises(ValueError, match=r"does not take \['learning_rate'\]"):
        build_adapter("tent", copy.deepcopy(source_model), NUM_CLASSES, learning_rate=0.1)
    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, NUM_CLASSES))
    with pytest.raises(ValueError, match="needs BatchNorm"):
        build_adapter("tent", no_bn, NUM_CLASSES)
    no_linear = nn.Sequential(nn.Conv2d(3, NUM_CLASSES, 32), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        build_adapter("lame", no_linear, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"shape \(N>=1"):
        build_adapter("source", copy.deepcopy(source_model), NUM_CLASSES).predict_then_adapt(torch.zeros(3))
    with pytest.raises(ValueError, match="threshold must be in"):
        build_adapter("pl", copy.deepcopy(source_model), NUM_CLASSES, threshold=1.0)
    with pytest.raises(ValueError, match="stats must be one of"):
        build_adapter("bn_adapt", copy.deepcopy(source_model), NUM_CLASSES, stats="running")
    with pytest.raises(ValueError, match="update must be one of"):
        build_adapter("onda", copy.deepcopy(source_model), NUM_CLASSES, update="later")
    with pytest.raises(ValueError, match="loss must be one of"):
        build_adapter("cotta", copy.deepcopy(source_model), NUM_CLASSES, loss="kl")
    with pytest.raises(ValueError, match="affinity must be one of"):
        build_adapter("lame", copy.deepcopy(source_model), NUM_CLASSES, affinity="cosine")
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        build_adapter("onda", untracked, NUM_CLASSES)
    tent = build_adapter("tent", copy.deepcopy(source_model), NUM_CLASSES)
    with pytest.raises(ValueError, match="optimizer does not match"):
        tent.load_state_dict(build_adapter("bn_adapt", copy.deepcopy(source_model), NUM_CLASSES).state_dict())
