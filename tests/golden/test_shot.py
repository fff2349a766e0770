"""SHOT in ElasticDNN's retraining against the official code (tim-learn/SHOT), on identical tensors.

Fixtures from ``python -m tests.golden.make_shot``: information maximisation (value and gradient),
SHOT's objective with its pseudo-labels, ``obtain_label`` of both SHOT scripts, and one whole
official ``train_target`` step (pseudo-labels in eval mode, SGD with Nesterov momentum and weight
decay) against the project's :func:`~models.elastic.retrain.adapt_full`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.elastic.losses import shot_loss, shot_pseudo_labels
from models.elastic.modes import retraining_mode
from models.elastic.objective import RetrainingObjective
from models.elastic.retrain import adapt_full
from models.losses import information_maximisation
from tests.golden.fixture import check, exact, load
from tests.golden.nets import TinyBNNet, load_state

# The fixtures' tiny network (tests/golden/make_shot.py): 4 channels, 3 classes.
CHANNELS, CLASSES = 4, 3
# SHOT takes log(p + 1e-5) (tim-learn/SHOT loss.Entropy, image_target.py --epsilon), the project
# the exact p log p. Since p log(1 + eps / p) <= eps, each entropy moves by at most C * eps and
# the IM value (a difference of two such entropies) by at most C * eps: the honest bound.
SHOT_EPSILON = 1e-5
IM_EPSILON_BOUND = CLASSES * SHOT_EPSILON


def _net(fixture) -> TinyBNNet:
    return load_state(TinyBNNet(CHANNELS, CLASSES), fixture.arrays, "initial")


def _logits_loss_and_grad(loss_fn, fixture, *args):
    logits = torch.from_numpy(fixture["logits"]).requires_grad_(True)
    loss = loss_fn(logits, *args)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("name, loss_tolerance", [("shot_im", None),
                                                  ("shot_im_sharp", IM_EPSILON_BOUND)])
def test_information_maximisation_value_and_gradient_match_shot(name, loss_tolerance):
    fixture = load(name)
    loss, grad = _logits_loss_and_grad(information_maximisation, fixture)
    kind = "confident" if loss_tolerance else "typical"
    check(fixture, loss, "loss", f"IM loss (entropy - diversity), {kind} logits",
          tolerance=loss_tolerance)
    check(fixture, grad, "grad_logits", f"IM gradient w.r.t. the logits, {kind} logits")


def test_shot_objective_value_and_gradient_match_shot():
    fixture = load("shot_loss")
    labels = torch.from_numpy(fixture["labels"])
    loss, grad = _logits_loss_and_grad(shot_loss, fixture, labels)
    check(fixture, loss, "loss", "IM + 0.3 CE(pseudo-labels) on a batch's logits")
    check(fixture, grad, "grad_logits", "SHOT objective gradient w.r.t. the logits")


def test_pseudo_labels_are_computed_in_eval_mode_as_shot_does():
    fixture = load("shot_loss")
    assert not fixture["label_bn_training"].any()  # SHOT: netF.eval(); netB.eval()
    assert not np.array_equal(fixture["labels"], fixture["labels_batch_statistics"])
    net = _net(fixture)
    objective = RetrainingObjective(net, "shot", None, None)
    with retraining_mode(net):  # where the retraining loop refreshes the labels
        objective.refresh(torch.from_numpy(fixture["x"]))
    exact(fixture, objective.pseudo_labels, "labels",
          "pseudo-labels of the retraining loop (eval-mode network, running BN statistics)")


@pytest.mark.parametrize("name, loss", [("shot_im", "im"), ("shot_im_sharp", "im"),
                                        ("shot_loss", "shot")])
def test_one_retraining_step_matches_shots_train_target(name, loss):
    fixture = load(name)
    net, x = _net(fixture), torch.from_numpy(fixture["x"])
    before = _flat_state(net)
    adapt_full(net, x, loss=loss, epochs=1, lr=float(fixture["lr"]), batch_size=len(x))
    check(fixture, _flat_state(net), "after",
          f"whole state (weights, BN running statistics) after one {loss} SGD step")
    moved = np.abs(fixture["after"] - before).max()
    assert moved > 100 * fixture.tolerance  # the step moves the weights far beyond the tolerance


def _flat_state(net) -> np.ndarray:
    return torch.cat([v.detach().double().flatten() for v in net.state_dict().values()]).numpy()


@pytest.mark.parametrize("version", ["digit", "object"])
def test_pseudo_labels_match_obtain_label(version):
    fixture = load(f"shot_obtain_label_{version}")
    cases = sorted({key.split("/")[0] for key in fixture.arrays})
    for case in cases:
        labels = shot_pseudo_labels(torch.from_numpy(fixture[f"{case}/features"]),
                                    torch.from_numpy(fixture[f"{case}/logits"]))
        exact(fixture, labels, f"{case}/labels",
              f"obtain_label ({version} script) pseudo-labels, {case}")
