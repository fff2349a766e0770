"""Width-scaled sub-models: channel plans, extraction, covering average, surgery, static BN, costs."""

import numpy as np
import pytest
import torch
from torch import nn

from models.batchnorm import reestimate_bn
from models.catalog import build_model
from models.training import TrainSettings
from models.width.layers import (
    SAMPLES_KEY,
    RateCost,
    ScaledConv2d,
    check_width_scalable,
    cost_key,
    costs_from_record,
    costs_to_record,
    rate_costs,
    scaled_model,
    static_bn_statistics,
)
from models.width.submodel import (
    WIDTH_RATES,
    SubModelUpdate,
    channel_axes,
    channel_window,
    check_rate,
    class_rows,
    classifier_keys,
    covering_average,
    extract,
    kept_channels,
    pooled_bn_statistics,
    sub_shapes,
)
from models.width.training import LabelMasked, device_classes, mask_logits, masked_cross_entropy, train_submodel

torch.set_num_threads(1)


def _factory(name, width=16):
    return lambda: build_model(name, num_classes=10, width=width)


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- channels
def test_kept_channels_is_heterofl_ceil_and_never_zero():
    assert kept_channels(16, 0.25) == 4
    assert kept_channels(3, 0.5) == 2  # ceil(1.5)
    assert kept_channels(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 must not become 4
    assert kept_channels(4, 1 / 16) == 1


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, True, "half", float("nan")])
def test_check_rate_rejects_bad_rates(bad):
    with pytest.raises(ValueError, match="width rate"):
        check_rate(bad)


def test_channel_window_is_prefix_then_rolls_and_wraps():
    # FedRolex: torch.roll(arange(size), offset)[:kept]; arange(4) rolled by 1 is [3, 0, 1, 2]
    assert channel_window(8, 0.5).tolist() == [0, 1, 2, 3]
    assert channel_window(4, 0.5, offset=1).tolist() == [3, 0]  # wraps around
    assert channel_window(4, 0.5, offset=3).tolist() == [1, 2]
    assert channel_window(16, 0.25, offset=2).tolist() == [14, 15, 0, 1]
    assert channel_window(4, 0.5, offset=5).tolist() == channel_window(4, 0.5, offset=1).tolist()  # offset mod size
    assert channel_window(3, 1.0, offset=1).tolist() == [2, 0, 1]  # the full width keeps all, rolled


def test_channel_axes_of_a_hand_built_state_dict():
    shapes = {
        "stem.weight": (4, 2, 3, 3), "bn.weight": (4,), "bn.num_batches_tracked": (),
        "mid.weight": (6, 4), "mid.bias": (6,), "head.weight": (3, 6), "head.bias": (3,),
    }
    assert channel_axes(shapes) == {
        "stem.weight": (0,), "bn.weight": (0,), "bn.num_batches_tracked": (),
        "mid.weight": (0, 1), "mid.bias": (0,), "head.weight": (1,), "head.bias": (),
    }
    assert sub_shapes(shapes, 0.5)["mid.weight"] == (3, 2)
    assert sub_shapes(shapes, 0.5)["head.weight"] == (3, 3)  # all classes kept


def test_classifier_keys_are_the_last_matrix_and_its_bias():
    shapes = {"stem.weight": (4, 2), "bn.weight": (4,), "head.weight": (3, 4), "head.bias": (3,)}
    assert classifier_keys(shapes) == ("head.weight", "head.bias")
    assert classifier_keys({"a.weight": (4, 2), "head.weight": (3, 4)}) == ("head.weight",)  # no bias
    cnn = {k: tuple(v.shape) for k, v in _factory("cnn")().state_dict().items()}
    assert classifier_keys(cnn) == ("classifier.weight", "classifier.bias")
    with pytest.raises(ValueError, match="no conv or linear"):
        classifier_keys({"bn.weight": (4,)})


def test_class_rows_sorts_and_checks_the_classes():
    assert class_rows([2, 0, 2], 3).tolist() == [0, 2]
    assert class_rows(None, 3) is None
    assert class_rows([], 3).tolist() == []
    with pytest.raises(ValueError, match="class 3 is not one of the classifier's 3 classes"):
        class_rows([0, 3], 3)
    with pytest.raises(ValueError, match="class -1"):
        class_rows([-1], 3)
    with pytest.raises(ValueError, match="classes must be ints, got 1.5"):
        class_rows([1.5], 3)


def test_channel_axes_refuses_a_vector_that_is_not_its_layers():
    with pytest.raises(ValueError, match="cannot tell the channels of bn.weight"):
        channel_axes({"a.weight": (4, 2), "bn.weight": (5,), "head.weight": (3, 4)})
    with pytest.raises(ValueError, match="no conv or linear"):
        channel_axes({"bn.weight": (4,)})


# --------------------------------------------------------------------------- extraction
CNN_SHAPES_AT_QUARTER = {  # width 16: stages 16, 32, 64 -> 4, 8, 16; classifier keeps 10 classes
    "features.0.0.weight": (4, 3, 3, 3),
    "features.0.1.running_mean": (4,),
    "features.2.0.weight": (8, 4, 3, 3),
    "features.4.0.weight": (16, 8, 3, 3),
    "classifier.weight": (10, 16),
    "classifier.bias": (10,),
}
RESNET_SHAPES_AT_HALF = {  # width 16: stages 16, 32, 64, 128 -> 8, 16, 32, 64
    "conv1.weight": (8, 3, 3, 3),
    "bn1.weight": (8,),
    "layer1.0.conv2.weight": (8, 8, 3, 3),
    "layer2.0.conv1.weight": (16, 8, 3, 3),
    "layer2.0.shortcut.0.weight": (16, 8, 1, 1),
    "layer2.0.shortcut.1.running_var": (16,),
    "layer4.1.bn2.bias": (64,),
    "classifier.weight": (10, 64),
    "classifier.bias": (10,),
}


@pytest.mark.parametrize("name, rate, expected", [("cnn", 0.25, CNN_SHAPES_AT_QUARTER), ("resnet18", 0.5, RESNET_SHAPES_AT_HALF)])
def test_extraction_shapes_against_hand_counts(name, rate, expected):
    cut = extract(_state(_factory(name)()), rate)
    for key, shape in expected.items():
        assert cut[key].shape == shape, key
    assert cut["conv1.weight" if name == "resnet18" else "features.0.0.weight"].shape[1] == 3  # stem keeps RGB


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
@pytest.mark.parametrize("rate", WIDTH_RATES)
def test_extract_fits_the_scaled_network_at_every_rate(name, rate):
    torch.manual_seed(0)
    full = _factory(name)()
    cut = extract(_state(full), rate)
    sub = scaled_model(_factory(name), rate)
    assert {k: tuple(v.shape) for k, v in sub.state_dict().items()} == {k: v.shape for k, v in cut.items()}
    sub.load_state_dict({k: torch.as_tensor(v) for k, v in cut.items()}, strict=True)
    assert sub(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    first = cut["conv1.weight" if name == "resnet18" else "features.0.0.weight"]
    assert first.shape[0] == kept_channels(16, rate)


def test_extract_takes_the_prefix_values_and_rolled_windows():
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    state = {"a.weight": np.ones((4, 2), np.float32), "b.weight": w, "head.weight": np.ones((3, 4), np.float32)}
    np.testing.assert_array_equal(extract(state, 0.5)["b.weight"], w[:2, :2])
    rolled = extract(state, 0.5, offset=1)["b.weight"]  # channels [3, 0] on both axes
    np.testing.assert_array_equal(rolled, [[15, 12], [3, 0]])
    assert extract(state, 0.5)["b.weight"].dtype == np.float32


# --------------------------------------------------------------------------- covering average
def _toy_state():
    return {
        "stem.weight": np.zeros((4, 2), np.float32),
        "bn.weight": np.array([10, 20, 30, 40], np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
        "head.weight": np.zeros((3, 4), np.float32),
        "head.bias": np.array([1, 2, 3], np.float32),
    }


def _update(rate, bn, offset=0, weight=1.0, batches=7):
    state = extract(_toy_state(), rate, offset)
    state["bn.weight"] = np.array(bn, np.float32)
    state["bn.num_batches_tracked"] = np.array(batches, np.int64)
    return SubModelUpdate(state, rate, offset, weight)


def test_covering_average_against_hand_computed_numbers():
    full, half = _update(1.0, [1, 2, 3, 4], batches=2), _update(0.5, [5, 6], batches=5)
    out = covering_average(_toy_state(), [full, half])
    # channels 0,1 covered by both: (1+5)/2, (2+6)/2; channels 2,3 only by the full model
    np.testing.assert_allclose(out["bn.weight"], [3, 4, 3, 4])
    assert out["bn.weight"].dtype == np.float32
    count = out["bn.num_batches_tracked"]
    assert isinstance(count, np.ndarray) and count.shape == () and count.dtype == np.int64
    assert count == 4  # rint(3.5), ties to even
    weighted = covering_average(_toy_state(), [full, _update(0.5, [5, 6], weight=3.0)])
    np.testing.assert_allclose(weighted["bn.weight"], [(1 + 15) / 4, (2 + 18) / 4, 3, 4])


def test_elements_nobody_covered_keep_their_value():
    out = covering_average(_toy_state(), [_update(0.5, [5, 6])])
    np.testing.assert_allclose(out["bn.weight"], [5, 6, 30, 40])
    np.testing.assert_allclose(out["head.bias"], [1, 2, 3])  # every update sent the unchanged bias
    assert covering_average(_toy_state(), [])["bn.weight"].tolist() == [10, 20, 30, 40]


def test_covering_average_places_a_wrapped_window():
    out = covering_average(_toy_state(), [_update(0.5, [5, 6], offset=1)])  # channels [3, 0]
    np.testing.assert_allclose(out["bn.weight"], [6, 20, 30, 5])


def _head_update(rate, weight_value, bias, classes):
    state = extract(_toy_state(), rate)
    state["head.weight"] = np.full_like(state["head.weight"], weight_value)
    state["head.bias"] = np.array(bias, np.float32)
    return SubModelUpdate(state, rate, classes=classes)


def test_covering_average_merges_classifier_rows_only_over_the_devices_holding_the_class():
    a = _head_update(1.0, 2.0, [10, 20, 30], classes=(0, 2))
    b = _head_update(0.5, 4.0, [40, 50, 60], classes=(2,))
    out = covering_average(_toy_state(), [a, b])
    # bias: class 0 held by a only, class 1 by nobody (keeps 2), class 2 by both: (30 + 60) / 2
    np.testing.assert_allclose(out["head.bias"], [10, 2, 45])
    # weight rows likewise; row 2: columns 0-1 covered by both (2 + 4) / 2, columns 2-3 by a only
    np.testing.assert_allclose(out["head.weight"], [[2, 2, 2, 2], [0, 0, 0, 0], [3, 3, 2, 2]])
    everyone = covering_average(_toy_state(), [_head_update(1.0, 2.0, [10, 20, 30], None),
                                               _head_update(0.5, 4.0, [40, 50, 60], None)])
    np.testing.assert_allclose(everyone["head.bias"], [25, 35, 45])  # without label split: every row by both
    np.testing.assert_allclose(everyone["head.weight"], [[3, 3, 2, 2]] * 3)
    assert out["bn.weight"].tolist() == everyone["bn.weight"].tolist()  # only the classifier is split
    with pytest.raises(ValueError, match="class 5 is not one of the classifier's 3 classes"):
        covering_average(_toy_state(), [_head_update(1.0, 2.0, [10, 20, 30], classes=(5,))])


def test_covering_average_rejects_wrong_shapes_and_weights():
    bad = _update(0.5, [5, 6])
    with pytest.raises(ValueError, match=r"stem.weight: update at rate 0.25 has shape \(2, 2\), expected \(1, 2\)"):
        covering_average(_toy_state(), [SubModelUpdate(bad.arrays, 0.25)])
    with pytest.raises(ValueError, match="weights must be > 0"):
        covering_average(_toy_state(), [_update(0.5, [5, 6], weight=0.0)])


def _stats_state():
    return {
        "stem.weight": np.zeros((4, 2), np.float32),
        "bn.running_mean": np.full(4, 9.0, np.float32),
        "bn.running_var": np.full(4, 7.0, np.float32),
        "head.weight": np.zeros((3, 4), np.float32),
    }


def _stats(rate, mean, var, n):
    state = extract(_stats_state(), rate)
    state["bn.running_mean"], state["bn.running_var"] = np.array(mean, np.float32), np.array(var, np.float32)
    return SubModelUpdate(state, rate, num_examples=n)


def test_pooled_bn_statistics_follow_the_law_of_total_variance():
    a = _stats(1.0, [0, 0, 0, 0], [1, 1, 1, 1], n=1)
    b = _stats(0.5, [4, 4], [1, 1], n=3)
    out = pooled_bn_statistics(_stats_state(), [a, b])
    assert set(out) == {"bn.running_mean", "bn.running_var"}
    # channels 0-1: mean (0 x 1 + 4 x 3) / 4 = 3; E[x^2] = (1 x 1 + 3 x (1 + 16)) / 4 = 13; var = 13 - 9 = 4
    np.testing.assert_allclose(out["bn.running_mean"], [3, 3, 0, 0])
    np.testing.assert_allclose(out["bn.running_var"], [4, 4, 1, 1])
    alone = pooled_bn_statistics(_stats_state(), [b])  # channels 2-3 uncovered: keep 9 and 7
    np.testing.assert_allclose(alone["bn.running_mean"], [4, 4, 9, 9])
    np.testing.assert_allclose(alone["bn.running_var"], [1, 1, 7, 7])


# --------------------------------------------------------------------------- surgery
def test_scaled_model_uses_batch_statistics_and_heterofl_scaler():
    sub = scaled_model(_factory("cnn", width=4), 0.5)
    norms = [m for m in sub.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not bn.track_running_stats and bn.momentum is None for bn in norms)
    conv = sub.features[0][0]
    assert isinstance(conv, ScaledConv2d) and conv.rate == 0.5
    x = torch.randn(2, 3, 8, 8)
    conv.train()
    trained = conv(x)
    conv.eval()
    torch.testing.assert_close(trained, 2 * conv(x))  # divides by 0.5 in training only
    assert type(sub.classifier) is nn.Linear  # the classifier has no scaler


def test_training_a_scaled_model_leaves_running_stats_alone():
    sub = scaled_model(_factory("cnn", width=4), 0.5)
    before = sub.features[0][1].running_mean.clone()
    sub.train()
    sub(torch.randn(4, 3, 16, 16) + 5)
    torch.testing.assert_close(sub.features[0][1].running_mean, before)


def test_scaled_model_refuses_layers_it_cannot_cut():
    grouped = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2))  # noqa: E731
    with pytest.raises(ValueError, match="grouped convs"):
        scaled_model(grouped, 0.5)
    group_norm = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2))  # noqa: E731
    with pytest.raises(ValueError, match="GroupNorm cannot be width-scaled"):
        scaled_model(group_norm, 0.5)


def test_check_width_scalable_leaves_the_model_untouched():
    model = build_model("resnet18", num_classes=10, width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_width_scalable(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.conv1) is nn.Conv2d
    with pytest.raises(ValueError, match="GroupNorm"):
        check_width_scalable(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2)))


# --------------------------------------------------------------------------- static BN
def test_static_bn_on_a_scaled_cnn_matches_its_first_conv_output():
    torch.manual_seed(0)
    sub = scaled_model(_factory("cnn", width=4), 0.5)
    x = torch.randn(6, 3, 8, 8) + 2.0
    reestimate_bn(sub, x, batch_size=6, even_batches=True)  # one batch: exact statistics
    conv, bn = sub.features[0][0], sub.features[0][1]
    with torch.no_grad():
        expected = conv.eval()(x).mean(dim=(0, 2, 3))  # measured without the training-time scaler
    torch.testing.assert_close(bn.running_mean, expected)
    assert not sub.training and bn.track_running_stats and bn.momentum is None


# --------------------------------------------------------------------------- costs
def _doubler():
    """Conv 1x1 (weight 2, no bias) then BN: the BN sees twice the input."""
    net = nn.Sequential(nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1))
    with torch.no_grad():
        net[0].weight.fill_(2.0)
    return net


def test_static_bn_statistics_of_a_full_model_by_hand():
    state = {k: v.numpy().copy() for k, v in _doubler().state_dict().items()}
    state["1.running_mean"][:], state["1.running_var"][:] = 9.0, 9.0  # stale: replaced, not averaged into
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(4, 1, 1, 1)  # the BN sees 2, 4 | 6, 8 in batches of 2
    stats = static_bn_statistics(_doubler, state, x, batch_size=2)
    assert set(stats) == {"1.running_mean", "1.running_var"}
    np.testing.assert_allclose(stats["1.running_mean"], [5.0])  # mean of the batch means 3 and 7
    np.testing.assert_allclose(stats["1.running_var"], [2.0])  # mean of the unbiased batch variances 2 and 2
    assert stats["1.running_mean"].dtype == np.float32 and state["1.running_mean"][0] == 9.0  # state untouched
    np.testing.assert_allclose(static_bn_statistics(_doubler, state, x[:0], 2)["1.running_var"], [9.0])  # no data


def test_rate_costs_shrink_with_the_rate_and_survive_the_budget_record():
    costs = rate_costs(_factory("cnn", width=8), (3, 32, 32), batch_size=4, rates=(1.0, 0.5))
    assert costs[0.5].memory_bytes < costs[1.0].memory_bytes
    assert costs[0.5].flops_per_sample < costs[1.0].flops_per_sample
    assert costs[0.5].model_bytes < costs[1.0].model_bytes
    record = costs_to_record(costs, samples_per_round=60)
    assert record[SAMPLES_KEY] == 60.0 and cost_key(0.5, "model_bytes") == "width_cost/0.5/model_bytes"
    again, samples = costs_from_record(record, (1.0, 0.5))
    assert again == costs and samples == 60.0


def test_costs_from_record_names_the_missing_entry():
    record = costs_to_record({1.0: RateCost(1.0, 2.0, 3.0)}, 10)
    with pytest.raises(ValueError, match="width_cost/0.5/memory_bytes"):
        costs_from_record(record, (1.0, 0.5))


# --------------------------------------------------------------------------- label mask, local training
def test_device_classes_are_the_sorted_labels_of_the_training_data():
    assert device_classes(torch.tensor([3, 1, 3, 0])) == (0, 1, 3)
    assert device_classes(torch.tensor([], dtype=torch.long)) is None


def test_mask_logits_sets_absent_classes_to_zero_not_minus_infinity():
    logits = torch.tensor([[1.0, -2.0, 3.0], [-1.0, 5.0, -4.0]])
    masked = mask_logits(logits, [0, 2])
    torch.testing.assert_close(masked, torch.tensor([[1.0, 0.0, 3.0], [-1.0, 0.0, -4.0]]))
    # row 2: the absent class 1 (logit 0) now beats both held classes, as in the official local test
    assert LabelMasked(torch.nn.Identity(), [0, 2])(logits).argmax(dim=1).tolist() == [2, 1]
    with pytest.raises(ValueError, match="must lie in 0..2"):
        mask_logits(logits, [0, 3])


def test_masked_cross_entropy_by_hand_and_its_gradient_skips_absent_classes():
    logits = torch.tensor([[1.0, -2.0, 3.0]], requires_grad=True)
    loss = masked_cross_entropy(logits, torch.tensor([2]), classes=(0, 2))
    expected = -3.0 + np.log(np.exp(1.0) + np.exp(0.0) + np.exp(3.0))  # masked logits [1, 0, 3]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert float(logits.grad[0, 1]) == 0.0 and float(logits.grad[0, 0]) > 0
    plain = masked_cross_entropy(logits.detach(), torch.tensor([2]), classes=None)
    assert float(plain) == pytest.approx(-3.0 + np.log(np.exp(1.0) + np.exp(-2.0) + np.exp(3.0)), rel=1e-6)


def _head_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def test_label_masked_training_never_moves_the_rows_of_absent_classes():
    x, y = torch.randn(8, 4), torch.tensor([0, 2] * 4)
    settings = TrainSettings(epochs=2, lr=0.1, batch_size=4)
    masked, plain = _head_net(), _head_net()
    before = masked[1].weight.detach().clone(), masked[1].bias.detach().clone()
    train_submodel(masked, x, y, settings, seed=0, classes=(0, 2))
    train_submodel(plain, x, y, settings, seed=0, classes=None)
    torch.testing.assert_close(masked[1].weight[1], before[0][1])  # class 1: no gradient, Adam does not move it
    assert float(masked[1].bias.detach()[1]) == float(before[1][1])
    assert not torch.equal(masked[1].weight[0], before[0][0])
    assert not torch.equal(plain[1].weight[1], before[0][1])  # unmasked, class 1 is pushed down


def test_train_submodel_clips_the_gradient_norm():
    x, y = torch.randn(8, 4) * 100, torch.tensor([0, 1] * 4)
    sgd = TrainSettings(epochs=1, lr=1.0, batch_size=8, optimizer="sgd", momentum=0.0)  # one plain step
    net = _head_net()
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    train_submodel(net, x, y, sgd, seed=0, clip_grad_norm=0.05)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.05, rel=1e-3)  # lr x the clipped norm
    with pytest.raises(ValueError, match="clip_grad_norm must be > 0"):
        train_submodel(net, x, y, sgd, seed=0, clip_grad_norm=0.0)
