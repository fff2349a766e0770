"""Every registered algorithm runs with its name alone (slow: one sweep over all, ~3 min).

One Hydra sweep, ``algorithm=<every plug-in>``, at a tiny size (the sizes are the only
overrides: no scenario, network or algorithm setting), one round each: every job completes,
in its plug-in's own scenario, with its own network, and scores its devices.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from experiments.algorithms import ALGORITHMS
from experiments.config import compose

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "fleet.devices=4", "fleet.per_round=2", "rounds=1", "dataset.proxy_samples=200", "dataset.global_test_samples=100",
    "dataset.partition.size_min=20", "dataset.partition.size_max=30", "dataset.partition.test_size=10",
    "pretrain.epochs=1", "model.width=8",
]


def test_every_algorithm_alone_completes_one_round_in_its_own_scenario(tmp_path):
    names = list(ALGORITHMS)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "experiments.run", "-m", f"algorithm={','.join(names)}", *TINY,
           f"pretrain.cache_dir={tmp_path / 'cache'}", f"dataset.cache_dir={tmp_path / 'parts'}",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = {}
    for path in sweep.glob("*/results.json"):
        results = json.loads(path.read_text())
        done[results["config"]["algorithm"]["name"]] = results
    assert sorted(done) == sorted(names), f"jobs without results: {sorted(set(names) - set(done))}"
    for name, results in done.items():
        own = compose([f"algorithm={name}"])
        assert results["status"] == "completed", name
        assert results["config"]["scenario"]["name"] == ALGORITHMS[name].default_scenario, name
        assert results["config"]["model"]["name"] == own.model.name, name
        assert len(results["rounds"]) == 1 and results["summary"]["final_accuracy"] is not None, name
