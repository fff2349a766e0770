"""ElasticDNN surrogate retraining: hand-valued losses, masked retraining, bad inputs.

Scores and selection are tested in test_elastic_scores.py, which reuses the tiny networks here.
"""

import copy
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import nn

from models.elastic.features import feature_layer, feature_statistics, forward_with_features
from models.elastic.losses import feature_alignment, shot_loss, shot_pseudo_labels
from models.elastic.modes import labelling_mode, retraining_mode
from models.elastic.objective import RetrainingObjective
from models.elastic.retrain import adapt_full, retrain_selected, retrain_surrogate
from models.elastic.scores import conv_bn_pairs, filter_scores, top_mass_filters
from models.losses import entropy_loss, information_maximisation

torch.set_num_threads(1)

LN3 = math.log(3.0)
H_3_1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # entropy of (3/4, 1/4) = 0.562335


# ----------------------------------------------------------------------------- tiny networks
class PlainNet(nn.Module):
    """conv(3->4, no bias)+BN, conv(4->5, bias)+BN, GAP, fc(5->3): 329 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class ResBlock(nn.Module):
    """Basic residual block; a 1x1 conv+BN projection shortcut when the width changes."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4),
                                  nn.ReLU())
        self.block1, self.block2 = ResBlock(4, 4), ResBlock(4, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.block2(self.block1(self.stem(x))).mean((2, 3)))


RES_CONVS = ["stem.0", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2",
             "block2.shortcut.0"]


def make(net_class, seed=0):
    torch.manual_seed(seed)
    return net_class()


def confident(model, scale=5.0):
    """Scale the head so logits span a few units, as a trained head's do (random init: ~0.1)."""
    with torch.no_grad():
        model.fc.weight.mul_(scale)
    return model


def shifted_batch(n=100, seed=1):
    """A toy target domain: inputs with a shifted mean and a larger scale than N(0, 1)."""
    return 1.0 + 2.0 * torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- losses by hand
@pytest.mark.parametrize("logits, im, tent", [
    ([[LN3, 0.0], [0.0, LN3]], H_3_1 - math.log(2), H_3_1),  # confident-ish and diverse
    ([[LN3, 0.0], [LN3, 0.0]], 0.0, H_3_1),                    # same prediction: no diversity gain
    ([[0.0, 0.0], [0.0, 0.0]], 0.0, math.log(2)),              # uniform
])
def test_im_and_entropy_hand_values(logits, im, tent):
    logits = torch.tensor(logits)
    assert information_maximisation(logits).item() == pytest.approx(im, abs=1e-6)
    assert entropy_loss(logits).item() == pytest.approx(tent, abs=1e-6)


def test_im_minimum_is_minus_log_classes():
    logits = 50.0 * torch.eye(3)  # confident, one sample per class
    assert information_maximisation(logits).item() == pytest.approx(-math.log(3), abs=1e-6)


@pytest.mark.parametrize("labels, beta, expected", [
    ([0, 1], 0.3, H_3_1 - math.log(2) + 0.3 * -math.log(0.75)),   # -0.044507
    ([1, 0], 0.3, H_3_1 - math.log(2) + 0.3 * -math.log(0.25)),   # 0.285076
    ([1, 0], 0.0, H_3_1 - math.log(2)),
])
def test_shot_loss_hand_values(labels, beta, expected):
    logits = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    got = shot_loss(logits, torch.tensor(labels), beta=beta).item()
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("features, mean, var, expected", [
    # channel 0: 1, 3 -> mean 2, var 2; channel 1: 2, 6 -> mean 4, var 8
    ([[1.0, 2.0], [3.0, 6.0]], [0.0, 4.0], [2.0, 2.0], (4 + 0) / 2 + (0 + 36) / 2),
    ([[1.0, 2.0], [3.0, 6.0]], [2.0, 4.0], [2.0, 8.0], 0.0),
    # (N=2, C=1, 1, 2): channel 0 holds 1, 3, 5, 7 -> mean 4, var 20/3
    ([[[[1.0, 3.0]]], [[[5.0, 7.0]]]], [3.0], [0.0], 1.0 + (20 / 3) ** 2),
])
def test_feature_alignment_hand_values(features, mean, var, expected):
    got = feature_alignment(torch.tensor(features), torch.tensor(mean), torch.tensor(var))
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("logits", [
    [[20.0, 0.0], [20.0, 0.0], [0.0, 20.0]],
    [[20.0, 0.0, -20.0], [20.0, 0.0, -20.0], [0.0, 20.0, -20.0]],  # class 2 never used
])
def test_shot_pseudo_labels_move_a_sample_to_its_feature_cluster(logits):
    # Sample 1 is predicted class 0 but its feature equals sample 2's (class 1): the centroid
    # labelling moves it. By hand: cos(f0, c0) = sqrt(51/101) = 0.71 > cos(f0, c1) = 1/101.
    features = torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 10.0]])
    labels = shot_pseudo_labels(features, torch.tensor(logits))
    assert labels.tolist() == [0, 1, 1]


def test_shot_pseudo_labels_match_shots_numpy_recipe():
    rng = np.random.default_rng([7, 0])
    features, logits = rng.normal(size=(30, 5)), rng.normal(size=(30, 3)) * 2
    # SHOT's obtain_label (tim-learn/SHOT, digit/uda_digit.py), written out with numpy/scipy.
    unit = np.concatenate([features, np.ones((30, 1))], 1)
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    aff = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for _ in range(2):
        initc = aff.T @ unit / (1e-8 + aff.sum(0)[:, None])
        label = cdist(unit, initc, "cosine").argmin(1)
        aff = np.eye(3)[label]
    got = shot_pseudo_labels(torch.tensor(features, dtype=torch.float64),
                             torch.tensor(logits, dtype=torch.float64))
    assert got.tolist() == label.tolist()


def test_shot_pseudo_labels_exclude_classes_no_sample_predicts():
    # Class 2 is no sample's argmax, but sample 2 gives it 0.398 (the others 0.0066 each), so
    # class 2's soft centroid is 96 % sample 2 and would claim it. SHOT's labelset (classes of
    # the argmax predictions, image_target.py obtain_label) leaves only 0 and 1; sample 2 goes to
    # class 0, whose centroid holds 0.44 of it (class 1's: 0.16), and stays there when refined.
    features = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [1.0, 0.0, 0.9]])
    assert shot_pseudo_labels(features, logits).tolist() == [0, 1, 0]


def test_shot_pseudo_labels_threshold_drops_rare_classes():
    # Argmax classes 0, 0, 1: with threshold 1 only class 0 (2 samples) is a candidate.
    features = torch.tensor([[10.0, 0.0], [9.0, 1.0], [0.0, 10.0]])
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    assert shot_pseudo_labels(features, logits).tolist() == [0, 0, 1]
    assert shot_pseudo_labels(features, logits, threshold=1).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="lower the threshold"):
        shot_pseudo_labels(features, logits, threshold=2)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        shot_pseudo_labels(features, logits, threshold=-1)


# ----------------------------------------------------------------------------- SHOT label modes
def running_statistics_net():
    """PlainNet whose BN running statistics are far from any target batch's own statistics."""
    model = confident(make(PlainNet))
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(6))
            bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(56))
    return model


def labels_in_mode(model, x, train):
    """SHOT labels of ``x`` by a copy of ``model`` in train or eval mode (``model`` untouched)."""
    twin = copy.deepcopy(model).train(train)
    with torch.no_grad():
        features, logits = forward_with_features(twin, feature_layer(twin, None), x)
    return shot_pseudo_labels(features, logits)


def test_shot_labels_come_from_running_statistics_and_leave_the_model_as_it_was():
    model, x = running_statistics_net(), shifted_batch(32)
    expected, batch_labels = labels_in_mode(model, x, False), labels_in_mode(model, x, True)
    assert len(set(expected.tolist())) >= 2  # not one class for all (measured: 2; 9 of 32 differ)
    assert not torch.equal(expected, batch_labels)  # the two BN modes label this batch apart
    buffers = [b.clone() for b in model.buffers()]
    objective = RetrainingObjective(model, "shot", None, None)
    with retraining_mode(model):  # as in the retraining loop
        objective.refresh(x)
        assert model.bn1.training and not model.fc.training
    assert torch.equal(objective.pseudo_labels, expected)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_batch_label_mode_labels_with_the_samples_own_statistics():
    model, x = running_statistics_net(), shifted_batch(32)
    objective = RetrainingObjective(model, "shot", None, None, label_mode="batch")
    with retraining_mode(model):
        objective.refresh(x)
    assert torch.equal(objective.pseudo_labels, labels_in_mode(model, x, True))
    with pytest.raises(ValueError, match="label mode"):
        RetrainingObjective(model, "shot", None, None, label_mode="running")


def test_labelling_mode_is_eval_mode_and_restores_every_flag():
    model = make(PlainNet)
    model.bn1.train()
    model.bn2.eval()
    with labelling_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.bn1.training and not model.bn2.training
    with labelling_mode(model, "batch"):
        assert model.bn1.training and model.bn2.training and not model.fc.training
    assert model.bn1.training and not model.bn2.training


def test_shot_labels_are_recomputed_at_the_start_of_every_epoch(monkeypatch):
    refreshed = []
    original = RetrainingObjective.refresh

    def counting_refresh(self, x):
        refreshed.append(len(x))
        original(self, x)

    monkeypatch.setattr(RetrainingObjective, "refresh", counting_refresh)
    result = adapt_full(make(PlainNet), shifted_batch(), loss="shot", epochs=3)
    # SHOT relabels every len(loader) iterations: once per epoch (3), plus the loss reports
    # before and after training (2); always on all 100 samples.
    assert refreshed == [100] * 5
    assert result["steps"] == 3 * 2


# ----------------------------------------------------------------------------- masked retraining
def test_unselected_rows_stay_bit_identical_and_selected_rows_change():
    model, x = make(TinyResNet), shifted_batch()
    masks = {"stem.0": torch.tensor([True, False, True, False]),
             "block2.conv2": torch.tensor([False, True, False, False, True, False])}
    before = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = retrain_selected(model, x, masks=masks, epochs=3)  # SHOT's weight decay on
    for (name, conv, bn), (_, old_conv, old_bn) in zip(conv_bn_pairs(model),
                                                        conv_bn_pairs(before)):
        rows = masks.get(name, torch.zeros(conv.out_channels, dtype=torch.bool))
        tensors = [(conv.weight, old_conv.weight), (bn.weight, old_bn.weight),
                   (bn.bias, old_bn.bias)]
        if conv.bias is not None:
            tensors.append((conv.bias, old_conv.bias))
        for new, prev in tensors:
            assert torch.equal(new[~rows], prev[~rows]), name  # bit-identical
            changed = (new != prev).reshape(len(new), -1).any(1)
            assert torch.equal(changed, rows), name  # every selected row moved, no other
    assert torch.equal(model.fc.weight, before.fc.weight)  # head frozen (SHOT)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert result["trained_filters"] == 4 and result["total_filters"] == 4 + 4 + 4 + 6 + 6 + 6
    assert result["steps"] == 3 * 2  # 100 samples at batch 64 -> 2 steps per epoch


def test_other_parameters_train_only_when_asked():
    model, x = make(PlainNet), shifted_batch()
    fc_before = model.fc.weight.clone()
    retrain_selected(model, x, masks={"conv1": torch.tensor([True, False, False, False])},
                     epochs=1, train_other_parameters=True)
    assert not torch.equal(model.fc.weight, fc_before)


def test_trained_fraction_and_optimizer_state_by_hand():
    # Trained: conv1 row 0 (27) + gamma/beta (2); conv2 rows 1, 2 (72) + bias (2) + gamma/beta (4)
    # = 107 elements. SGD keeps a momentum buffer per trained TENSOR, whole: conv1 108, bn1 4 + 4,
    # conv2 180 + 5, bn2 5 + 5 = 311 float32 = 1244 bytes; none without momentum.
    masks = {"conv1": torch.tensor([True, False, False, False]),
             "conv2": torch.tensor([False, True, True, False, False])}
    result = retrain_selected(make(PlainNet), shifted_batch(), masks=masks, epochs=1)
    assert result["trained_parameters"] == 107
    assert result["optimizer_state_bytes"] == 1244
    assert (result["trained_filters"], result["total_filters"]) == (3, 9)
    assert result["trained_fraction"] == pytest.approx(1 / 3)
    no_momentum = retrain_selected(make(PlainNet), shifted_batch(), masks=masks, epochs=1,
                                   momentum=0.0)
    assert no_momentum["optimizer_state_bytes"] == 0
    assert result["wall_time_s"] > 0


@pytest.mark.parametrize("loss", ["im", "tent", "shot", "feature_alignment"])
def test_loss_decreases_on_a_shifted_batch(loss):
    model = confident(make(TinyResNet))
    stats = feature_statistics(model, torch.randn(64, 3, 6, 6,
                                                  generator=torch.Generator().manual_seed(3)))
    # 10 passes at SHOT's lr 1e-2 on this tiny net (the run default is searched on digits)
    result = retrain_surrogate(model, shifted_batch(), loss=loss, source_stats=stats, epochs=10, lr=1e-2)
    assert result["final_loss"] < result["initial_loss"] - 0.05, result  # measured drops 0.16-0.64
    assert 0 < result["trained_fraction"] < 1
    assert set(result["masks"]) == set(RES_CONVS)


def test_adapt_full_trains_every_filter_through_the_same_path():
    model, x = confident(make(TinyResNet)), shifted_batch()
    fc_before = model.fc.weight.clone()
    result = adapt_full(model, x, loss="im", epochs=10, lr=1e-2)  # SHOT's rate, as above
    assert result["trained_fraction"] == 1.0
    assert result["final_loss"] < result["initial_loss"] - 0.05
    assert torch.equal(model.fc.weight, fc_before)
    with pytest.raises(ValueError, match="retrain_selected"):
        adapt_full(model, x, masks={})


def test_retraining_is_deterministic_for_a_seed():
    model, x = make(TinyResNet), shifted_batch()
    masks = top_mass_filters(filter_scores(model, x))
    runs = []
    for seed in (5, 5, 6):
        copy_ = copy.deepcopy(model)
        runs.append((retrain_selected(copy_, x, masks=masks, epochs=2, seed=seed), copy_))
    (first, a), (second, b), (other, _) = runs
    assert first["loss_history"] == second["loss_history"]
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert first["loss_history"] != other["loss_history"]


def test_bn_running_statistics_follow_the_target_batches():
    model, x = make(PlainNet), shifted_batch()
    model.eval()
    retrain_selected(model, x, masks={"conv1": torch.tensor([True] * 4)}, epochs=1)
    assert not torch.equal(model.bn1.running_mean, torch.zeros(4))  # SHOT's netF.train()
    assert not model.training and not model.bn1.training  # modes restored


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, fragment", [
    ({"loss": "kl"}, "unknown loss"),
    ({"loss": "feature_alignment"}, "source_stats"),
    ({"masks": {"conv9": torch.tensor([True])}}, "unknown conv"),
    ({"masks": {"conv1": torch.tensor([1, 0, 0, 0])}}, "bool tensor"),
    ({"masks": {"conv1": torch.tensor([True, False])}}, r"shape \(4,\)"),
    ({"masks": {"conv1": torch.zeros(4, dtype=torch.bool)}}, "select no filter"),
    ({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"momentum": 1.0}, "momentum"),
    ({"batch_size": 1}, "batch_size"), ({"weight_decay": -1.0}, "weight_decay"),
    ({"feature_module": "nope", "loss": "shot"}, "feature_module"),
    ({"loss": "shot", "shot_labels": "running"}, "label mode"),
])
def test_bad_retraining_arguments_raise(kwargs, fragment):
    arguments = {"masks": {"conv1": torch.tensor([True, False, False, False])}, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        retrain_selected(make(PlainNet), shifted_batch(8), **arguments)


def test_bad_batches_and_losses_raise():
    model = make(PlainNet)
    with pytest.raises(ValueError, match="unknown loss"):
        filter_scores(model, shifted_batch(8), "kl")
    with pytest.raises(ValueError, match="N>=2"):
        filter_scores(model, shifted_batch(1))
    with pytest.raises(ValueError, match="logits"):
        information_maximisation(torch.zeros(3))
    with pytest.raises(ValueError, match="source_mean"):
        feature_alignment(torch.zeros(4, 2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="pseudo_labels"):
        shot_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))
