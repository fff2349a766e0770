"""ECLM 4.3 cloud training on a real modular network: the load matrix and the fine-tuning loss.

A modular MLP (one layer of 4 modules, top-2, m3 the residual bypass) whose selector is set by
hand: the embedding is the identity on the 9 input features, so an input that is one-hot in
feature f gets the head's column f as logits and is routed to a known pair of modules. The
ten samples of tests/golden/test_ability.py then give its hand-worked H.
"""

import copy
import math

import numpy as np
import pytest
import torch

from models.eclm.ability import load_matrix
from models.eclm.families import build_modular
from models.eclm.selector import noisy_top_k
from models.eclm.training import AbilitySettings, load_matrices, routing_targets, train_ability
from models.training import TrainSettings
from tests.golden.test_ability import G_LABEL_HAND, H_HAND, ROUTED

torch.set_num_threads(1)

#: Head column per routed pair: the two modules get logits 3 and 2, the others 0 and -1.
PAIRS = {(0, 1): [3, 2, 0, -1], (0, 2): [3, 0, 2, -1], (1, 2): [-1, 3, 2, 0], (1, 3): [-1, 3, 0, 2],
         (2, 3): [-1, 0, 2, 3], (0, 3): [2, -1, 0, 3]}
FEATURES = 9  # 1 channel x 3 x 3
SUBTASKS = [(0,), (1,), (2,)]  # class t is sub-task t


def _hand_routed_net():
    net = build_modular("modular_mlp", num_classes=3, width=4, in_channels=1, modules_per_layer=4,
                        image_size=3, embed_dim=FEATURES, k=2)
    with torch.no_grad():
        embed = net.selector.embed[1]
        embed.weight.copy_(torch.eye(FEATURES))
        embed.bias.zero_()
        head = net.selector.heads[0]
        head.weight.zero_()
        head.bias.zero_()
        for f, column in enumerate(PAIRS.values()):
            head.weight[:, f] = torch.tensor(column, dtype=torch.float32)
    return net


def _samples():
    """The ten samples: one-hot in the feature of their pair; labels = sub-task."""
    features = list(PAIRS)
    x = torch.zeros(len(ROUTED), 1, 3, 3)
    for row, (_, pair) in enumerate(ROUTED):
        x.view(len(ROUTED), -1)[row, features.index(pair)] = 1.0
    return x, torch.tensor([t for t, _ in ROUTED])


def test_load_matrix_of_the_network_counts_its_clean_top_k_routing():
    net, (x, y) = _hand_routed_net(), _samples()
    net.train()  # the measurement must not use training noise whatever mode the model is in
    (H,) = load_matrices(net, x, y.numpy(), 3)
    np.testing.assert_allclose(H, H_HAND, atol=1e-12)
    # the dense softmax mass of the same samples is another matrix (what the paper does not use)
    with torch.no_grad():
        probs = torch.softmax(net.selector(x)[0], dim=1).numpy()
    mass = np.zeros((3, 4))
    np.add.at(mass, y.numpy(), probs)
    assert not np.allclose(mass / mass.sum(axis=1, keepdims=True), H_HAND, atol=1e-2)


def test_routing_targets_are_the_hand_worked_g_label():
    net, (x, y) = _hand_routed_net(), _samples()
    ability = AbilitySettings(epochs=1, kappa1=1, kappa2=2, kl_weight=1.0, load_balance=False)
    (target,) = routing_targets(net, x, y.numpy(), 3, ability)
    np.testing.assert_allclose(target.numpy(), G_LABEL_HAND, atol=1e-7)


def _loss(net, x, y, kl_weight, load_balance):
    """train_ability's loss on one batch holding every sample, with lr 0 (the weights do not move)."""
    model = copy.deepcopy(net)
    ability = AbilitySettings(epochs=1, kappa1=1, kappa2=2, kl_weight=kl_weight, load_balance=load_balance)
    settings = TrainSettings(epochs=1, lr=0.0, batch_size=len(y))
    loss = train_ability(model, x, y, SUBTASKS, 3, settings, ability, seed=3)
    return loss, model


def test_fine_tuning_loss_is_ce_plus_lambda_kl_and_load_balance_only_as_an_option():
    net, (x, y) = _hand_routed_net(), _samples()
    plain, _ = _loss(net, x, y, kl_weight=0.0, load_balance=False)
    with_kl, _ = _loss(net, x, y, kl_weight=0.5, load_balance=False)
    with_lb, model = _loss(net, x, y, kl_weight=0.5, load_balance=True)
    # KL(g_label || g) by hand: g = softmax of the sample's logit column, g_label its sub-task's row
    kl = 0.0
    for t, pair in ROUTED:
        g = np.exp(PAIRS[pair]) / np.exp(PAIRS[pair]).sum()
        label = G_LABEL_HAND[t]
        kl += sum(p * math.log(p / q) for p, q in zip(label, g) if p > 0)
    kl /= len(ROUTED)
    assert with_kl - plain == pytest.approx(0.5 * kl, abs=1e-6)
    # the option adds exactly the model's load-balancing term of that forward pass, nothing by default
    balance = float(model.last_routing.load_balance_loss.detach())
    assert balance > 0 and with_lb - with_kl == pytest.approx(balance, abs=1e-6)


def test_load_matrices_route_like_the_eval_forward_pass():
    net, (x, _) = _hand_routed_net(), _samples()
    net.eval()
    with torch.no_grad():
        net(x)
    forward_gates = net.last_routing.gates[0]
    layer = net.layers[0]
    gates, _, _ = noisy_top_k(net.selector(x)[0], None, layer.k, False, layer.active)
    assert torch.equal(gates > 0, forward_gates > 0)
    np.testing.assert_allclose(load_matrix(forward_gates.detach(), np.array([t for t, _ in ROUTED]), 3), H_HAND)
