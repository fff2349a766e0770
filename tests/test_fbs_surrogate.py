"""ElasticDNN surrogate generation: hardest sample, filter selection, extraction, deltas back."""

import pytest
import torch
from torch import nn

from models.catalog import build_model
from models.elastic.bank import build_bank, update_bank_and_master
from models.elastic.fbs import ChannelGroup
from models.elastic.surrogate import (
    apply_keep_masks,
    conv_parameter_count,
    extract_surrogate,
    gate_relevance,
    generate_surrogate,
    hardest_sample,
    layer_indices,
    magnitude_keep,
    parameter_count,
    select_filters,
    surrogate_deltas,
    write_back_bn,
)

torch.set_num_threads(1)


def _master(width=8, gate_hidden=None):
    """A CPU master with random BN statistics and affine values, so eval mode is not trivial."""
    master = build_model("fbs_resnet_cpu", num_classes=6, width=width, seed=0, gate_hidden=gate_hidden)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, unit in master.gated_units():
            unit.bn.running_mean.normal_(generator=g)
            unit.bn.running_var.uniform_(0.5, 2.0, generator=g)
            unit.bn.weight.normal_(generator=g)
            unit.bn.bias.normal_(generator=g)
    return master


def _images(n=12, side=16, seed=2):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- steps 1 and 2
def test_hardest_sample_is_the_highest_entropy_prediction():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 0.9], [5.0, 0.0, 0.0], [1.0, 1.0, 0.8]])
    assert hardest_sample(nn.Identity(), logits) == 1
    with pytest.raises(ValueError, match="non-empty"):
        hardest_sample(nn.Identity(), torch.zeros(0, 3))


def test_gate_relevance_gives_one_value_per_filter_and_keeps_the_mode():
    master = _master()
    master.train()
    relevance = gate_relevance(master, _images(1)[0])
    assert set(relevance) == {name for name, _ in master.gated_units()}
    assert relevance["stages.2.0.conv1"].shape == (32,) and master.training
    with pytest.raises(ValueError, match="one image"):
        gate_relevance(master, _images(2))


def test_select_filters_ranks_shared_groups_by_the_mean_of_their_writers():
    groups = (ChannelGroup("shared", 4, ("a", "b"), ()), ChannelGroup("inner", 5, ("c",), ()))
    relevance = {"a": torch.tensor([1.0, 0.0, 0.0, 0.9]), "b": torch.tensor([0.0, 0.0, 3.0, 0.0]),
                 "c": torch.tensor([0.1, 0.5, 0.4, 0.3, 0.2])}
    keep = select_filters(relevance, groups, keep_fraction=0.5)
    # shared: means [0.5, 0, 1.5, 0.45] -> top 2 = {2, 0}; inner: ceil(2.5) = 3 -> {1, 2, 3}
    assert keep["shared"].tolist() == [0, 2] and keep["inner"].tolist() == [1, 2, 3]
    assert select_filters(relevance, groups, keep_fraction=0.01)["inner"].tolist() == [1]  # always >= 1
    for bad in (0.0, 1.2, -0.5):
        with pytest.raises(ValueError, match="keep_fraction"):
            select_filters(relevance, groups, keep_fraction=bad)
    with pytest.raises(ValueError, match="misses"):
        select_filters({"a": relevance["a"]}, groups)


def test_magnitude_keep_picks_the_largest_l1_filters():
    master = _master()
    unit = master.stages[0][1].conv1  # writes the free group stages.0.1.inner (8 filters)
    values = torch.tensor([0.1, -3.0, 0.2, 2.0, -0.3, 0.05, 1.0, 0.0])
    with torch.no_grad():
        unit.conv.weight.copy_(values.view(8, 1, 1, 1).expand_as(unit.conv.weight))
    keep = magnitude_keep(master, keep_fraction=0.25)
    assert keep["stages.0.1.inner"].tolist() == [1, 3]
    relevance_keep = select_filters(gate_relevance(master, _images(1)[0]), master.channel_groups(), 0.25)
    assert {k: len(v) for k, v in keep.items()} == {k: len(v) for k, v in relevance_keep.items()}


# --------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("gate_hidden", [None, 4])
def test_surrogate_equals_the_masked_master(gate_hidden):
    master, x = _master(gate_hidden=gate_hidden), _images()
    surrogate, keep, index = generate_surrogate(master, x, keep_fraction=0.2)
    assert type(surrogate) is type(master)
    assert surrogate.stages[2][0].conv1.conv.weight.shape == (7, 4, 3, 3)  # ceil(6.4) x ceil(3.2)
    assert surrogate.classifier.weight.shape == (6, 7)
    apply_keep_masks(master, keep)
    for mode in (False, True):
        master.train(mode), surrogate.train(mode)
        with torch.no_grad():
            for batch in (x, x[index : index + 1] if not mode else x[:2], _images(seed=9)):
                assert torch.allclose(surrogate(batch), master(batch), atol=1e-5)


def test_zero_gates_and_zero_bn_affine_remove_filters_exactly():
    master, x = _master(), _images()
    keep = magnitude_keep(master, 0.5)
    plan = layer_indices(master.channel_groups(), keep)
    zero_gates, zero_bn = _master(), _master()
    with torch.no_grad():
        for (name, unit), (_, gated), (_, bn) in zip(master.gated_units(), zero_gates.gated_units(),
                                                     zero_bn.gated_units()):
            dropped = torch.ones(unit.out_channels, dtype=torch.bool)
            dropped[plan[name][0]] = False
            gated.gate.output_layer.weight[dropped] = 0.0
            gated.gate.output_layer.bias[dropped] = 0.0
            bn.bn.weight[dropped] = 0.0
            bn.bn.bias[dropped] = 0.0
    apply_keep_masks(master, keep)
    for net in (master, zero_gates, zero_bn):
        net.eval()
    with torch.no_grad():
        masked = master(x)
        assert torch.equal(masked, zero_gates(x))
        assert torch.equal(masked, zero_bn(x))
        assert not torch.allclose(masked, _master().eval()(x))  # the masks do change the output


def test_surrogate_sizes_and_parameter_fraction():
    master = _master()
    keep = select_filters(gate_relevance(master, _images(1)[0]), master.channel_groups(), 0.2)
    assert [len(keep[f"stream{s}"]) for s in range(3)] == [2, 4, 7]  # ceil(0.2 * 8, 16, 32)
    surrogate = extract_surrogate(master, keep)
    fraction = conv_parameter_count(surrogate) / conv_parameter_count(master)
    assert 0.2**2 <= fraction <= 0.2 and fraction == pytest.approx(0.0532, abs=5e-4)
    assert parameter_count(surrogate) < 0.1 * parameter_count(master)


def test_extraction_copies_tensors_and_leaves_rng_and_master_alone():
    master = _master()
    before = {k: v.clone() for k, v in master.state_dict().items()}
    state = torch.random.get_rng_state()
    surrogate = extract_surrogate(master, magnitude_keep(master))
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.no_grad():
        for p in surrogate.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in master.state_dict().items())
    assert all(p.requires_grad and p.device.type == "cpu" for p in surrogate.parameters())


def test_bad_keep_raises():
    master = _master()
    keep = magnitude_keep(master)
    missing = {k: v for k, v in keep.items() if k != "stream1"}
    with pytest.raises(ValueError, match="missing \\['stream1'\\]"):
        extract_surrogate(master, missing)
    with pytest.raises(ValueError, match="stream0"):
        extract_surrogate(master, {**keep, "stream0": torch.tensor([0, 8])})
    with pytest.raises(ValueError, match="stream0"):
        extract_surrogate(master, {**keep, "stream0": torch.tensor([], dtype=torch.long)})
    surrogate = extract_surrogate(master, keep)
    with pytest.raises(ValueError, match="does not match keep"):
        surrogate_deltas(master, surrogate, magnitude_keep(master, 0.5))


# --------------------------------------------------------------------------- back to the master
def test_surrogate_deltas_write_the_kept_sub_block_back():
    master = _master()
    keep = magnitude_keep(master, 0.25)
    plan = layer_indices(master.channel_groups(), keep)
    surrogate = extract_surrogate(master, keep)
    assert surrogate_deltas(master, surrogate, keep) == {}
    name = "stages.1.1.conv2"
    with torch.no_grad():
        surrogate.stages[1][1].conv2.conv.weight[[0, 2]] += 0.5
    deltas = surrogate_deltas(master, surrogate, keep)
    out_idx, in_idx = plan[name]
    indices, delta = deltas[name]
    assert list(deltas) == [name] and indices.tolist() == out_idx[[0, 2]].tolist()
    dropped_in = torch.ones(16, dtype=torch.bool)
    dropped_in[in_idx] = False
    assert torch.equal(delta[:, dropped_in], torch.zeros_like(delta[:, dropped_in]))
    assert torch.allclose(delta[:, in_idx], torch.full_like(delta[:, in_idx], 0.5))

    weight = master.stages[1][1].conv2.conv.weight
    before = weight.clone()
    update_bank_and_master(master, build_bank(master, noise_std=0.0), deltas)  # W = I: theta += delta
    sub = weight.index_select(0, out_idx).index_select(1, in_idx)
    assert torch.allclose(sub, surrogate.stages[1][1].conv2.conv.weight, atol=1e-6)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(weight[untouched], before[untouched])
    assert torch.equal(weight[indices][:, dropped_in], before[indices][:, dropped_in])


def test_write_back_bn_copies_the_kept_channels_only():
    master = _master()
    keep = magnitude_keep(master, 0.5)
    out_idx = layer_indices(master.channel_groups(), keep)["stem"][0]
    surrogate = extract_surrogate(master, keep)
    bn = master.stem.bn
    before_gamma, before_mean = bn.weight.clone(), bn.running_mean.clone()
    with torch.no_grad():
        surrogate.stem.bn.weight.fill_(7.0)
        surrogate.stem.bn.running_mean.fill_(3.0)
    write_back_bn(master, surrogate, keep)
    expected = before_gamma.clone()
    expected[out_idx] = 7.0
    assert torch.equal(bn.weight, expected) and torch.equal(bn.running_mean, before_mean)
    write_back_bn(master, surrogate, keep, include_running_stats=True)
    assert torch.equal(bn.running_mean[out_idx], torch.full((len(out_idx),), 3.0))
