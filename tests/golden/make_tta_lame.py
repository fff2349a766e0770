"""LAME fixtures from the official code (fiveai/LAME ``src/adaptation/lame.py``).

``lame_knn``, ``lame_rbf``, ``lame_linear``
    What ``LAME.run_step`` computes after the network's forward, on fixed penultimate features
    (16 x 8) and logits (16 x 5): ``unary = -log(softmax + 1e-10)``, the L2-normalised features'
    affinity (``kNN_affinity``, ``rbf_affinity`` or ``linear_affinity``; knn 5, sigma 1.0 as
    ``overall_best.yaml``) and ``laplacian_optimization``'s refined assignment Y.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tests.golden.fixture import save
from tests.golden.tta_harness import CLASSES, TOLERANCE, load_module, package, source

REPOSITORY = "fiveai/LAME"
# configs/method/best/LAME/overall_best.yaml: LAME_KNN 5, LAME_SIGMA 1.0.
KNN, SIGMA = 5, 1.0
SAMPLES, DIMENSIONS, SEED, LOGIT_SCALE = 16, 8, 71, 2.0
AFFINITIES = {"knn": "kNN_affinity", "rbf": "rbf_affinity", "linear": "linear_affinity"}
NOTES = ("src/adaptation's package __init__ (the detectron-style framework) is not run; .non_adaptive and .build "
         "are stand-ins (a base class object, a registry whose register() returns the class). The network's "
         "forward is replaced by the fixture's features and logits.")


def write(root: Path, commit: str, produced_by: str) -> list[Path]:
    """Run the checkout's LAME functions with each affinity; write the three fixtures."""
    lame = _load(root / "src" / "adaptation")
    rng = np.random.default_rng(SEED)
    features = torch.from_numpy(rng.normal(0, 1, (SAMPLES, DIMENSIONS))).float()
    logits = torch.from_numpy(rng.normal(0, LOGIT_SCALE, (SAMPLES, CLASSES))).float()
    written = []
    for name, cls in AFFINITIES.items():
        unary = -torch.log(logits.softmax(-1) + 1e-10)
        kernel = getattr(lame, cls)(sigma=SIGMA, knn=KNN)(F.normalize(features, p=2, dim=-1))
        assignment = lame.laplacian_optimization(unary, kernel)
        arrays = {"features": features.numpy(), "logits": logits.numpy(), "knn": np.int64(KNN),
                  "kernel": kernel.numpy(), "assignment": assignment.numpy()}
        info = source(REPOSITORY, commit, produced_by, "src/adaptation/lame.py",
                      f"LAME.run_step after the forward ({cls}, laplacian_optimization)", TOLERANCE, NOTES)
        written.append(save(f"lame_{name}", arrays, info))
    return written


def _load(directory: Path) -> types.ModuleType:
    name = "golden_ref_lame"
    package(name, directory)
    base = types.ModuleType(f"{name}.non_adaptive")
    base.NonAdaptiveMethod = object
    registry = types.ModuleType(f"{name}.build")
    registry.ADAPTER_REGISTRY = types.SimpleNamespace(register=lambda: (lambda cls: cls))
    return load_module(f"{name}.lame", directory / "lame.py",
                       stubs={base.__name__: base, registry.__name__: registry})
