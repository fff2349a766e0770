"""ONDA's two-pass fixture from mariodoebler/test-time-adaptation (``classification/methods/bn.py``).

``onda_two_pass``
    ``EMABatchNorm`` (the ``norm_ema`` configuration; ``BNEMA`` wraps the model with it) over three
    batches: a train-mode forward folds each batch into the BN running statistics with the layers'
    momentum (PyTorch's 0.1), an eval-mode forward predicts. The logits of each batch and the
    running statistics after the last.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from tests.golden.fixture import save
from tests.golden.nets import state_arrays
from tests.golden.tta_harness import (
    MULTI_STEP_TOLERANCE,
    batches,
    load_module,
    net,
    running_statistics,
    source,
)

REPOSITORY = "mariodoebler/test-time-adaptation"
NET_SEED, IMAGE_SEED, BATCHES, BATCH = 14, 25, 3, 16
NOTES = ("methods/bn.py is loaded on its own (it imports torch only); BNEMA's TTAMethod base (configuration, "
         "registry) is not run, EMABatchNorm.adapt_model wraps the network as BNEMA.configure_model does.")


def write(root: Path, commit: str, produced_by: str) -> list[Path]:
    """Run the checkout's ``EMABatchNorm``; write ``onda_two_pass``."""
    bn = load_module("golden_ref_tta_bn", root / "classification" / "methods" / "bn.py")
    x = batches(IMAGE_SEED, BATCHES, BATCH)
    initial = net(NET_SEED)
    model = copy.deepcopy(initial).eval()
    model.requires_grad_(False)
    wrapped = bn.EMABatchNorm.adapt_model(model)
    with torch.no_grad():
        logits = torch.stack([wrapped(batch) for batch in x])
    arrays = {"x": x.numpy(), **state_arrays(initial, "init"), "logits": logits.numpy(),
              **running_statistics(model, "after")}
    info = source(REPOSITORY, commit, produced_by, "classification/methods/bn.py",
                  "EMABatchNorm.forward (BNEMA, cfgs/*/norm_ema.yaml)", MULTI_STEP_TOLERANCE, NOTES)
    return [save("onda_two_pass", arrays, info)]
