"""AN, AdaptiveNet (Wen et al., MobiCom 2023) as ECLM 7.1 runs it: on-device path choice, no collaboration.

The device receives the cloud's pre-trained multi-branch supernet (``models/multibranch/net.py``)
and, alone:

1. keeps the paths (one branch per stage) that fit its budget: training memory at its batch
   size within ``memory_bytes``, and training time within the compute allowance;
2. picks the candidate with the best accuracy on a validation split of its *training* data
   (AdaptiveNet searches subnets on device with local data; its evolutionary search is
   replaced by exhaustive search up to ``max_candidates`` paths, a seeded random sample
   beyond), after re-estimating each candidate's BatchNorm statistics on up to
   :data:`RECALIBRATION_SAMPLES` of the other training samples (once-for-all, Cai et al.
   2020, 3.3); the test data is never looked at before the choice is made;
3. extracts that path as a standalone network and fine-tunes it on all its training data
   (validation part included: it only served the choice) with the run's local-training
   settings (ECLM 7.1: on-device baselines fine-tune 10 epochs; the run config sets them);
4. replies with metrics only (nothing is aggregated): test accuracy, the path (config record
   ``path``: ``path`` as ints, ``label`` as ``"0-1-3"``) and its costs.

Compute allowance: the message's ``config["compute_budget_s"]`` (the AN strategy sends the
run's deadline), else the handler's ``compute_budget_s`` (default ``None``: no limit). The
supernet's download time is charged first; ``paths_fitting`` counts the paths whose
training fits what is left. The search's inference time over those candidates is then
charged too, and only candidates whose training still fits are evaluated
(``paths_evaluated``). ``compute_time_s`` = search time of the evaluated candidates +
fine-tuning time of the chosen path (its own training FLOPs per sample), so it never
exceeds the allowance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message

from clients.base import (
    DEVICE_DECLINED,
    ClientHandler,
    Device,
    MalformedMessage,
    content_reply,
    derive_seed,
    error_reply,
    model_from,
    round_of,
)
from clients.protocol import (
    ACCURACY_KEY,
    COMPUTE_TIME_KEY,
    CONFIG_RECORD,
    PARTITION_KEY,
    SAMPLES_TRAINED_KEY,
    TEST_EXAMPLES_KEY,
    WEIGHT_KEY,
)
from models.batchnorm import reestimate_bn
from models.clock import compute_time_s
from models.costs import parameter_bytes
from models.multibranch.net import BranchPath, MultiBranchNet
from models.multibranch.training import RECALIBRATION_BATCH
from models.training import accuracy, train_epochs

#: Share of the local training data held out to rank candidate paths (assumption: the
#: usual 80/20 hold-out; AdaptiveNet does not publish its on-device split).
VALIDATION_FRACTION = 0.2
#: Most candidate paths a device evaluates (assumption bounding on-device search time; the
#: 36 paths of ``multibranch_cnn`` are all evaluated, ResNet18's 27,648 are sampled).
MAX_CANDIDATES = 64
#: Most fit-split samples used to re-estimate a candidate's BatchNorm statistics (assumption:
#: once-for-all uses a small subset of the training set; this bounds the search's cost).
RECALIBRATION_SAMPLES = 64
#: Config key of the compute allowance (seconds of on-device compute per round).
COMPUTE_BUDGET_KEY = "compute_budget_s"
#: Config record of the training reply naming the chosen path: its branches (ints) and its
#: label (e.g. ``"0-1-3"``), joined by :data:`PATH_LABEL_SEPARATOR`.
PATH_RECORD = "path"
PATH_BRANCHES_KEY = "path"
PATH_LABEL_KEY = "label"
PATH_LABEL_SEPARATOR = "-"
#: Stream tags that separate the split and the candidate sample from other seed uses.
SPLIT_STREAM = 0xA1
CANDIDATE_STREAM = 0xA2


@dataclass(frozen=True)
class Choice:
    """The chosen path with its validation accuracy and its extracted, recalibrated network."""

    path: BranchPath
    val_accuracy: float
    network: torch.nn.Module


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(fit, validation)`` indices of ``n`` training samples, each in shuffled order.

    The validation part has ``max(1, round(fraction * n))`` samples when ``n >= 2``; with
    fewer samples both parts are all the data (nothing can be held out). Shuffled order
    makes any prefix of ``fit`` a random subset.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction={fraction} must be in (0, 1)")
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n)
    if n < 2:
        return order, order
    size = min(n - 1, max(1, round(fraction * n)))
    return order[size:], order[:size]


def pick_candidates(paths: list[BranchPath], limit: int, seed: int) -> list[BranchPath]:
    """All ``paths`` if there are at most ``limit``, else a seeded sample of ``limit`` (sorted)."""
    if limit < 1:
        raise ValueError(f"max_candidates={limit} must be >= 1")
    if len(paths) <= limit:
        return list(paths)
    picked = np.random.default_rng([seed, CANDIDATE_STREAM]).choice(len(paths), size=limit, replace=False)
    return [paths[i] for i in sorted(picked)]


def best_path(
    supernet: MultiBranchNet,
    candidates: list[BranchPath],
    calibration_x: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    recalibrate: bool = True,
) -> Choice:
    """The candidate with the best validation accuracy; ties go to fewer training FLOPs, then path order."""
    best: Choice | None = None
    best_key = None
    for path in candidates:
        network = supernet.extract(path)
        if recalibrate:
            reestimate_bn(network, calibration_x, RECALIBRATION_BATCH)
        score = accuracy(network, val_x, val_y)
        key = (-score if not math.isnan(score) else 0.0, supernet.path_cost(path, 1).flops_per_sample, path)
        if best_key is None or key < best_key:
            best, best_key = Choice(path, score, network), key
    if best is None:
        raise ValueError("no candidate path to choose from; pass at least one")
    return best


class AdaptiveNetClient(ClientHandler):
    """AN on one device (see the module docstring).

    Parameters
    ----------
    device : Device
        The device; ``device.build_model`` must build a :class:`MultiBranchNet`.
    compute_budget_s : float or None
        Seconds of on-device compute per round when the message names none; ``None``
        means no compute limit (only memory then constrains the path).
    validation_fraction : float
        Share of the training data held out to rank paths (:data:`VALIDATION_FRACTION`).
    max_candidates : int
        Most paths evaluated per round (:data:`MAX_CANDIDATES`).
    recalibrate_bn : bool
        Re-estimate each candidate's BatchNorm statistics on the fit split before ranking.
    """

    def __init__(
        self,
        device: Device,
        *,
        compute_budget_s: float | None = None,
        validation_fraction: float = VALIDATION_FRACTION,
        max_candidates: int = MAX_CANDIDATES,
        recalibrate_bn: bool = True,
    ) -> None:
        super().__init__(device)
        if compute_budget_s is not None and not compute_budget_s >= 0:
            raise ValueError(f"compute_budget_s={compute_budget_s} must be >= 0 or None for no limit")
        self.compute_budget_s = compute_budget_s
        self.validation_fraction = validation_fraction
        self.max_candidates = max_candidates
        self.recalibrate_bn = recalibrate_bn

    # ---------------------------------------------------------------- the round
    def train(self, msg: Message, context: Context) -> Message:
        """Choose a path within budget on training data, fine-tune it, report metrics only."""
        server_round = round_of(msg)
        device = self.device
        supernet = self._supernet(msg)
        data = device.data(device.slot_of_round(server_round))
        seed = derive_seed(device.seed, device.partition_id, server_round)
        samples = len(data.train_y) * device.train.epochs
        allowance = self._allowance_s(msg, supernet)
        memory = float(device.budget["memory_bytes"])
        cap = self._flops_cap(allowance, samples, server_round)
        fitting = supernet.paths_within(device.train.batch_size, memory, cap)
        if not fitting:
            return error_reply(msg, DEVICE_DECLINED, self._decline_reason(supernet, allowance, samples, server_round))
        fit_idx, val_idx = validation_split(len(data.train_y), self.validation_fraction, seed)
        calibration = fit_idx[:RECALIBRATION_SAMPLES] if self.recalibrate_bn else fit_idx[:0]
        candidates, search_s = self._affordable_candidates(
            supernet, pick_candidates(fitting, self.max_candidates, seed),
            len(val_idx) + len(calibration), allowance, samples, server_round,
        )
        if not candidates:
            reason = f"the path search ({search_s:.2f} s) leaves no time to train within {allowance:.2f} s"
            return error_reply(msg, DEVICE_DECLINED, reason)
        val_x, val_y = data.train_x[val_idx], data.train_y[val_idx]
        choice = best_path(supernet, candidates, data.train_x[calibration], val_x, val_y, self.recalibrate_bn)
        return self._fine_tune_and_reply(msg, supernet, choice, data, seed, search_s, len(candidates), len(fitting))

    def _affordable_candidates(
        self, supernet: MultiBranchNet, candidates: list[BranchPath], per_candidate: int,
        allowance_s: float, samples: int, server_round: int,
    ) -> tuple[list[BranchPath], float]:
        """Candidates whose training still fits once the search over all of them is charged.

        Returns the kept candidates and the search time over them (``per_candidate``
        forward passes each); with none kept, the search time that left no room.
        """
        def search_s(paths: list[BranchPath]) -> float:
            return self._seconds(sum(supernet.forward_flops(p) for p in paths) * per_candidate, server_round)

        bound_s = search_s(candidates)
        cap = self._flops_cap(allowance_s - bound_s, samples, server_round)
        batch = self.device.train.batch_size
        kept = [p for p in candidates if supernet.path_cost(p, batch).flops_per_sample <= cap]
        return (kept, search_s(kept)) if kept else ([], bound_s)

    def _fine_tune_and_reply(self, msg, supernet, choice, data, seed, search_s, evaluated, fitting) -> Message:
        device, server_round = self.device, round_of(msg)
        network = choice.network
        before = accuracy(network, data.test_x, data.test_y)
        loss = train_epochs(network, data.train_x, data.train_y, device.train, seed=seed)
        cost = supernet.path_cost(choice.path, device.train.batch_size)
        samples = len(data.train_y) * device.train.epochs
        train_s = self._seconds(cost.flops_per_sample * samples, server_round)
        metrics = {
            WEIGHT_KEY: len(data.train_y),
            TEST_EXAMPLES_KEY: len(data.test_y),
            ACCURACY_KEY: accuracy(network, data.test_x, data.test_y),
            "accuracy_before": before,
            "val_accuracy": choice.val_accuracy,
            "train_loss": loss,
            SAMPLES_TRAINED_KEY: samples,
            "path_bytes": cost.bytes,
            "path_flops_per_sample": cost.flops_per_sample,
            "train_memory_bytes": cost.train_memory_bytes,
            "paths_fitting": fitting,
            "paths_evaluated": evaluated,
            "search_time_s": search_s,
            COMPUTE_TIME_KEY: search_s + train_s,
            "load_factor": device.load_factor(server_round),
            PARTITION_KEY: device.partition_id,
        }
        label = PATH_LABEL_SEPARATOR.join(map(str, choice.path))
        path = ConfigRecord({PATH_BRANCHES_KEY: list(choice.path), PATH_LABEL_KEY: label})
        return content_reply(msg, metrics, configs={PATH_RECORD: path})

    # ---------------------------------------------------------------- helpers
    def _supernet(self, msg: Message) -> MultiBranchNet:
        supernet = model_from(msg, self.device)
        if not isinstance(supernet, MultiBranchNet):
            raise MalformedMessage(
                f"AN needs a multi-branch supernet, the run's model is {type(supernet).__name__}; "
                "set model.name=multibranch_cnn (or multibranch_resnet18)"
            )
        return supernet

    def _allowance_s(self, msg: Message, supernet: MultiBranchNet) -> float:
        """Compute seconds left this round after downloading the supernet (inf: no limit)."""
        config = msg.content.config_records.get(CONFIG_RECORD, ConfigRecord())
        budget = config.get(COMPUTE_BUDGET_KEY, self.compute_budget_s)
        if budget is None:
            return math.inf
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget < 0:
            raise MalformedMessage(f"config {COMPUTE_BUDGET_KEY}={budget!r} must be a number >= 0")
        download_s = parameter_bytes(supernet) / float(self.device.budget["downlink_bps"])
        return float(budget) - download_s

    def _seconds(self, flops: float, server_round: int) -> float:
        return compute_time_s(flops, float(self.device.budget["flops_per_s"]), self.device.load_factor(server_round))

    def _flops_cap(self, allowance_s: float, samples: int, server_round: int) -> float:
        """Largest training FLOPs per sample that finish ``samples`` within ``allowance_s``."""
        if math.isinf(allowance_s) or samples == 0:
            return math.inf if allowance_s >= 0 else -math.inf
        rate = float(self.device.budget["flops_per_s"]) / self.device.load_factor(server_round)
        return allowance_s * rate / samples

    def _decline_reason(self, supernet: MultiBranchNet, allowance_s: float, samples: int, server_round: int) -> str:
        cost = supernet.path_cost(supernet.smallest_path(), self.device.train.batch_size)
        need_s = self._seconds(cost.flops_per_sample * samples, server_round)
        return (
            f"no branch combination fits the budget: the smallest path needs {cost.train_memory_bytes} B of "
            f"training memory (budget {float(self.device.budget['memory_bytes']):.0f} B) and {need_s:.2f} s "
            f"of compute (allowance {allowance_s:.2f} s after the download)"
        )
