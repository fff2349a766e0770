"""Cloud pre-training of the AN multi-branch supernet, and the batch size of a path's BN recalibration.

Cloud pre-training (:func:`train_supernet`) samples paths per step. AdaptiveNet's reference
code (wenh18/AdaptiveNet, ``classification_train.py``) trains one random subnet per step;
following the brief we add the *sandwich rule* of slimmable networks (Yu & Huang, ICCV
2019, "Universally Slimmable Networks", also used by once-for-all and BigNAS): every step
trains the largest path, the smallest path and ``random_paths`` random paths (2 in
US-Nets), summing their gradients before one optimizer step. We use plain cross-entropy on
the labels for every path (no in-place or teacher distillation: AdaptiveNet's first stage
distils from the original pre-trained model, which this project does not have).

The network itself is :class:`models.multibranch.net.MultiBranchNet`. Before a device evaluates
a path, :func:`models.batchnorm.reestimate_bn` recomputes the path's BatchNorm statistics on its
data in batches of :data:`RECALIBRATION_BATCH` (once-for-all, Cai et al., ICLR 2020, section 3.3):
a branch's statistics in the supernet mix the inputs of every path that ran through it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.multibranch.net import BranchPath, MultiBranchNet
from models.training import TrainSettings, run_epochs

#: Random paths per step besides the largest and smallest (US-Nets' sandwich rule: n = 2).
SANDWICH_RANDOM_PATHS = 2
#: Stream tag that separates supernet path draws from other uses of the seed.
SUPERNET_STREAM = 0x5B
#: Batch size of a path's BatchNorm recalibration passes (inference only, no gradients kept; assumption).
RECALIBRATION_BATCH = 64


def sandwich_paths(
    model: MultiBranchNet, rng: np.random.Generator, random_paths: int = SANDWICH_RANDOM_PATHS, sandwich: bool = True
) -> list[BranchPath]:
    """Paths of one training step: largest and smallest (if ``sandwich``), then random ones."""
    if random_paths < 0 or (random_paths == 0 and not sandwich):
        raise ValueError(f"random_paths={random_paths} with sandwich={sandwich} trains no path; use random_paths >= 1")
    paths = [model.largest_path(), model.smallest_path()] if sandwich else []
    for _ in range(random_paths):
        paths.append(tuple(int(rng.integers(n)) for n in model.num_branches))
    return paths


def train_supernet(
    model: MultiBranchNet,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    seed: int,
    *,
    random_paths: int = SANDWICH_RANDOM_PATHS,
    sandwich: bool = True,
) -> float:
    """Cloud pre-training of the supernet by path sampling (the module docstring gives the rule).

    Same signature and return value as :func:`models.training.train_epochs`: batches come
    from :func:`models.training.run_epochs` and paths from ``np.random.default_rng([seed,
    SUPERNET_STREAM])``, so the same call gives the same weights. Each step sums the
    cross-entropy gradients of :func:`sandwich_paths` and takes one optimizer step.

    Returns
    -------
    float
        Mean training loss (over samples and the step's paths) of the last epoch; NaN
        without data or epochs.
    """
    if not isinstance(model, MultiBranchNet):
        raise ValueError(
            f"train_supernet needs a MultiBranchNet, got {type(model).__name__}; use model.name=multibranch_*"
        )
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}; pass matching tensors")
    if len(x) == 0 or settings.epochs <= 0:
        return float("nan")
    rng = np.random.default_rng([int(seed), SUPERNET_STREAM])
    loss_fn = nn.CrossEntropyLoss()

    def step(idx: torch.Tensor) -> float:
        paths = sandwich_paths(model, rng, random_paths, sandwich)
        step_loss = 0.0
        for path in paths:
            loss = loss_fn(model(x[idx], path), y[idx])
            loss.backward()
            step_loss += float(loss.detach())
        return step_loss / len(paths)

    return run_epochs(model, len(x), settings, seed, step)
