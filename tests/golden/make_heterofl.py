"""Write the HeteroFL golden fixtures by running the official code on fixed tensors.

``python -m tests.golden.make_heterofl --reference <checkout of diaoenmao/HeteroFL-...> --commit <40-hex>``

Fixtures (inputs, and what the official code computed on them):

``heterofl_combine``
    ``src/fed.py`` ``Federation.distribute`` and ``Federation.combine`` on the official tiny
    ``conv`` model (``src/models/conv.py``): four clients of rates 1, 1/2, 1/4 and 1/8, each
    with its own label set (``label_split``), get their sub-models from ``distribute``; each
    sub-model is then shifted by seeded noise (a stand-in for local training) and ``combine``
    merges them. Recorded (each state flattened in state-dict order, with its keys and shapes):
    the global state before and after, every client's received and returned sub-model, the
    rates and label sets.
``heterofl_masked_loss``
    The label mask of ``Conv.forward`` (``src/models/conv.py``, ``mask: '1'``) on fixed logits:
    the masked scores, the cross-entropy and its gradient with respect to the logits, and the
    official ``Accuracy`` (``src/metrics/metrics.py``) of the masked scores, for two label sets.

The harness around the reference, recorded in every fixture's ``notes``: ``config.py`` reads
``config.yml`` from the checkout's ``src`` (the working directory is switched there while it
is imported), then the entries ``fed.py`` and ``models/conv.py`` read are set (:data:`CFG`);
for the masked loss the model's ``blocks`` are replaced by ``nn.Identity`` so that its forward
receives the fixed logits as its ``img``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.golden.fixture import save

REPOSITORY = "diaoenmao/HeteroFL-Computation-and-Communication-Efficient-Federated-Learning-for-Heterogeneous-Clients"
FED_FILE = "src/fed.py"
CONV_FILE = "src/models/conv.py"
# Both sides average float32 tensors; the reference accumulates in float32, the project in float64.
TOLERANCE = 1e-6
# The entries of cfg that fed.py and models/conv.py read (utils.py process_control sets them in a
# real run): a tiny conv model of two stages, five classes, BN, the scaler and the label mask on.
CLASSES = 5
CFG = {
    "model_name": "conv", "norm": "bn", "scale": True, "mask": True, "classes_size": CLASSES,
    "data_shape": [3, 6, 6], "conv": {"hidden_size": [4, 8]}, "global_model_rate": 1.0,
    "model_split_mode": "fix", "device": "cpu",
}
# The clients of the combine fixture: user index -> (width rate, label set); the cohort order.
CLIENTS = {0: (1.0, [0, 1, 2]), 1: (0.5, [1, 3]), 2: (0.25, [4]), 3: (0.125, [0, 4])}
COHORT = [2, 0, 3, 1]
STATE_SEED, NOISE_SEED = 5, 6
# Masked-loss cases: (label set, labels of the six samples); case 1 holds a label outside its set.
LOSS_CASES = [([1, 3, 4], [1, 3, 4, 4, 1, 3]), ([0, 2], [0, 2, 1, 2, 0, 0])]
LOGIT_SEED, LOGIT_SCALE = 7, 2.0
NOTES = ("config.py reads config.yml from the checkout's src (working directory switched there while "
         "it is imported); cfg entries fed.py and models/conv.py read are set by the harness "
         "(model_name conv, hidden_size [4, 8], 5 classes, norm bn, scale and mask on, global rate 1, "
         "model_split_mode fix, device cpu); sub-models are shifted by seeded noise in place of local "
         "training; for the masked loss Conv.blocks is nn.Identity so the forward gets fixed logits.")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, import the reference, write both fixtures."""
    args = _parser().parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        raise SystemExit(f"--commit must be the 40-hex commit of the checkout, got {args.commit!r}")
    reference = import_reference(Path(args.reference))
    command = " ".join(["python -m tests.golden.make_heterofl", *(argv or sys.argv[1:])])
    source = {"repository": REPOSITORY, "commit": args.commit, "produced_by": command, "notes": NOTES,
              "tolerance": TOLERANCE}
    write_combine_fixture(reference, source)
    write_masked_loss_fixture(reference, source)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a checkout of the official HeteroFL repository")
    parser.add_argument("--commit", required=True, help="the checkout's 40-hex commit")
    return parser


def import_reference(checkout: Path) -> types.SimpleNamespace:
    """``fed``, ``models`` and ``metrics`` of the checkout's ``src``, with :data:`CFG` applied."""
    src = checkout / "src"
    if not (src / "fed.py").is_file():
        raise SystemExit(f"{checkout} is not a HeteroFL checkout (no src/fed.py)")
    if "models" in sys.modules or "config" in sys.modules:
        raise SystemExit("another 'models' or 'config' module is already imported; run this script on its own")
    sys.path.insert(0, str(src))
    here = os.getcwd()
    os.chdir(src)
    try:
        import config  # noqa: PLC0415  (the reference's, read from src/config.yml)
    finally:
        os.chdir(here)
    config.cfg.update(CFG)
    import fed  # noqa: PLC0415
    import metrics  # noqa: PLC0415

    import models  # noqa: PLC0415

    return types.SimpleNamespace(fed=fed, models=models, metrics=metrics)


def _randomised(state: dict[str, torch.Tensor], seed: int) -> None:
    """Overwrite every tensor with seeded normal values (so merged and untouched elements differ)."""
    rng = np.random.default_rng(seed)
    for value in state.values():
        value.copy_(torch.from_numpy(rng.normal(0.0, 1.0, tuple(value.shape))).to(value.dtype))


def flat(state: dict[str, torch.Tensor]) -> np.ndarray:
    """A state's tensors flattened and concatenated in state-dict order (one array keeps a fixture small)."""
    return np.concatenate([v.detach().numpy().ravel() for v in state.values()])


def layout(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The keys of a state and their shapes (zero-padded rows) and ranks: what splits :func:`flat` back."""
    ranks = [v.dim() for v in state.values()]
    shapes = np.zeros((len(state), max(ranks)), dtype=np.int64)
    for row, value in enumerate(state.values()):
        shapes[row, : value.dim()] = tuple(value.shape)
    return {"keys": np.asarray(list(state)), "shapes": shapes, "ranks": np.asarray(ranks, dtype=np.int64)}


def write_combine_fixture(ref: types.SimpleNamespace, source: dict) -> None:
    """``heterofl_combine``: the official distribute, then combine of noisy sub-models."""
    model = ref.models.conv(model_rate=1.0)
    state = model.state_dict()
    with torch.no_grad():
        _randomised(state, STATE_SEED)
    arrays = {"global": flat(state), **layout(state)}
    rates = [CLIENTS[u][0] for u in sorted(CLIENTS)]
    label_split = {u: labels for u, (_, labels) in CLIENTS.items()}
    federation = ref.fed.Federation(state, rates, label_split)
    sent, param_idx = federation.distribute(COHORT)
    rng = np.random.default_rng(NOISE_SEED)
    trained = []
    for m, user in enumerate(COHORT):
        local = {k: v + torch.from_numpy(rng.normal(0.0, 1.0, tuple(v.shape))).to(v.dtype) for k, v in sent[m].items()}
        trained.append(local)
        arrays[f"sent/{m}"] = flat(sent[m])
        arrays[f"trained/{m}"] = flat(local)
        arrays[f"classes/{m}"] = np.asarray(CLIENTS[user][1], dtype=np.int64)
    arrays["rates"] = np.asarray([CLIENTS[user][0] for user in COHORT])
    with torch.no_grad():
        federation.combine(trained, param_idx, COHORT)
    arrays["merged"] = flat(federation.global_parameters)
    save("heterofl_combine", arrays, {**source, "file": FED_FILE, "function": "Federation.distribute, Federation.combine"})


def write_masked_loss_fixture(ref: types.SimpleNamespace, source: dict) -> None:
    """``heterofl_masked_loss``: ``Conv.forward``'s label mask, loss and gradient on fixed logits."""
    model = ref.models.conv(model_rate=1.0)
    model.blocks = nn.Identity()
    rng = np.random.default_rng(LOGIT_SEED)
    arrays = {}
    for index, (classes, labels) in enumerate(LOSS_CASES):
        logits = torch.from_numpy(rng.normal(0.0, LOGIT_SCALE, (len(labels), CLASSES))).float().requires_grad_(True)
        target = torch.tensor(labels)
        output = model({"img": logits, "label": target, "label_split": torch.tensor(classes)})
        output["loss"].backward()
        accuracy = ref.metrics.Accuracy(output["score"].detach(), target)
        arrays.update({
            f"case{index}/logits": logits.detach().numpy().copy(), f"case{index}/labels": target.numpy(),
            f"case{index}/classes": np.asarray(classes, dtype=np.int64),
            f"case{index}/score": output["score"].detach().numpy().copy(),
            f"case{index}/loss": np.float64(output["loss"].item()),
            f"case{index}/grad_logits": logits.grad.numpy().copy(),
            f"case{index}/accuracy_percent": np.float64(accuracy),
        })
    save("heterofl_masked_loss", arrays, {**source, "file": CONV_FILE, "function": "Conv.forward (mask), metrics.Accuracy"})


if __name__ == "__main__":
    main()
