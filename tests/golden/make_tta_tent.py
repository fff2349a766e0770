"""Tent and batch-statistics BN adaptation fixtures from the official Tent code (DequanWang/tent).

``tent_cifar``
    ``tent.Tent`` (``configure_model``, ``collect_params``, one step per batch) with the optimiser
    ``cifar10c.py setup_optimizer`` builds for ``cfgs/tent.yaml`` (Adam, lr 1e-3, betas (0.9, 0.999)):
    the logits of two batches and every parameter after them.
``tent_imagenet``
    The same with SGD lr 2.5e-4 momentum 0.9 (the ImageNet setting, mr-eggplant/EATA ``main.py``).
``bn_adapt_batch``
    ``norm.Norm`` (defaults: eps 1e-5, momentum 0.1): the logits of two batches.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tests.golden.fixture import save
from tests.golden.nets import state_arrays
from tests.golden.tta_harness import CLASSES, TOLERANCE, batches, load_module, net, parameters, source

REPOSITORY = "DequanWang/tent"
# Tent: a network confident enough that one step moves it visibly; two batches of 16.
NET_SEED, LOGIT_SCALE, IMAGE_SEED, BATCHES, BATCH = 11, 3.0, 21, 2, 16
# cfgs/tent.yaml (OPTIM.LR 1e-3, BETA 0.9, WD 0); the ImageNet setting: SGD 2.5e-4, momentum 0.9.
ADAM_LR, ADAM_BETAS, SGD_LR, SGD_MOMENTUM = 1e-3, (0.9, 0.999), 2.5e-4, 0.9
NOTES = ("cifar10c.py (which imports robustbench) is not run: the harness builds the optimiser as its "
         "setup_optimizer does. Inputs, initial weights and the expected outputs are in the fixture.")


def write(root: Path, commit: str, produced_by: str) -> list[Path]:
    """Run tent.py and norm.py of the checkout ``root``; write the three fixtures."""
    tent = load_module("golden_ref_tent", root / "tent.py")
    norm = load_module("golden_ref_norm", root / "norm.py")
    x = batches(IMAGE_SEED, BATCHES, BATCH)
    initial = net(NET_SEED, LOGIT_SCALE)
    inputs = {"x": x.numpy(), **state_arrays(initial, "init")}
    written = []
    for name, optimizer in (("tent_cifar", _adam), ("tent_imagenet", _sgd)):
        model = tent.configure_model(copy.deepcopy(initial))
        params, _ = tent.collect_params(model)
        tented = tent.Tent(model, optimizer(params), steps=1, episodic=False)
        logits = torch.stack([tented(batch).detach() for batch in x])
        arrays = {**inputs, "logits": logits.numpy(), **parameters(model, "after")}
        info = source(REPOSITORY, commit, produced_by, "tent.py", f"Tent.forward ({optimizer.__doc__})",
                      TOLERANCE, NOTES)
        written.append(save(name, arrays, info))
    normed = norm.Norm(copy.deepcopy(initial))
    logits = torch.stack([normed(batch).detach() for batch in x])
    info = source(REPOSITORY, commit, produced_by, "norm.py", "Norm.forward (eps 1e-5, momentum 0.1)",
                  TOLERANCE, NOTES)
    written.append(save("bn_adapt_batch", {**inputs, "logits": logits.numpy()}, info))
    assert logits.shape[-1] == CLASSES
    return written


def _adam(params):
    """Adam lr 1e-3, cfgs/tent.yaml"""
    return torch.optim.Adam(params, lr=ADAM_LR, betas=ADAM_BETAS, weight_decay=0.0)


def _sgd(params):
    """SGD lr 2.5e-4 momentum 0.9, the ImageNet setting"""
    return torch.optim.SGD(params, lr=SGD_LR, momentum=SGD_MOMENTUM)
