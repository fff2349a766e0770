"""ECLM's cloud training (seed 001 section 4.3): end-to-end, then module ability-enhancing.

1. End-to-end: ``CE + lambda * LoadBalance`` with noisy top-k routing.
2. Ability-enhancing (Fig. 5): sub-tasks (classes that co-occur on devices); per module
   layer the load matrix ``H`` (per sub-task, how many of its samples the clean top-k
   routing sends to each module, row-normalised), the LP mask ``M`` (load cap kappa1,
   modules per sub-task kappa2), targets ``P = H * M`` row-normalised; then fine-tuning
   with ``CE + lambda * KL(g, g_label)`` -- the paper's loss; the end-to-end
   load-balancing term can be added as an option.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from models.eclm.ability import ability_loss, load_matrix, solve_mask, subtask_of_class, target_gates
from models.eclm.modular import ModularNet
from models.eclm.selector import noisy_top_k
from models.training import TrainSettings, run_epochs, train_epochs

#: Samples per selector pass when measuring the routing load (memory bound only).
ROUTING_BATCH = 512


@dataclass(frozen=True)
class AbilitySettings:
    """Module ability-enhancing settings (ECLM 4.3; defaults in the run config).

    Attributes
    ----------
    epochs : int
        Fine-tuning epochs.
    kappa1, kappa2 : float or None, int
        The mask LP's module load cap and modules per sub-task (:func:`models.eclm.ability.solve_mask`).
    kl_weight : float
        lambda of ``CE + lambda * KL(g, g_label)``.
    load_balance : bool
        Also add the end-to-end load-balancing term (the model's ``balance_weight``) to the
        fine-tuning loss. Off by default: ECLM 4.3's fine-tuning loss is CE + lambda * KL only.
    """

    epochs: int
    kappa1: float | None
    kappa2: int
    kl_weight: float
    load_balance: bool


def train_end_to_end(
    model: ModularNet,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """ECLM 4.3 vanilla end-to-end training: CE + the model's load-balancing term.

    ``on_epoch(epoch, mean loss)`` is called after each epoch
    (:func:`models.training.run_epochs`); returns the last epoch's mean loss.
    """
    model.reseed_noise(seed)
    return train_epochs(
        model, x, y, settings, seed, extra_loss=lambda m: m.last_routing.load_balance_loss, on_epoch=on_epoch
    )


@torch.no_grad()
def load_matrices(model: ModularNet, x: torch.Tensor, subtask: np.ndarray, num_subtasks: int) -> list[np.ndarray]:
    """Per module layer, H (T x N_l): the normalised load each sub-task puts on each module.

    Routing is the model's evaluation routing: top-k of the clean selector logits among the
    active modules (no noise), as :meth:`ModularNet.forward` routes in eval mode; H counts
    routed samples (:func:`models.eclm.ability.load_matrix`, ECLM 4.3 step 1).
    """
    model.eval()
    routed: list[list[torch.Tensor]] = [[] for _ in model.layers]
    for start in range(0, len(x), ROUTING_BATCH):
        logits = model.selector(x[start : start + ROUTING_BATCH])
        for layer, (clean, module_layer) in enumerate(zip(logits, model.layers)):
            gates, _, _ = noisy_top_k(clean, None, module_layer.k, False, module_layer.active)
            routed[layer].append(gates > 0)
    return [load_matrix(torch.cat(chunks).numpy(), subtask, num_subtasks) for chunks in routed]


def routing_targets(
    model: ModularNet, x: torch.Tensor, subtask: np.ndarray, num_subtasks: int, ability: AbilitySettings
) -> list[torch.Tensor]:
    """Per layer, each sub-task's target gate row ``g_label`` (T, N_l) from H and the LP mask."""
    targets = []
    for H in load_matrices(model, x, subtask, num_subtasks):
        M = solve_mask(H, kappa1=ability.kappa1, kappa2=ability.kappa2)
        targets.append(torch.as_tensor(target_gates(H, M, kappa2=ability.kappa2), dtype=torch.float32))
    return targets


def train_ability(
    model: ModularNet,
    x: torch.Tensor,
    y: torch.Tensor,
    subtasks: Sequence[Sequence[int]],
    num_classes: int,
    settings: TrainSettings,
    ability: AbilitySettings,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """ECLM 4.3 module ability-enhancing fine-tuning; returns the last epoch's mean loss.

    Runs ``ability.epochs`` epochs of :func:`models.training.run_epochs` (``settings``
    gives the batch size, optimizer and schedule) with ECLM 4.3's loss
    ``CE + kl_weight * KL(g, g_label)``, plus the model's load-balancing term when
    ``ability.load_balance`` is set. ``on_epoch(epoch, mean loss)`` is called after each
    epoch.
    """
    subtask_of = subtask_of_class(subtasks, num_classes)
    sample_subtask = subtask_of[y.numpy()]
    targets = routing_targets(model, x, sample_subtask, len(subtasks), ability)
    sample_subtask = torch.as_tensor(sample_subtask)
    model.reseed_noise(seed)

    def step(idx: torch.Tensor) -> float:
        logits = model(x[idx])
        probs = model.gate_probs(x[idx])
        wanted = [t[sample_subtask[idx]] for t in targets]
        loss = ability_loss(logits, y[idx], probs, wanted, ability.kl_weight)
        if ability.load_balance:
            loss = loss + model.last_routing.load_balance_loss
        loss.backward()
        return float(loss.detach())

    return run_epochs(model, len(x), replace(settings, epochs=ability.epochs), seed, step, on_epoch)
