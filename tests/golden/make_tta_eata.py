"""ETA fixtures from the official EATA code (mr-eggplant/EATA ``eata.py``, ``fishers=None``: ETA).

``eta_imagenet``
    ``EATA.forward`` with ``main.py``'s ImageNet setting (SGD lr 2.5e-4 momentum 0.9,
    ``e_margin = 0.4 ln C``, ``d_margin`` 0.05) over four batches.
``eta_cifar``
    The same code with the CIFAR-10-C setting of mariodoebler/test-time-adaptation
    ``cfgs/cifar10_c/eta.yaml`` (Adam lr 1e-3, betas (0.9, 0.999), ``D_MARGIN`` 0.4).

Each fixture holds per batch the logits, the reliable mask (``E < E0``), the kept mask (reliable
and non-redundant), the moving average of the kept softmaxes after the batch, and every
parameter after the last batch. The masks are read off the reference's own ``torch.where`` calls
(the module's ``torch`` is a stand-in that records them and is torch otherwise).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch

from tests.golden.fixture import save
from tests.golden.nets import state_arrays
from tests.golden.tta_harness import (
    CLASSES,
    MULTI_STEP_TOLERANCE,
    RecordingTorch,
    batches,
    centred_net,
    load_module,
    parameters,
    source,
)

REPOSITORY = "mr-eggplant/EATA"
# A network with centred, confident logits: predictions spread over the classes and entropies
# straddle E0 = 0.4 ln 5, so both filters keep and drop samples.
NET_SEED, LOGIT_SCALE, IMAGE_SEED, BATCHES, BATCH = 12, 40.0, 22, 4, 16
E_FRACTION = 0.4
SETTINGS = {  # name: (optimizer, d_margin, description)
    "eta_imagenet": (lambda p: torch.optim.SGD(p, 2.5e-4, momentum=0.9), 0.05,
                     "main.py ImageNet setting: SGD lr 2.5e-4 momentum 0.9, d_margin 0.05"),
    "eta_cifar": (lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0), 0.4,
                  "test-time-adaptation cfgs/cifar10_c/eta.yaml: Adam lr 1e-3, D_MARGIN 0.4"),
}
NOTES = ("The module's torch is a stand-in that records the results of torch.where (the filters' indices) "
         "and is torch otherwise; main.py (data loaders) is not run, the harness builds EATA as it does.")


def write(root: Path, commit: str, produced_by: str) -> list[Path]:
    """Run eata.py of the checkout ``root`` in both settings; write the two fixtures."""
    wheres: list[tuple] = []

    def where(*args):
        result = torch.where(*args)
        wheres.append(result)
        return result

    eata = load_module("golden_ref_eata", root / "eata.py")
    eata.torch = RecordingTorch(where=where)
    x = batches(IMAGE_SEED, BATCHES, BATCH)
    initial = centred_net(NET_SEED, LOGIT_SCALE, x)
    written = []
    for name, (optimizer, d_margin, setting) in SETTINGS.items():
        model = eata.configure_model(copy.deepcopy(initial))
        params, _ = eata.collect_params(model)
        adapt = eata.EATA(model, optimizer(params), fishers=None, e_margin=E_FRACTION * math.log(CLASSES),
                          d_margin=d_margin)
        logits, reliable, kept, averages = [], [], [], []
        for batch in x:
            wheres.clear()
            logits.append(adapt(batch).detach())
            reliable_ids = wheres[0][0]
            kept_ids = reliable_ids[wheres[2][0]] if len(wheres) > 2 else reliable_ids
            reliable.append(_mask(reliable_ids))
            kept.append(_mask(kept_ids))
            averages.append(adapt.current_model_probs.numpy().copy())
        arrays = {"x": x.numpy(), **state_arrays(initial, "init"), "logits": torch.stack(logits).numpy(),
                  "reliable": np.stack(reliable), "kept": np.stack(kept), "moving_average": np.stack(averages),
                  "d_margin": np.float64(d_margin), **parameters(model, "after")}
        info = source(REPOSITORY, commit, produced_by, "eata.py", f"EATA.forward, fishers=None ({setting})",
                      MULTI_STEP_TOLERANCE, NOTES)
        written.append(save(name, arrays, info))
    return written


def _mask(indices: torch.Tensor) -> np.ndarray:
    mask = np.zeros(BATCH, dtype=bool)
    mask[indices.numpy()] = True
    return mask
