"""Write the FedRolex golden fixtures by running the official code on fixed tensors.

``python -m tests.golden.make_fedrolex --reference <checkout of AIoT-MLSys-Lab/FedRolex> --commit <40-hex>``

Fixtures (inputs, and what the official code computed on them):

``fedrolex_window``
    ``resnet_server.py`` ``ResnetServerRoll.split_model`` (rolling extraction, ``overlap``
    unset) on the official ``resnet18`` (``models/resnet.py``) with stage widths 3, 4, 6, 8,
    for server rounds 0..8 (its ``rounds`` counter) and rates 1, 1/2, 1/4: the output channel
    indices of one conv per width (``window/<width>/<rate>``, one row per round).
``fedrolex_combine``
    ``ResnetServerRoll.distribute`` then ``ResnetServerRoll.combine`` (``weighting='avg'``) in
    its round 5 on a resnet18 with stage widths 2, 2, 2, 3: three clients of rates 1, 1/2,
    1/4 with their own label sets; each sub-model is shifted by seeded noise (a stand-in for
    local training). Recorded (each state flattened in state-dict order, with its keys and
    shapes): the global state before and after, every client's received and returned
    sub-model, rates, label sets, and per element of the merged state how many clients' updates ``combine`` added
    (read from its ``param_idx`` after the call) and whether ``combine`` weights it by its
    running update counts ``tmp_counts`` (BN parameters and the ``linear`` classifier) rather
    than by ``K = 1`` (the convs under ``weighting='avg'``).

The harness around the reference, recorded in every fixture's ``notes``: ``ray`` (imported by
``resnet_server.py``, which reads its config and label split through ``ray.get``) is a stub
module whose ``get`` returns its argument; the config is a plain dict holding only the entries
the server and ``models/resnet.py`` read (:data:`CFG`); the checkout's ``models`` folder has no
``__init__.py``, so the project's own directory is taken off ``sys.path`` while it is imported.
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

from tests.golden.fixture import save
from tests.golden.make_heterofl import flat, layout

REPOSITORY = "AIoT-MLSys-Lab/FedRolex"
SERVER_FILE = "resnet_server.py"
# Both sides average float32 tensors; the reference accumulates in float32, the project in float64.
TOLERANCE = 1e-6
CLASSES = 5
# What ResnetServerRoll and models/resnet.py read from the config (main_resnet.py / utils.py
# process_control fill it in a real run): fixed rates, no overlap (rolling), 'avg' weighting.
CFG = {
    "data_shape": [3, 6, 6], "classes_size": CLASSES, "norm": "bn", "scale": True, "mask": True,
    "global_model_rate": 1.0, "model_split_mode": "fix", "overlap": None, "weighting": "avg",
    "num_users": 3, "active_user": 3, "device": "cpu",
}
WINDOW_WIDTHS = [3, 4, 6, 8]
# A conv whose output channels roll, for each stage width of the window fixture.
WINDOW_KEYS = {3: "conv1.weight", 4: "layer2.0.conv1.weight", 6: "layer3.0.conv1.weight", 8: "layer4.0.conv1.weight"}
WINDOW_ROUNDS = 9
RATES = [1.0, 0.5, 0.25]
COMBINE_WIDTHS = [2, 2, 2, 3]
COMBINE_ROUND = 5
LABEL_SPLIT = {0: [0, 1, 2], 1: [1, 3], 2: [4]}
COHORT = [1, 2, 0]
STATE_SEED, NOISE_SEED = 5, 6
NOTES = ("ray is a stub module whose get returns its argument (resnet_server.py reads its config "
         "and label split through ray.get); the config is a dict of the entries ResnetServerRoll "
         "and models/resnet.py read (fixed rates, overlap None, weighting avg, bn, scale, mask); "
         "the project's directory is off sys.path while the checkout's namespace package models is "
         "imported; sub-models are shifted by seeded noise in place of local training.")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, import the reference, write both fixtures."""
    args = _parser().parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        raise SystemExit(f"--commit must be the 40-hex commit of the checkout, got {args.commit!r}")
    reference = import_reference(Path(args.reference))
    command = " ".join(["python -m tests.golden.make_fedrolex", *(argv or sys.argv[1:])])
    source = {"repository": REPOSITORY, "commit": args.commit, "produced_by": command, "notes": NOTES,
              "file": SERVER_FILE, "tolerance": TOLERANCE}
    write_window_fixture(reference, source)
    write_combine_fixture(reference, source)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a checkout of AIoT-MLSys-Lab/FedRolex")
    parser.add_argument("--commit", required=True, help="the checkout's 40-hex commit")
    return parser


def import_reference(checkout: Path) -> types.SimpleNamespace:
    """``resnet_server`` and ``models.resnet`` of the checkout (``ray`` stubbed)."""
    if not (checkout / SERVER_FILE).is_file():
        raise SystemExit(f"{checkout} is not a FedRolex checkout (no {SERVER_FILE})")
    if "models" in sys.modules:
        raise SystemExit("another 'models' package is already imported; run this script on its own")
    ray = types.ModuleType("ray")
    ray.get = lambda ref: ref
    sys.modules.setdefault("ray", ray)
    project = {"", os.getcwd(), str(Path(__file__).resolve().parents[2])}
    saved = list(sys.path)
    sys.path[:] = [str(checkout)] + [p for p in saved if p not in project]
    try:
        import resnet_server  # noqa: PLC0415

        from models import resnet  # noqa: PLC0415
    finally:
        sys.path[:] = saved
    return types.SimpleNamespace(server=resnet_server, resnet=resnet)


def _server(ref: types.SimpleNamespace, widths: list[int]):
    """A ``ResnetServerRoll`` over a resnet18 of ``widths`` with seeded weights, and its config."""
    cfg = {**CFG, "resnet": {"hidden_size": list(widths)}}
    torch.manual_seed(STATE_SEED)
    model = ref.resnet.resnet18(model_rate=1.0, cfg=cfg)
    rng = np.random.default_rng(STATE_SEED)
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(torch.from_numpy(rng.normal(0.0, 1.0, tuple(value.shape))).to(value.dtype))
    return ref.server.ResnetServerRoll(model, RATES, {"label_split": LABEL_SPLIT}, cfg)


def write_window_fixture(ref: types.SimpleNamespace, source: dict) -> None:
    """``fedrolex_window``: the rolled output indices per round, width and rate."""
    server = _server(ref, WINDOW_WIDTHS)
    users = list(range(len(RATES)))
    rows: dict[str, list[np.ndarray]] = {}
    for rounds in range(WINDOW_ROUNDS):
        server.rounds = rounds
        server.make_model_rate()
        idx = server.split_model(users)
        for m, rate in enumerate(RATES):
            for width, key in WINDOW_KEYS.items():
                rows.setdefault(f"window/{width}/{rate:g}", []).append(idx[m][key][0].numpy())
    arrays = {name: np.stack(values).astype(np.int64) for name, values in rows.items()}
    arrays["rounds"] = np.arange(WINDOW_ROUNDS)
    save("fedrolex_window", arrays, {**source, "function": "ResnetServerRoll.split_model", "tolerance": 0.0})


def _coverage(state, param_idx) -> np.ndarray:
    """How many clients' values ``combine`` added to each element (from its ``param_idx``)."""
    counts = []
    for key, value in state.items():
        count = torch.zeros(value.shape)
        for idx in param_idx:
            where = torch.meshgrid(*idx[key], indexing="ij") if value.dim() > 1 else idx[key]
            count[where] += 1
        counts.append(count.numpy().ravel())
    return np.concatenate(counts).astype(np.int8)


def _count_weighted(state) -> np.ndarray:
    """Elements ``combine`` weights by ``tmp_counts``: 1-D parameters and the ``linear`` keys."""
    return np.concatenate([
        np.full(value.numel(), value.dim() == 1 or "linear" in key) for key, value in state.items()
    ])


def write_combine_fixture(ref: types.SimpleNamespace, source: dict) -> None:
    """``fedrolex_combine``: distribute then combine of noisy sub-models in round :data:`COMBINE_ROUND`."""
    server = _server(ref, COMBINE_WIDTHS)
    server.rounds = COMBINE_ROUND
    state = server.global_model.state_dict()
    arrays = {"global": flat(state), **layout(state)}
    sent, param_idx = server.distribute(COHORT)
    rng = np.random.default_rng(NOISE_SEED)
    trained = []
    for m, user in enumerate(COHORT):
        local = {k: v + torch.from_numpy(rng.normal(0.0, 1.0, tuple(v.shape))).to(v.dtype) for k, v in sent[m].items()}
        trained.append(local)
        arrays.update({f"sent/{m}": flat(sent[m]), f"trained/{m}": flat(local),
                       f"classes/{m}": np.asarray(LABEL_SPLIT[user], dtype=np.int64)})
    arrays["rates"] = np.asarray([RATES[user] for user in COHORT])
    arrays["round"] = np.int64(COMBINE_ROUND)
    with torch.no_grad():
        server.combine(trained, param_idx, COHORT)
    arrays["merged"] = flat(server.global_parameters)
    arrays["coverage"] = _coverage(state, param_idx)
    arrays["count_weighted"] = _count_weighted(state)
    save("fedrolex_combine", arrays, {**source, "function": "ResnetServerRoll.distribute, ResnetServerRoll.combine"})


if __name__ == "__main__":
    main()
