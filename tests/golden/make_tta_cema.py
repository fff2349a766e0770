"""Fixtures of CEMA's own baselines (chenyaofo/CEMA ``codebase/core/tta/*.py`` at the commit that published them).

The commit that uploaded the code (9a6ef17) holds the baselines the poster's table was run with;
the next commit ("delete unused codes") removed them from the tree, so the writer unpacks the
files of that commit with ``git archive`` from the repository's git directory.

``bn_adapt_mixed``
    ``BNAdaptation.infer`` with ``conf/bn_adapt.conf`` (momentum 0.5): the logits of two batches.
``onda_layerwise``
    ``TEMA.infer`` with ``conf/tema.conf`` (momentum 0.1) over three batches: logits and the
    running statistics after the last.
``pl_cema``
    ``PL.infer`` with ``conf/pl.conf`` (lr 1e-3; SGD momentum 0.9): logits of two batches and every
    parameter after them.
``lame_hook``
    ``LAME.infer`` with ``conf/lame.conf`` (kNN affinity, knn 5): the refined assignment of a batch,
    the features read by its forward pre-hook on the network's last ``nn.Linear``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from tests.golden.fixture import save
from tests.golden.nets import state_arrays
from tests.golden.tta_harness import (
    MULTI_STEP_TOLERANCE,
    TOLERANCE,
    batches,
    extract_commit,
    load_module,
    net,
    package,
    parameters,
    running_statistics,
    source,
)

REPOSITORY = "chenyaofo/CEMA"
TTA_DIR = "codebase/core/tta"
# conf/bn_adapt.conf, conf/tema.conf, conf/pl.conf, conf/lame.conf at that commit.
BN_ADAPT_MOMENTUM, TEMA_MOMENTUM, PL_LR, LAME_KNN, LAME_SIGMA = 0.5, 0.1, 1e-3, 5, 1.0
NET_SEED, PL_SCALE, IMAGE_SEED, BATCH = 15, 3.0, 26, 16
NOTES = ("The files of the commit are unpacked with git archive (the next commit removed them). "
         "codebase.core.tta's package __init__ (which imports modules beside these) is not run; each module "
         "is loaded under its package name.")


def write(git_dir: Path, commit: str, produced_by: str) -> list[Path]:
    """Run the four baselines of ``commit``; write their fixtures."""
    root = extract_commit(git_dir, commit, ["codebase"])
    sys.path.insert(0, str(root))
    package("codebase.core.tta", root / TTA_DIR)
    tta = {name: load_module(f"codebase.core.tta.{name}", root / TTA_DIR / f"{name}.py")
           for name in ("bn_adapt", "tema", "pl", "lame")}
    x = batches(IMAGE_SEED, 3, BATCH)
    initial = net(NET_SEED, PL_SCALE)
    inputs = {"x": x.numpy(), **state_arrays(initial, "init")}
    info = {"repository": REPOSITORY, "commit": commit, "produced_by": produced_by}

    def fixture(name: str, file: str, function: str, tolerance: float, arrays: dict) -> Path:
        entry = source(info["repository"], commit, produced_by, f"{TTA_DIR}/{file}", function, tolerance, NOTES)
        return save(name, {**inputs, **arrays}, entry)

    bn_adapt = tta["bn_adapt"].BNAdaptation(copy.deepcopy(initial), momentum=BN_ADAPT_MOMENTUM)
    tema_model = copy.deepcopy(initial)
    tema = tta["tema"].TEMA(tema_model, momentum=TEMA_MOMENTUM)
    pl = tta["pl"].PL(copy.deepcopy(initial), tta_lr=PL_LR)
    lame = tta["lame"].LAME(copy.deepcopy(initial), knn=LAME_KNN, sigma=LAME_SIGMA)
    return [
        fixture("bn_adapt_mixed", "bn_adapt.py", "BNAdaptation.infer (conf/bn_adapt.conf, momentum 0.5)",
                TOLERANCE, {"logits": torch.stack([bn_adapt.infer(b) for b in x[:2]]).numpy()}),
        fixture("onda_layerwise", "tema.py", "TEMA.infer (conf/tema.conf, momentum 0.1)", MULTI_STEP_TOLERANCE,
                {"logits": torch.stack([tema.infer(b) for b in x]).numpy(),
                 **running_statistics(tema_model, "after")}),
        fixture("pl_cema", "pl.py", "PL.infer (conf/pl.conf, tta_lr 1e-3)", TOLERANCE,
                {"logits": torch.stack([pl.infer(b).detach() for b in x[:2]]).numpy(),
                 **parameters(pl.model, "after")}),
        fixture("lame_hook", "lame.py", "LAME.infer (conf/lame.conf, kNN affinity, knn 5)", TOLERANCE,
                {"assignment": lame.infer(x[0]).numpy()}),
    ]
