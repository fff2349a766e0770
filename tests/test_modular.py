"""ECLM modular networks: layout, module ids, extract/merge, costs, determinism (models/modular*.py)."""

import pytest
import torch

from models.catalog import build_model
from models.costs import parameter_bytes
from models.eclm.costs import ModuleCost
from models.eclm.families import build_modular
from models.eclm.layer import module_of_key, parse_module_id
from models.eclm.modular import ModularNet

torch.set_num_threads(1)

FAMILY_LAYOUT = {  # ECLM 7.1: module layers x modules per layer
    "modular_mlp": [16],
    "modular_resnet18": [16] * 4,
    "modular_vgg16": [32] * 3,
    "modular_resnet34": [32] * 3,
}


def _small(name="modular_resnet18", **kw) -> ModularNet:
    """A fast test network: narrow, few modules per layer."""
    return build_modular(name, num_classes=10, width=kw.pop("width", 8), modules_per_layer=kw.pop("n", 4), **kw)


def _two_per_layer(net: ModularNet, extra=()) -> list[str]:
    return [f"l{l}.m{i}" for l in range(len(net.layers)) for i in (0, 1, *extra)]


def _images(batch=6, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- layout and ids
@pytest.mark.parametrize("name", sorted(FAMILY_LAYOUT))
def test_family_layout_and_registry(name):
    net = build_model(name, num_classes=10, width=8)
    assert isinstance(net, ModularNet)
    assert net.layer_sizes() == FAMILY_LAYOUT[name]
    assert len(net.module_ids()) == sum(FAMILY_LAYOUT[name])
    kinds = net.module_kinds()
    last = [f"l{l}.m{n - 1}" for l, n in enumerate(FAMILY_LAYOUT[name])]
    assert all(kinds[mid] == "residual" for mid in last)  # one bypass per layer, ids last
    assert sum(k == "residual" for k in kinds.values()) == len(last)
    assert net(_images(2)).shape == (2, 10)
    assert net.config["name"] == name


def test_module_of_key_on_real_keys():
    net = _small()
    held = set(net.module_ids())
    owners = {module_of_key(k) for k in net.state_dict()}
    assert owners - {None} <= held
    kinds = net.module_kinds()
    # every shrunk module owns keys, residual modules none
    assert {m for m in held if kinds[m] == "shrunk"} == owners - {None}
    assert module_of_key("layers.2.modules.m3.0.conv1.0.weight") == "l2.m3"
    assert module_of_key("layers.12.modules.m31.1.weight") == "l12.m31"
    for shared in ("layers.2.active", "selector.heads.0.weight", "trunk.0.0.weight", "head.2.bias"):
        assert module_of_key(shared) is None
    shared_keys = [k for k in net.state_dict() if module_of_key(k) is None]
    assert all(k.split(".")[0] in {"selector", "trunk", "head", "layers"} for k in shared_keys)
    assert all(k.endswith(".active") for k in shared_keys if k.startswith("layers."))


def test_parse_module_id():
    assert parse_module_id("l3.m15") == (3, 15)
    for bad in ("l3m15", "m1.l0", "l-1.m0", "", 3):
        with pytest.raises(ValueError, match="bad module id"):
            parse_module_id(bad)


# ----------------------------------------------------------------------------- routing
def test_forward_routes_exactly_k_per_sample_per_layer():
    net = _small(n=6)
    for training in (True, False):
        net.train(training)
        net(_images(8))
        for gates in net.last_routing.gates:
            assert ((gates != 0).sum(1) == 2).all()
            assert torch.allclose(gates.sum(1), torch.ones(8))
    assert net.last_routing.load_balance_loss.item() >= 0


def test_submodel_routes_only_among_its_modules():
    net = _small(n=6)
    ids = ["l0.m1", "l0.m4", "l0.m5", "l1.m0", "l1.m2", "l2.m3", "l3.m0", "l3.m1", "l3.m2"]
    sub = net.extract(ids)
    sub.train()
    sub(_images(8))
    for l, gates in enumerate(sub.last_routing.gates):
        held = sub.layers[l].active
        assert (gates[:, ~held] == 0).all()
        assert ((gates != 0).sum(1) == min(2, int(held.sum()))).all()


def test_gate_probs_is_clean_softmax_over_active_modules():
    net = _small(n=6)
    sub = net.extract(["l0.m0", "l0.m2", "l1.m1", "l2.m5", "l3.m3", "l3.m4"])
    x = _images(5)
    for model in (net, sub):
        probs = model.gate_probs(x)
        logits = model.selector(x)
        for layer, p, lg in zip(model.layers, probs, logits):
            assert torch.allclose(p.sum(1), torch.ones(5))
            assert (p[:, ~layer.active] == 0).all()
            expected = torch.softmax(lg[:, layer.active], dim=1)
            assert torch.allclose(p[:, layer.active], expected)
    assert torch.equal(sub.gate_probs(x)[2][:, 5], torch.ones(5))  # a single held module gets everything


def test_training_step_reaches_selector_and_routed_modules_only():
    net = _small(n=6)
    net.train()
    logits = net(_images(8))
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(8) % 10) + net.last_routing.load_balance_loss
    loss.backward()
    assert net.selector.heads[0].weight.grad.abs().sum() > 0
    assert net.selector.noise_heads[0].weight.grad is not None  # via the smooth load estimator
    for l, (layer, gates) in enumerate(zip(net.layers, net.last_routing.gates)):
        used = set((gates != 0).any(0).nonzero().flatten().tolist())
        for i in layer.held():
            if i in layer.residual:
                continue
            grad = layer.module_dict[f"m{i}"].parameters().__next__().grad
            assert (grad is not None) == (i in used), f"l{l}.m{i}"
            assert grad is None or torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- extract / merge
def test_extract_is_physically_smaller_and_matches_restricted_full_model():
    net = _small(n=6)
    net.train()
    for seed in range(3):  # move BatchNorm statistics away from their initial values
        net(_images(8, seed))
    ids = _two_per_layer(net, extra=(5,))
    sub = net.extract(ids)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(sub) < n_params(net)
    assert sub.module_ids() == sorted(ids, key=parse_module_id)
    assert sub.layer_sizes() == net.layer_sizes()
    assert set(sub.state_dict()) < set(net.state_dict())
    assert all("m2" not in layer.module_dict for layer in sub.layers)
    net.eval()
    sub.eval()
    net.set_active(ids)
    x = _images(7, seed=9)
    assert torch.allclose(net(x), sub(x), atol=1e-6)


def test_extract_copies_tensors():
    net = _small()
    sub = net.extract(_two_per_layer(net))
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)
    assert not torch.equal(sub.head[-1].weight, net.head[-1].weight)
    assert net.module_ids() == [f"l{l}.m{i}" for l in range(4) for i in range(4)]  # full model untouched


def test_merge_round_trip_changes_exactly_the_sub_models_tensors():
    net = _small(n=6)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sub = net.extract(["l0.m0", "l0.m3", "l1.m5", "l2.m1", "l3.m2", "l3.m4"])
    with torch.no_grad():
        for t in sub.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    net.merge(sub)
    theirs = sub.state_dict()
    for key, value in net.state_dict().items():
        if key in theirs and not key.endswith(".active") and value.is_floating_point():
            assert torch.equal(value, theirs[key]), key
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key  # other modules and active masks bit-identical
    changed = {module_of_key(k) for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {None, "l0.m0", "l0.m3", "l2.m1", "l3.m2", "l3.m4"}  # l1.m5 is residual: no tensors


def test_merge_accepts_a_state_dict_and_rejects_foreign_keys():
    net = _small()
    sub = net.extract(_two_per_layer(net))
    state = {k: v + 1 if v.is_floating_point() else v for k, v in sub.state_dict().items()}
    net.merge(state)
    assert torch.equal(net.head[-1].weight, state["head.2.weight"])
    with pytest.raises(ValueError, match="does not exist"):
        net.merge({"layers.0.modules.m99.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        net.merge({"head.2.weight": torch.zeros(3, 3)})


@pytest.mark.parametrize(
    "ids, match",
    [
        (["l0.m0", "l1.m0", "l2.m0", "l3.m9"], "unknown module id 'l3.m9'"),
        (["l0.m0", "l1.m0", "l2.m0", "l7.m0"], "unknown module id 'l7.m0'"),
        (["l0.m0", "l1.m0", "l2.m0"], r"layer\(s\) \[3\] empty"),
        (["l0.m0", "l1.m0", "l2.m0", "layer3"], "bad module id"),
        ("l0.m0", "single string"),
    ],
)
def test_extract_rejects_bad_ids(ids, match):
    net = _small()
    with pytest.raises(ValueError, match=match):
        net.extract(ids)


def test_extract_from_sub_model_needs_held_ids():
    net = _small()
    sub = net.extract(_two_per_layer(net))
    assert sub.extract(["l0.m1", "l1.m0", "l2.m0", "l3.m1"]).module_ids() == ["l0.m1", "l1.m0", "l2.m0", "l3.m1"]
    with pytest.raises(ValueError, match="not held"):
        sub.extract(["l0.m3", "l1.m0", "l2.m0", "l3.m1"])


def test_copy_and_extract_after_a_training_forward():
    import copy
    import pickle

    net = _small()
    net.train()
    net(_images(4))  # last_routing now holds tensors of an autograd graph
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net)), net.extract(_two_per_layer(net))):
        assert clone.last_routing is None
    assert net.last_routing is not None


def test_skeleton_from_config_equals_extract():
    net = _small(seed=3)
    ids = _two_per_layer(net, extra=(3,))
    skeleton = build_modular(**net.config, module_ids=ids)
    extracted = build_modular(**net.config).extract(ids)
    assert list(skeleton.state_dict()) == list(extracted.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(skeleton.state_dict().values(), extracted.state_dict().values()))
    skeleton.load_state_dict(net.extract(ids).state_dict(), strict=True)  # a device loads its arrays strictly


# ----------------------------------------------------------------------------- costs
def test_mlp_module_cost_by_hand():
    # modular_mlp, width 16, shrink 1/4 -> module = Linear(3072, 4) ReLU Linear(4, 16) ReLU.
    net = build_modular("modular_mlp", num_classes=10, width=16, modules_per_layer=4)
    cost = net.module_costs(batch_size=5)["l0.m0"]
    params = 3072 * 4 + 4 + 4 * 16 + 16
    assert cost.bytes == 4 * params
    # forward 2*(3072*4 + 4*16) multiply-adds; backward twice that (weight and input grads)
    assert cost.flops == 6 * (3072 * 4 + 4 * 16)
    # weights + grads + Adam's two moments + 5 samples x saved (input 3072, hidden 4, output 16) floats
    assert cost.memory == 4 * 4 * params + 5 * 4 * (3072 + 4 + 16)
    assert net.module_costs(5)["l0.m3"] == ModuleCost(0.0, 0.0, 0.0)  # residual


def test_costs_positive_residual_zero_and_additive():
    net = _small(n=5)
    costs = net.module_costs(batch_size=16)
    kinds = net.module_kinds()
    for mid, cost in costs.items():
        if kinds[mid] == "residual":
            assert cost == ModuleCost(0.0, 0.0, 0.0)
        else:
            assert cost.bytes > 0 and cost.flops > 0 and cost.memory > cost.bytes
    shared = net.shared_cost(16)
    assert shared.bytes > 0 and shared.flops > 0
    assert parameter_bytes(net) == shared.bytes + sum(c.bytes for c in costs.values())
    ids = _two_per_layer(net, extra=(4,))
    sub = net.extract(ids)
    sub_costs = sub.module_costs(16)
    assert sub_costs == {mid: costs[mid] for mid in ids}  # measured on the module itself
    assert sub.shared_cost(16) == shared
    assert parameter_bytes(sub) == shared.bytes + sum(sub_costs[m].bytes for m in ids)
    assert net.module_costs(32)["l0.m0"].memory > costs["l0.m0"].memory  # activations grow with the batch
    assert (ModuleCost(1, 2, 3) + ModuleCost(10, 20, 30)).as_tuple() == (11, 22, 33)


def test_measuring_costs_leaves_the_network_untouched():
    net = _small()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    net.module_costs(8)
    net.shared_cost(8)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.training and all(p.grad is None for p in net.parameters())


# ----------------------------------------------------------------------------- determinism and errors
def test_same_seed_same_weights_and_routing():
    a, b, c = _small(seed=1), _small(seed=1), _small(seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.head[-1].weight, c.head[-1].weight)
    a.train()
    b.train()
    x = _images(8)
    a(x)
    b(x)
    assert all(torch.equal(g, h) for g, h in zip(a.last_routing.gates, b.last_routing.gates))
    first = [g.clone() for g in a.last_routing.gates]
    a.reseed_noise(1)
    a(x)
    assert all(torch.equal(g, h) for g, h in zip(a.last_routing.gates, first))  # same stream again


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("modular_alexnet", {}, "unknown modular family"),
        ("modular_resnet18", {"shrink": 0.0}, "shrink"),
        ("modular_resnet18", {"modules_per_layer": 2, "residual_per_layer": 2}, "residual_per_layer"),
        ("modular_resnet18", {"k": 0}, "k must be"),
        ("modular_vgg16", {"image_size": 16}, "image_size=16"),
        ("modular_resnet18", {"module_ids": ["l0.m0"]}, "empty"),
        ("modular_mlp", {"module_ids": ["l0.m16"]}, "unknown module id"),
    ],
)
def test_build_rejects_bad_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_modular(name, num_classes=10, width=8, **kwargs)
