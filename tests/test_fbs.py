"""FBS gates, the gated master ResNet, the domain-knowledge bank (eq. 1, 3, 4) and pre-training."""

import copy

import pytest
import torch
from torch import nn

from models.catalog import build_model
from models.elastic.bank import DomainKnowledgeBank, bank_loss, build_bank, sync_master_to_bank, update_bank_and_master
from models.elastic.fbs import FBSGate, GatedConvBN, kept_count, top_k_gates
from models.elastic.pretrain import pretrain_master

torch.set_num_threads(1)


def _cpu_master(width=4, num_classes=5, **options):
    return build_model("fbs_resnet_cpu", num_classes=num_classes, width=width, seed=0, **options)


def _one_by_one_layer(weights):
    """A Sequential holding one 1x1 gated unit with 1 input channel and the given filter values."""
    unit = GatedConvBN(1, len(weights), kernel_size=1)
    with torch.no_grad():
        unit.conv.weight.copy_(torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1, 1))
    return nn.Sequential(unit)


# --------------------------------------------------------------------------- gate and unit
def test_gate_shapes_and_last_bias_starts_at_one():
    x = torch.randn(2, 3, 4, 4)
    single, bottleneck = FBSGate(3, 5), FBSGate(3, 5, hidden=4)
    assert single.hidden_layer is None and single.output_layer.weight.shape == (5, 3)
    assert bottleneck.hidden_layer.weight.shape == (4, 3) and bottleneck.output_layer.weight.shape == (5, 4)
    for gate in (single, bottleneck):
        p = gate(x)
        assert p.shape == (2, 5) and (p >= 0).all()
        assert torch.equal(gate.output_layer.bias, torch.ones(5))


def test_gate_is_relu_linear_of_mean_absolute_input():
    gate = FBSGate(2, 2)
    with torch.no_grad():
        gate.output_layer.weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
        gate.output_layer.bias.copy_(torch.tensor([0.5, -10.0]))
    x = torch.stack([torch.full((3, 3), -2.0), torch.full((3, 3), 1.0)]).unsqueeze(0)
    # features |x| averaged: [2, 1]; row 0: 2 - 1 + 0.5 = 1.5; row 1: 2 + 1 - 10 < 0 -> ReLU 0
    assert torch.allclose(gate(x), torch.tensor([[1.5, 0.0]]))


def test_bad_gate_sizes_raise():
    with pytest.raises(ValueError, match="hidden"):
        FBSGate(3, 4, hidden=0)
    with pytest.raises(ValueError, match="c_out"):
        FBSGate(3, 0)


def test_top_k_keeps_exactly_the_k_largest_per_sample():
    gates = torch.rand(6, 10, generator=torch.Generator().manual_seed(0)) + 0.1
    kept = top_k_gates(gates, 3)
    assert ((kept != 0).sum(dim=1) == 3).all()
    top3 = torch.topk(gates, 3, dim=1).values.sum(dim=1)
    assert torch.allclose(kept.sum(dim=1), top3)
    assert torch.equal(top_k_gates(gates, 10), gates)
    with pytest.raises(ValueError, match="k"):
        top_k_gates(gates, 0)


def test_unit_records_gates_l1_and_masks_channels():
    unit = GatedConvBN(2, 4)
    with torch.no_grad():
        unit.gate.output_layer.weight.zero_()
        unit.gate.output_layer.bias.copy_(torch.tensor([1.0, 2.0, 0.0, -1.0]))
    unit.eval()
    x = torch.randn(3, 2, 5, 5)
    out = unit(x)
    expected = torch.tensor([1.0, 2.0, 0.0, 0.0]).repeat(3, 1)
    assert torch.equal(unit.last_gates, expected) and not unit.last_gates.requires_grad
    assert float(unit.last_gate_l1.detach()) == pytest.approx(3 * 3.0)  # batch 3 x (1 + 2)
    plain = unit.bn(unit.conv(x))
    assert torch.allclose(out[:, 1], 2 * plain[:, 1]) and torch.equal(out[:, 2:], torch.zeros_like(out[:, 2:]))
    unit.keep_mask[1] = 0.0
    unit(x)
    assert torch.equal(unit.last_raw_gates, expected)
    assert torch.equal(unit.last_gates, torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(3, 1))


def test_kept_count_rounds_up_after_float_noise():
    assert [kept_count(30, 0.2), kept_count(16, 0.2), kept_count(64, 0.2), kept_count(5, 0.01)] == [6, 4, 13, 1]
    assert kept_count(10, 1.0) == 10
    for bad in (0, 0.0, -0.1, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match="keep_fraction"):
            kept_count(10, bad)


# --------------------------------------------------------------------------- master ResNet
def test_cpu_master_layout_and_channel_groups():
    master = _cpu_master(width=4)
    names = [name for name, _ in master.gated_units()]
    assert len(names) == 1 + 3 * 2 * 2 + 2 and names[0] == "stem"
    assert "stages.1.0.shortcut" in names and "stages.0.0.shortcut" not in names
    groups = master.channel_groups()
    writes = [w for g in groups for w in g.writers]
    reads = [r for g in groups for r in g.readers]
    assert sorted(writes) == sorted(names)  # every unit writes exactly one group
    assert sorted(reads) == sorted([n for n in names if n != "stem"] + ["classifier"])  # one read each
    by_name = {g.name: g for g in groups}
    assert [by_name[f"stream{s}"].size for s in range(3)] == [4, 8, 16]
    assert by_name["stream1"].writers == ("stages.1.0.shortcut", "stages.1.0.conv2", "stages.1.1.conv2")
    assert by_name["stream0"].readers == ("stages.0.0.conv1", "stages.0.1.conv1", "stages.1.0.conv1",
                                          "stages.1.0.shortcut")
    assert by_name["stages.2.1.inner"] == type(by_name["stream0"])(
        "stages.2.1.inner", 16, ("stages.2.1.conv1",), ("stages.2.1.conv2",))
    assert master(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_resnet56_has_the_paper_depth():
    master = build_model("fbs_resnet56", num_classes=10, width=2, seed=0)
    assert len(master.gated_units()) == 1 + 3 * 9 * 2 + 2  # 55 convs of ResNet56 + 2 projections


def test_seeded_factory_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = _cpu_master(), _cpu_master()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_set_sparsity_sets_top_k_per_unit():
    master = _cpu_master(width=4)
    master.set_sparsity(0.25)
    master(torch.randn(3, 3, 8, 8))
    for _, unit in master.gated_units():
        assert unit.k == kept_count(unit.out_channels, 0.25)
        assert ((unit.last_gates != 0).sum(dim=1) <= unit.k).all()
    master.set_sparsity(None)
    assert all(unit.k is None for _, unit in master.gated_units())
    with pytest.raises(ValueError, match="sparsity"):
        master.set_sparsity(0.0)


def test_gate_l1_sums_units_and_trained_model_deep_copies():
    master = _cpu_master(width=4)
    with pytest.raises(RuntimeError, match="forward"):
        master.gate_l1()
    master(torch.randn(2, 3, 8, 8))
    expected = sum(float(unit.last_gate_l1.detach()) for _, unit in master.gated_units())
    assert float(master.gate_l1().detach()) == pytest.approx(expected, rel=1e-6)
    master.gate_l1().backward()
    assert copy.deepcopy(master).gated_units()[0][1].last_gate_l1 is None


# --------------------------------------------------------------------------- bank
def _set_bank_layer(bank, name, theta_star, relevance):
    theta, rel = bank.layer(name)
    with torch.no_grad():
        theta.copy_(torch.tensor(theta_star, dtype=torch.float32).view_as(theta))
        rel.copy_(torch.tensor(relevance, dtype=torch.float32))


def test_bank_loss_matches_hand_value_on_a_two_filter_layer():
    master = _one_by_one_layer([1.0, 2.0])
    bank = build_bank(master)
    _set_bank_layer(bank, "0", [1.0, 1.0], [[2.0, 0.0], [0.5, 1.0]])
    # W theta* = [2, 1.5]; residuals [-1, 0.5]; loss 1 + 0.25
    assert float(bank_loss(master, bank).detach()) == pytest.approx(1.25)


def test_build_bank_starts_at_filters_and_noisy_identity():
    master = _cpu_master(width=4)
    bank, again, other = build_bank(master, seed=3), build_bank(master, seed=3), build_bank(master, seed=4)
    theta, rel = bank.layer("stages.1.0.conv2")
    assert torch.equal(theta, master.stages[1][0].conv2.conv.weight)
    assert 0 < (rel - torch.eye(8)).abs().max() < 0.01
    assert torch.equal(rel, again.layer("stages.1.0.conv2")[1])
    assert not torch.equal(rel, other.layer("stages.1.0.conv2")[1])
    assert float(bank_loss(master, bank).detach()) < 1e-3


def test_eq3_eq4_on_hand_computed_matrices_and_untouched_layers():
    master = nn.Sequential(*_one_by_one_layer([7.0, 7.0]), *_one_by_one_layer([5.0, 6.0]))
    bank = build_bank(master)
    _set_bank_layer(bank, "0", [1.0, 2.0], [[1.0, 0.5], [0.0, 2.0]])
    _set_bank_layer(bank, "1", [9.0, 9.0], [[1.0, 1.0], [1.0, 1.0]])  # eq. 4 here would change layer 1
    updated = update_bank_and_master(master, bank, {"0": ([0], torch.tensor([[[[1.0]]]]))})
    assert updated == ("0",)
    # eq. 3: theta*_0 += W(0,0) * 1 = 2; theta*_1 += W(0,1) * 1 = 2.5
    assert torch.equal(bank.layer("0")[0].flatten(), torch.tensor([2.0, 2.5]))
    # eq. 4: theta_0 = 1 * 2 + 0.5 * 2.5 = 3.25; theta_1 = 0 * 2 + 2 * 2.5 = 5
    assert torch.equal(master[0].conv.weight.flatten(), torch.tensor([3.25, 5.0]))
    assert torch.equal(master[1].conv.weight.flatten(), torch.tensor([5.0, 6.0]))
    assert torch.equal(bank.layer("1")[0].flatten(), torch.tensor([9.0, 9.0]))


def test_identity_relevance_adds_the_delta_exactly():
    master = _one_by_one_layer([1.0, 2.0, 3.0])
    bank = build_bank(master, noise_std=0.0)
    update_bank_and_master(master, bank, {"0": (torch.tensor([2, 0]), torch.tensor([0.5, -1.0]).view(2, 1, 1, 1))})
    assert torch.equal(master[0].conv.weight.flatten(), torch.tensor([0.0, 2.0, 3.5]))


def test_bad_deltas_raise_and_change_nothing():
    master = _one_by_one_layer([1.0, 2.0])
    bank = build_bank(master)
    before = master[0].conv.weight.clone(), bank.layer("0")[0].clone()
    good = ([0], torch.ones(1, 1, 1, 1))
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        update_bank_and_master(master, bank, {"0": good, "nope": good})
    with pytest.raises(ValueError, match="indices"):
        update_bank_and_master(master, bank, {"0": ([2], torch.ones(1, 1, 1, 1))})
    with pytest.raises(ValueError, match="indices"):
        update_bank_and_master(master, bank, {"0": ([0, 0], torch.ones(2, 1, 1, 1))})
    with pytest.raises(ValueError, match="shape"):
        update_bank_and_master(master, bank, {"0": ([0], torch.ones(1, 2, 1, 1))})
    assert torch.equal(master[0].conv.weight, before[0]) and torch.equal(bank.layer("0")[0], before[1])
    with pytest.raises(ValueError, match="another network"):
        bank_loss(_cpu_master(), bank)
    with pytest.raises(ValueError, match="relevance must be 2x2"):
        DomainKnowledgeBank({"0": (torch.ones(2, 1, 1, 1), torch.eye(3))})


def test_sync_makes_bank_loss_zero_and_eq4_a_no_op():
    master = _cpu_master(width=4)
    bank = build_bank(master, noise_std=0.05)
    assert float(bank_loss(master, bank).detach()) > 1e-4
    filters = {k: v.clone() for k, v in master.state_dict().items()}
    sync_master_to_bank(master, bank)
    assert all(torch.equal(v, filters[k]) for k, v in master.state_dict().items())  # the master is kept
    assert float(bank_loss(master, bank).detach()) < 1e-10  # the bank now reproduces it (float rounding)
    unit = master.stages[2][1].conv1
    before = unit.conv.weight.clone()
    update_bank_and_master(master, bank, {"stages.2.1.conv1": ([3], torch.zeros(1, *before.shape[1:]))})
    assert torch.allclose(unit.conv.weight, before, atol=1e-6)


# --------------------------------------------------------------------------- pre-training
def _pretrain_once(seed=0, **kwargs):
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    master = _cpu_master(width=4)
    bank = build_bank(master, seed=0)
    history = pretrain_master(master, bank, x, y, epochs=2, lr=1e-2, batch_size=16, seed=seed, **kwargs)
    return master, bank, history


def test_pretraining_is_deterministic_and_ends_synced():
    (m1, b1, h1), (m2, _, h2) = _pretrain_once(), _pretrain_once()
    assert h1 == h2 and len(h1["ce"]) == 2
    assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert all(0.2 <= s <= 1.0 for s in h1["sparsity"]) and h1["gate_l1"][0] > 0
    assert float(bank_loss(m1, b1).detach()) < 1e-10
    assert all(unit.k is None for _, unit in m1.gated_units())
    _, _, h3 = _pretrain_once(seed=1)
    assert h3["ce"] != h1["ce"]


def test_the_sandwich_adds_the_full_master_and_the_smallest_share_to_every_step():
    import numpy as np

    from models.elastic.pretrain import SPARSITY_STREAM
    from models.elastic.surrogate import (
        apply_keep_masks,
        clear_keep_masks,
        gate_relevance,
        hardest_sample,
        select_filters,
    )

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g)
    ce = {}
    for mode in ("none", "largest", "both"):
        master = _cpu_master(width=4)
        history = pretrain_master(master, build_bank(master, seed=0), x, y, epochs=1, lr=1e-2, batch_size=24,
                                  seed=3, sandwich=mode)
        ce[mode] = history["ce"][0]  # one step: the CEs summed are all taken before it

    def masked_ce(model, keep):
        model.set_sparsity(None)
        with torch.no_grad():
            relevance = gate_relevance(model, x[hardest_sample(model, x)])
            apply_keep_masks(model, select_filters(relevance, model.channel_groups(), keep))
            value = float(nn.functional.cross_entropy(model(x), y))
        clear_keep_masks(model)
        return value

    # by hand, in the step's order (train-mode passes move BN's running statistics, which the
    # eval-mode choice of the next mask reads): the drawn share, the full master, then 20 %
    ref = _cpu_master(width=4).train()
    drawn = float(np.random.default_rng([3, SPARSITY_STREAM]).uniform(0.2, 1.0))
    first = masked_ce(ref, drawn)
    with torch.no_grad():
        full = float(nn.functional.cross_entropy(ref(x), y))
    smallest = masked_ce(ref, 0.2)
    assert ce["none"] == pytest.approx(first, rel=1e-5)
    assert ce["largest"] == pytest.approx(first + full, rel=1e-5)
    assert ce["both"] == pytest.approx(first + full + smallest, rel=1e-5)
    with pytest.raises(ValueError, match="sandwich"):
        pretrain_master(ref, build_bank(ref), x, y, epochs=1, lr=1e-2, batch_size=24, seed=0, sandwich="smallest")


def test_pretraining_rejects_bad_arguments():
    master = _cpu_master(width=4)
    bank = build_bank(master)
    x, y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    common = dict(epochs=1, lr=1e-2, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="sparsity_range"):
        pretrain_master(master, bank, x, y, sparsity_range=(0.8, 0.2), **common)
    with pytest.raises(ValueError, match="sparsity_range bound"):
        pretrain_master(master, bank, x, y, sparsity_range=(0.0, 1.0), **common)
    with pytest.raises(ValueError, match="same number"):
        pretrain_master(master, bank, x, y[:3], **common)
    with pytest.raises(ValueError, match="optimizer"):
        pretrain_master(master, bank, x, y, optimizer="rmsprop", **common)
