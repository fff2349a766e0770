"""The AN supernet: paths, extraction, measured path costs, sandwich pre-training."""

import numpy as np
import pytest
import torch
from torch import nn

from models.catalog import build_model
from models.costs import parameter_bytes, train_flops_per_sample, training_memory_bytes
from models.multibranch.net import MultiBranchNet, StageSpec, SupernetSpec
from models.multibranch.training import sandwich_paths, train_supernet
from models.training import TrainSettings

torch.set_num_threads(1)
SHAPE = (3, 32, 32)


def _cnn(width=4, seed=0):
    torch.manual_seed(seed)
    return build_model("multibranch_cnn", num_classes=10, width=width)


def _perturb_batchnorm(net, seed=1):
    """Give every BatchNorm non-trivial statistics and affine weights (as after training)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def test_cnn_supernet_has_36_paths_with_a_skip_branch_only_where_shapes_allow():
    net = _cnn()
    assert isinstance(net, MultiBranchNet)
    assert net.num_branches == (3, 3, 4)  # x1, x0.5, x0.25 (+ skip in the shape-keeping last stage)
    assert len(net.all_paths()) == 36
    assert net.largest_path() == (0, 0, 0) and net.smallest_path() == (2, 2, 3)
    assert [net.branch_label(2, b) for b in range(4)] == ["x1", "x0.5", "x0.25", "skip"]


def test_resnet18_supernet_layout():
    torch.manual_seed(0)
    net = build_model("multibranch_resnet18", num_classes=10, width=4)
    # 8 basic blocks; the 5 with identity shortcuts (both of layer1, the second of layers 2-4) may be skipped
    assert net.num_branches == (4, 4, 3, 4, 3, 4, 3, 4)
    assert len(net.all_paths()) == 3**3 * 4**5
    assert net(torch.zeros(2, *SHAPE)).shape == (2, 10)


@pytest.mark.parametrize("name", ["multibranch_cnn", "multibranch_resnet18"])
def test_extracted_path_equals_supernet_path_and_shares_no_tensor(name):
    torch.manual_seed(0)
    net = _perturb_batchnorm(build_model(name, num_classes=10, width=4)).eval()
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(0)
    every = net.all_paths()
    paths = [net.largest_path(), net.smallest_path()] + [every[i] for i in rng.choice(len(every), 3)]
    for path in paths:
        sub = net.extract(path).eval()
        torch.testing.assert_close(sub(x), net(x, path), rtol=0, atol=0)
    sub = net.extract(net.largest_path())
    supernet_tensors = {t.data_ptr() for t in net.state_dict().values()}
    assert not any(t.data_ptr() in supernet_tensors for t in sub.state_dict().values())


def test_default_forward_is_the_largest_path():
    net = _perturb_batchnorm(_cnn()).eval()
    x = torch.randn(2, *SHAPE)
    assert torch.equal(net(x), net(x, (0, 0, 0)))


def test_smallest_path_costs_worked_out_by_hand():
    cost = _cnn(width=4).path_cost((2, 2, 3), batch_size=16)
    # bytes: stem conv 3->4 (108) + BN4 (16 floats + 8 B counter) = 504 B;
    # stage A x0.25 (hidden 2): conv 4->2 (72) BN2 (8) conv 2->8 (144) BN8 (32) = 256 floats + 2 counters = 1040 B;
    # stage B x0.25 (hidden 4): conv 8->4 (288) BN4 (16) conv 4->16 (576) BN16 (64) = 944 floats + 16 B = 3792 B;
    # stage C skip: 0; head linear 16->10: 170 floats = 680 B.  Total 6016 B.
    assert cost.bytes == 504 + 1040 + 3792 + 0 + 680
    # train FLOPs = 2 MACs forward + 2 MACs grad-weight (+ 2 MACs grad-input after the first layer):
    # stem 3*4*9*1024 MACs x 4 = 442368; A: 4*2*9*256 x 6 + 2*8*9*256 x 6 = 331776;
    # B: 8*4*9*64 x 6 + 4*16*9*64 x 6 = 331776; head 160 x 6 = 960.
    assert cost.flops_per_sample == 442368 + 331776 + 331776 + 960


@pytest.mark.parametrize("path", [(0, 0, 0), (1, 2, 3), (2, 0, 1), (2, 2, 3)])
def test_path_cost_equals_the_costs_measured_on_the_extracted_network(path):
    net = _cnn(width=4)
    sub = net.extract(path)
    cost = net.path_cost(path, batch_size=8)
    assert cost.bytes == parameter_bytes(sub)
    assert cost.flops_per_sample == train_flops_per_sample(sub, SHAPE)
    assert cost.train_memory_bytes == training_memory_bytes(sub, SHAPE, 8)


def test_path_costs_are_ordered_and_the_skip_branch_is_free():
    net = _cnn(width=8)
    costs = {p: net.path_cost(p, batch_size=16) for p in net.all_paths()}
    for field in range(3):
        values = [c[field] for c in costs.values()]
        assert costs[net.largest_path()][field] == max(values)
        assert costs[net.smallest_path()][field] == min(values)
    assert parameter_bytes(net.stages[2][3]) == 0  # the skip branch has no parameters
    full, skip = costs[(0, 0, 0)], costs[(0, 0, 3)]
    assert full.bytes - skip.bytes == parameter_bytes(net.stages[2][0])
    assert skip.flops_per_sample < full.flops_per_sample
    # memory grows with the batch (activations), bytes and FLOPs do not
    big = net.path_cost((0, 0, 0), batch_size=32)
    assert big.train_memory_bytes > full.train_memory_bytes and big[:2] == full[:2]


def test_paths_within_limits():
    net = _cnn(width=4)
    mid = net.path_cost((1, 1, 1), batch_size=16)
    fitting = net.paths_within(16, mid.train_memory_bytes, mid.flops_per_sample)
    assert (1, 1, 1) in fitting and (0, 0, 0) not in fitting
    for path in fitting:
        cost = net.path_cost(path, 16)
        assert cost.train_memory_bytes <= mid.train_memory_bytes and cost.flops_per_sample <= mid.flops_per_sample
    smallest = net.path_cost(net.smallest_path(), 16)
    assert net.paths_within(16, smallest.train_memory_bytes - 1) == []
    assert len(net.paths_within(16, float("inf"))) == 36


def test_bad_paths_and_specs_raise_clear_errors():
    net = _cnn()
    with pytest.raises(ValueError, match="3 stages"):
        net((torch.zeros(1, *SHAPE)), (0, 0))
    with pytest.raises(ValueError, match="stage 0 has branches 0..2, got 3"):
        net.check_path((3, 0, 0))
    with pytest.raises(ValueError, match="chain the stages"):
        SupernetSpec(3, 10, 4, (StageSpec(8, 8),))
    with pytest.raises(ValueError, match="widest first"):
        SupernetSpec(3, 10, 4, (StageSpec(4, 4),), width_ratios=(0.5, 1.0))


def test_sandwich_paths_are_largest_smallest_then_seeded_random():
    net = _cnn()
    paths = sandwich_paths(net, np.random.default_rng(0), random_paths=2)
    assert paths[:2] == [(0, 0, 0), (2, 2, 3)] and len(paths) == 4
    assert paths == sandwich_paths(net, np.random.default_rng(0), random_paths=2)
    assert len(sandwich_paths(net, np.random.default_rng(0), random_paths=1, sandwich=False)) == 1
    with pytest.raises(ValueError, match="trains no path"):
        sandwich_paths(net, np.random.default_rng(0), random_paths=0, sandwich=False)


def _separable(n=32, seed=0):
    """Two classes whose images differ by a constant offset: +1 or -1 on every pixel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, *SHAPE, generator=g) * 0.5 + (2.0 * y - 1.0).view(-1, 1, 1, 1)
    return x, y


def _mean_path_loss(net, x, y):
    net.eval()
    with torch.no_grad():
        return float(np.mean([nn.functional.cross_entropy(net(x, p), y).item() for p in net.all_paths()]))


def test_train_supernet_is_deterministic_by_seed_and_lowers_every_paths_loss():
    x, y = _separable()
    settings = TrainSettings(epochs=3, lr=1e-2, batch_size=8)
    nets = [_cnn(width=4, seed=0) for _ in range(3)]
    before = _mean_path_loss(nets[0], x, y)
    train_supernet(nets[0], x, y, settings, seed=5)
    train_supernet(nets[1], x, y, settings, seed=5)
    train_supernet(nets[2], x, y, settings, seed=6)
    a, b, c = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert _mean_path_loss(nets[0], x, y) < 0.5 * before


def test_train_supernet_rejects_a_plain_network_and_handles_no_data():
    settings = TrainSettings(epochs=1, lr=1e-3, batch_size=4)
    with pytest.raises(ValueError, match="multibranch"):
        plain = build_model("cnn", num_classes=10, width=4)
        train_supernet(plain, torch.zeros(2, *SHAPE), torch.zeros(2).long(), settings, 0)
    assert np.isnan(train_supernet(_cnn(), torch.zeros(0, *SHAPE), torch.zeros(0).long(), settings, 0))
