"""One domain's adaptation with its cost: counted FLOPs and the memory it kept, part by part (seed 003, IV).

:func:`adapt_and_account` runs :func:`models.elastic.remodel.adapt_to_domain` inside a
:class:`~models.elastic.ledger.PassLedger` and adds to its report the FLOPs of the work it executed
(``adapt_flops``, counted by torch after the timed part) and its
:class:`~models.elastic.footprint.MemoryFootprint` (:func:`method_footprint`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from models.elastic.footprint import MemoryFootprint, module_bytes
from models.elastic.ledger import PassLedger
from models.elastic.master import ElasticMaster
from models.elastic.remodel import METHODS, RemodelSettings, adapt_to_domain

#: Report key of the counted FLOPs of one domain's adaptation.
FLOPS_KEY = "adapt_flops"


def method_footprint(method: str, elastic: ElasticMaster, serving: nn.Module, optimizer: int,
                     activations: int = 0, gradients: int = 0) -> MemoryFootprint:
    """What ``method`` keeps on the device while adapting (:mod:`models.elastic.footprint`).

    ``elasticdnn``: the master, the bank and the surrogate (``serving``); ``full``: the master
    (``serving`` is the master itself); every same-size baseline: its model (``serving``). Each
    with ``optimizer`` bytes of optimizer state and the training step's ``activations`` and
    ``gradients``.
    """
    if method not in METHODS:
        raise ValueError(f"method is {method!r}; choose one of {METHODS}")
    if method == "elasticdnn":
        parts = {"master": module_bytes(elastic.master), "bank": module_bytes(elastic.bank),
                 "model": module_bytes(serving)}
    elif method == "full":
        parts = {"master": module_bytes(elastic.master)}
    else:
        parts = {"model": module_bytes(serving)}
    return MemoryFootprint(**parts, optimizer=optimizer, gradients=gradients, activations=activations)


def adapt_and_account(method: str, elastic: ElasticMaster, small: nn.Module | None, x: Tensor,
                      settings: RemodelSettings, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`~models.elastic.remodel.adapt_to_domain` plus its counted FLOPs and memory footprint.

    Returns
    -------
    (nn.Module, dict)
        The serving model and the adaptation's report without ``optimizer_state_bytes``, with
        ``adapt_flops`` (:data:`FLOPS_KEY`) and :meth:`MemoryFootprint.metrics` (every part,
        ``resident_memory_bytes``, ``peak_memory_bytes``). ``adapt_wall_s`` excludes the FLOP
        counting, which runs after the adaptation.
    """
    ledger = PassLedger()
    with ledger.recording():
        serving, report = adapt_to_domain(method, elastic, small, x, settings, seed)
    activations, gradients = ledger.training_peak()
    footprint = method_footprint(method, elastic, serving, report.pop("optimizer_state_bytes"), activations,
                                 gradients)
    return serving, {**report, **footprint.metrics(), FLOPS_KEY: ledger.flops()}
