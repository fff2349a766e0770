"""Online test-time-adaptation baselines (models/tta*.py): online order, what changes, ETA's filter."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model
from models.tta import adapter_names, build_adapter, eta_keep_mask, softmax_entropy
from models.tta_lame import knn_affinity, laplacian_assignment

torch.set_num_threads(1)

NUM_CLASSES = 10
BATCH = 16
# Hyper-parameters that make every adaptation step visible on a tiny random network, so the
# online-order test would fail if an adapter predicted after adapting.
VISIBLE = {
    "source": {}, "bn_adapt": {}, "onda": {"momentum": 0.5}, "lame": {},
    "pl": {"threshold": 0.0, "lr": 0.1}, "tent": {"lr": 0.1},
    "eta": {"redundancy_margin": 1.01, "lr": 0.1},
    "cotta": {"anchor_threshold": 0.0, "ema": 0.5, "lr": 0.05, "n_augmentations": 2},
}
ADAPTIVE = ("onda", "pl", "tent", "eta", "cotta")


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


@pytest.mark.parametrize("name", [n for n in adapter_names() if n != "lame"])
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


def test_eta_mask_on_hand_built_logits():
    e0 = 0.4 * math.log(10)  # 0.921
    rows = torch.zeros(5, 10)
    rows[0, 0] = 10.0           # confident class 0: E ~ 0.005
    # rows[1] stays uniform:      E = ln 10 = 2.30 > E0
    rows[2, 3] = 10.0           # confident class 3
    rows[3, [4, 5]] = 10.0      # split over 2 classes: E ~ ln 2 = 0.69 < E0
    rows[4, [4, 5, 6]] = 10.0   # split over 3 classes: E ~ ln 3 = 1.10 > E0
    assert eta_keep_mask(rows, None, e0).tolist() == [True, False, True, True, False]
    towards_class_0 = torch.zeros(10)
    towards_class_0[0] = 1.0     # cos with row 0 ~ 1 (redundant), with rows 2, 3 ~ 5e-5 (kept)
    assert eta_keep_mask(rows, towards_class_0, e0).tolist() == [False, False, True, True, False]


def test_eta_mask_moving_average_and_step_match_hand_computation(source_model):
    lr = 0.05
    model = copy.deepcopy(source_model)
    with torch.no_grad():
        model.classifier.weight.mul_(0.5)  # about a third of the batch falls below E0
    adapter = build_adapter("eta", model, NUM_CLASSES, lr=lr, momentum=0.0)
    e0 = 0.4 * math.log(NUM_CLASSES)
    manual = copy.deepcopy(adapter.model)
    x = _batch(3)
    logits = adapter.predict_then_adapt(x)
    keep = eta_keep_mask(logits, None, e0)
    assert torch.equal(adapter.last_kept_mask, keep)
    assert 0 < int(keep.sum()) < BATCH  # the filter really filters this batch
    torch.testing.assert_close(adapter.moving_average, logits[keep].softmax(1).mean(0))
    # one SGD step by hand on mean(exp(E0 - E) * E) over the kept samples
    entropy = softmax_entropy(manual(x)[keep])
    loss = (torch.exp(e0 - entropy.detach()) * entropy).mean()
    loss.backward()
    with torch.no_grad():
        for name, param in manual.named_parameters():
            if param.grad is not None:
                param -= lr * param.grad
    for name, param in adapter.model.named_parameters():
        torch.testing.assert_close(param, dict(manual.named_parameters())[name], rtol=0, atol=1e-6)
    # second batch: the redundancy filter uses the moving average of the first
    m = adapter.moving_average.clone()
    logits2 = adapter.predict_then_adapt(_batch(4))
    assert torch.equal(adapter.last_kept_mask, eta_keep_mask(logits2, m, e0))


def test_bn_adapt_equals_train_mode_bn_and_updates_nothing(source_model):
    adapter = build_adapter("bn_adapt", copy.deepcopy(source_model), NUM_CLASSES)
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


def test_onda_moves_running_statistics_by_momentum(source_model):
    adapter = build_adapter("onda", copy.deepcopy(source_model), NUM_CLASSES, momentum=0.5)
    x = _batch(5)
    first_bn = adapter.model.features[0][1]
    conv_out = adapter.model.features[0][0](x).detach()
    adapter.predict_then_adapt(x)
    source_mean = source_model.features[0][1].running_mean
    torch.testing.assert_close(first_bn.running_mean, 0.5 * source_mean + 0.5 * conv_out.mean((0, 2, 3)))


def test_source_never_changes_the_model(source_model):
    model = copy.deepcopy(source_model).train()
    adapter = build_adapter("source", model, NUM_CLASSES)
    before = copy.deepcopy(model.state_dict())
    eval_copy = copy.deepcopy(source_model).eval()
    for seed in range(3):
        x = _batch(seed)
        with torch.no_grad():
            expected = eval_copy(x)
        torch.testing.assert_close(adapter.predict_then_adapt(x), expected, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


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


def test_knn_affinity_on_a_line():
    points = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    expected = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.float)
    assert torch.equal(knn_affinity(points, knn=1), expected)


def test_laplacian_assignment_hand_cases():
    log_p = torch.tensor([[0.9, 0.1], [0.4, 0.6]]).log()
    torch.testing.assert_close(laplacian_assignment(log_p, torch.zeros(2, 2)), log_p)
    linked = laplacian_assignment(log_p, torch.tensor([[0.0, 1.0], [1.0, 0.0]])).exp()
    assert linked[1, 0] > 0.4 and linked[0, 0] > 0.9  # neighbours pull each other to class 0


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
    hyper = dict(VISIBLE[name], **({"anchor_threshold": 1.0} if name == "cotta" else {}))
    straight = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **hyper)
    expected = [straight.predict_then_adapt(_batch(seed)) for seed in range(3)]
    first = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **hyper)
    first.predict_then_adapt(_batch(0))
    resumed = build_adapter(name, copy.deepcopy(source_model), NUM_CLASSES, **hyper)
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
    with pytest.raises(ValueError, match="no .features/.classifier"):
        build_adapter("lame", no_bn, NUM_CLASSES).predict_then_adapt(_batch(0))
    with pytest.raises(ValueError, match=r"shape \(N>=1"):
        build_adapter("source", copy.deepcopy(source_model), NUM_CLASSES).predict_then_adapt(torch.zeros(3))
    with pytest.raises(ValueError, match="threshold must be in"):
        build_adapter("pl", copy.deepcopy(source_model), NUM_CLASSES, threshold=1.5)
    tent = build_adapter("tent", copy.deepcopy(source_model), NUM_CLASSES)
    with pytest.raises(ValueError, match="optimizer does not match"):
        tent.load_state_dict(build_adapter("bn_adapt", copy.deepcopy(source_model),
                                           NUM_CLASSES).state_dict())
