"""The physical floor: the project's FedAvg rounds as a single-process plain loop.

No Flower, no Ray, no messages: one Python process draws the same seeded cohort as
:class:`strategies.base.EdgeCloudStrategy`, trains each cohort device on its partition
with the same :func:`models.training.train_epochs` settings, averages the weights by data
size (McMahan et al. 2017, eq. of FedAvg's server step), lets the cohort evaluate the new
model on its local test data and evaluates it on the global test set: the work of one
FedAvg round of the simulation, with nothing around it. Torch runs with
``engine.torch_threads`` threads, as inside one ClientApp.

``python -m experiments.bench.floor --config flat.json --out floor.json`` is run by
``experiments.bench.cli`` in a fresh process; it writes the wall-clock end of every round.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.config import from_flat
from experiments.data import build_federated_data, to_tensor
from experiments.pretrain.networks import build_run_model
from experiments.schema import RunConfig
from models.training import TrainSettings, accuracy, train_epochs

#: The stream tag of cohort draws: equal to ``strategies.base.COHORT_STREAM`` (kept here so
#: the floor imports no Flower; tests/test_bench.py pins the two equal).
COHORT_STREAM = 0xC0
#: The data slot every device trains on: a minimal loop (and the plain-Flower app) keeps
#: each device's partition as it is at time 0.
FLOOR_SLOT = 0


def cohort_of(seed: int, server_round: int, num_devices: int, per_round: int) -> list[int]:
    """Partition ids of a round's cohort, drawn as ``EdgeCloudStrategy.cohort`` draws them.

    Raises
    ------
    ValueError
        If ``per_round`` < 1 or ``num_devices`` < 1.
    """
    if per_round < 1 or num_devices < 1:
        raise ValueError(f"need per_round >= 1 and num_devices >= 1, got {per_round} and {num_devices}")
    rng = np.random.default_rng([seed, server_round, COHORT_STREAM])
    picked = rng.choice(num_devices, size=min(per_round, num_devices), replace=False)
    return sorted(int(i) for i in picked)


def average_states(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts (FedAvg's server step); integer buffers (BatchNorm's
    ``num_batches_tracked``) are taken from the first state.

    Raises
    ------
    ValueError
        If there are no states, or the weights do not match them or do not sum to > 0.
    """
    total = float(sum(weights))
    if not states or len(states) != len(weights) or not total > 0:
        raise ValueError(f"need one positive-sum weight per state, got {len(states)} states and weights {weights}")
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        out[key] = sum(state[key] * (w / total) for state, w in zip(states, weights, strict=True))
    return out


def _device_tensors(data, pid: int) -> tuple[torch.Tensor, ...]:
    device = data.device(pid, FLOOR_SLOT)
    as_labels = lambda y: torch.as_tensor(y, dtype=torch.long)  # noqa: E731
    return to_tensor(device.train_x), as_labels(device.train_y), to_tensor(device.test_x), as_labels(device.test_y)


def _seed_of(seed: int, pid: int, server_round: int) -> int:
    """The local-training seed of a device in a round (``clients.base.derive_seed``'s recipe)."""
    return int(np.random.SeedSequence([seed, pid, server_round]).generate_state(1)[0] >> 1)


def floor_round(cfg: RunConfig, data, model: nn.Module, server_round: int, global_test) -> dict[str, float]:
    """One FedAvg round in place on ``model``; returns its seconds split into phases."""
    algo = cfg.algorithm
    settings = TrainSettings(algo.local_epochs, algo.lr, algo.batch_size, algo.optimizer, algo.momentum)
    started = time.perf_counter()
    cloud = {k: v.clone() for k, v in model.state_dict().items()}
    states, weights, tests = [], [], []
    for pid in cohort_of(cfg.seed, server_round, cfg.fleet.devices, cfg.fleet.per_round):
        train_x, train_y, test_x, test_y = _device_tensors(data, pid)
        model.load_state_dict(cloud)
        train_epochs(model, train_x, train_y, settings, seed=_seed_of(cfg.seed, pid, server_round))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        weights.append(float(len(train_y)))
        tests.append((test_x, test_y))
    trained = time.perf_counter()
    model.load_state_dict(average_states(states, weights))
    local = [accuracy(model, x, y) for x, y in tests]
    global_accuracy = accuracy(model, *global_test)
    return {
        "train_s": trained - started,
        "round_s": time.perf_counter() - started,
        "local_accuracy": float(np.mean(local)),
        "global_accuracy": global_accuracy,
    }


def run_floor(cfg: RunConfig) -> dict:
    """``cfg.rounds`` FedAvg rounds in this process; the wall-clock end of each round.

    Returns
    -------
    dict
        ``round_end_unix`` (seconds since the epoch, one per round) and ``rounds`` (the
        per-round phase times and accuracies of :func:`floor_round`).
    """
    torch.set_num_threads(cfg.engine.torch_threads)
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
    test_x, test_y = data.global_test()
    global_test = (to_tensor(test_x), torch.as_tensor(test_y, dtype=torch.long))
    ends, rounds = [], []
    for server_round in range(1, cfg.rounds + 1):
        rounds.append(floor_round(cfg, data, model, server_round, global_test))
        ends.append(time.time())
    return {"round_end_unix": ends, "rounds": rounds}


def main(argv: list[str] | None = None) -> None:
    """``--config`` a flat run config (JSON, ``experiments.config.to_flat``), ``--out`` the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="flat run config (JSON)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the timings (JSON)")
    args = parser.parse_args(argv)
    cfg = from_flat(json.loads(args.config.read_text()))
    args.out.write_text(json.dumps(run_floor(cfg), indent=2))


if __name__ == "__main__":
    main()
