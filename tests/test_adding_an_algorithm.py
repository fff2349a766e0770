"""README's "Adding an algorithm" works as written: its three files, and nothing else, add a method.

The test copies the project, writes the files of the README's example into the copy, and runs
the README's commands there (slow: ~1 min). The example's aggregation is checked by hand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

ROOT = Path(__file__).resolve().parents[1]
#: What a run needs of the project.
PROJECT = ("conf", "experiments", "strategies", "clients", "models", "pyproject.toml")
SMALL = [
    "fleet.devices=6", "fleet.per_round=3", "rounds=2", "dataset.proxy_samples=300", "dataset.global_test_samples=200",
    "dataset.partition.size_min=20", "dataset.partition.size_max=40", "dataset.partition.test_size=10",
    "pretrain.epochs=2", "model.width=8",
]


def example_files() -> dict[str, str]:
    """The README example's files: each code block between the markers, named by its first line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = readme.split("<!-- example:begin -->")[1].split("<!-- example:end -->")[0]
    files = {}
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", example, flags=re.S):
        first, body = block.split("\n", 1)
        files[first.removeprefix("# ").strip()] = body
    return files


def test_the_example_is_three_files_of_the_four_places_an_algorithm_lives():
    assert sorted(example_files()) == [
        "conf/algorithm/trimmed_mean.yaml", "experiments/algorithms/trimmed_mean.py", "strategies/trimmed_mean.py",
    ]


def test_the_examples_trimmed_mean_drops_the_extremes_of_each_coordinate():
    namespace: dict = {"__name__": "trimmed_mean_example"}
    exec(compile(example_files()["strategies/trimmed_mean.py"], "strategies/trimmed_mean.py", "exec"), namespace)
    strategy = object.__new__(namespace["TrimmedMean"])
    updates = [ArrayRecord({"w": Array(np.array([v, -v], dtype=np.float32))}) for v in (1.0, 2.0, 10.0, 3.0, -50.0)]
    strategy.trim_fraction = 0.2  # 5 updates: one cut at each end -> mean of (1, 2, 3) and of (-1, -2, -3)
    np.testing.assert_array_equal(strategy.combine(updates, [1.0] * 5)["w"].numpy(), [2.0, -2.0])
    strategy.trim_fraction = 0.1  # nothing cut: the plain mean
    np.testing.assert_allclose(strategy.combine(updates, [1.0] * 5)["w"].numpy(), [-6.8, 6.8], rtol=1e-6)


@pytest.fixture(scope="module")
def project_with_the_example(tmp_path_factory) -> Path:
    """A copy of the project with the README example's files written into it."""
    copy = tmp_path_factory.mktemp("project")
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy / name)
    for path, text in example_files().items():
        (copy / path).write_text(text, encoding="utf-8")
    return copy


def _run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run([sys.executable, "-m", *args], cwd=project, capture_output=True, text=True, timeout=600,
                          env=env)


def test_the_example_runs_by_its_name_and_reaches_flowers_run_config(project_with_the_example, tmp_path):
    project = project_with_the_example
    done = _run(project, "experiments.flwr_toml")
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"algorithm.trimmed_mean.trim_fraction" = 0.1' in (project / "pyproject.toml").read_text()

    run_dir = tmp_path / "run"
    done = _run(project, "experiments.run", "algorithm=trimmed_mean", "algorithm.trimmed_mean.trim_fraction=0.34", *SMALL,
                f"pretrain.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and len(results["rounds"]) == 2
    assert results["config"]["algorithm"]["name"] == "trimmed_mean"
    assert results["config"]["algorithm"]["trimmed_mean"] == {"trim_fraction": 0.34}
    assert all(r["accuracy"] is not None and not r["failures"] for r in results["rounds"])


def test_the_examples_validation_names_the_key_and_the_rule(project_with_the_example, tmp_path):
    done = _run(project_with_the_example, "experiments.run", "algorithm=trimmed_mean",
                "algorithm.trimmed_mean.trim_fraction=0.7", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode != 0
    assert "algorithm.trimmed_mean.trim_fraction must be in [0, 0.5), got 0.7" in done.stderr
