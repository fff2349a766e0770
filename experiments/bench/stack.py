"""The start-up floor's first part: importing what every run on this platform imports, and nothing else.

``python -m experiments.bench.stack`` imports :data:`STACK` (Hydra, torch, Flower's ClientApp
and ServerApp APIs and its simulation runtime), then exits: what the project's driver cannot
run without, and what it must import before it does any work of its own. ``experiments.bench.cli``
times it from launch to exit in a fresh process, as it times every run; with the plain loop's
round shared by the cores it gives the start-up floor of this machine
(:func:`experiments.bench.report.startup_floor`). Measured on the 2-core machine by
``python -m experiments.bench`` on 2026-12-02: 6.99 s, median of 3 (docs/PERFORMANCE.md).
It imports Flower's simulation module only to time the import and calls none of it (the
simulation API stays :mod:`experiments.engine.simulation`'s).
"""

from __future__ import annotations

import importlib

#: What the project's driver imports from its dependencies before a round can run
#: (experiments/run.py: Hydra; the networks: torch; experiments/client_app.py and
#: experiments/server_app.py: Flower's app APIs; experiments/engine/simulation.py: Flower's simulation).
STACK = ("hydra", "torch", "flwr.clientapp", "flwr.serverapp", "flwr.simulation")


def main() -> None:
    """Import every module of :data:`STACK`, in order."""
    for module in STACK:
        importlib.import_module(module)


if __name__ == "__main__":
    main()
