"""Cloud and edge meet only in Flower messages: the names one side writes are the names the other reads.

Each side names its records and entries with its own constants (``strategies/protocol.py`` and
``clients/protocol.py`` for the shared ones, each algorithm's file for its own); neither side
imports the other. These tests pin every shared name and the separation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAvg

import clients.an
import clients.cema
import clients.eclm
import clients.elastic
import clients.heterofl
import clients.protocol
import strategies.an
import strategies.cema_tally
import strategies.eclm
import strategies.elastic
import strategies.heterofl
import strategies.protocol

ROOT = Path(__file__).resolve().parents[1]

#: (edge module, cloud module, names both define): one algorithm's records and entries.
ALGORITHM_NAMES = [
    (clients.eclm, strategies.eclm,
     ("SELECTOR_RECORD", "SELECTOR_PREFIX", "IMPORTANCE_RECORD", "MODULES_KEY", "MODULE_SEPARATOR", "ACTIVE_SUFFIX")),
    (clients.heterofl, strategies.heterofl,
     ("RATE_KEY", "OFFSET_KEY", "LABEL_MASK_KEY", "CLIP_GRAD_NORM_KEY", "STATISTICS_KEY", "STATIC_BN_KEY",
      "LABELS_RECORD", "CLASSES_KEY", "MASKED_ACCURACY_KEY")),
    (clients.an, strategies.an, ("COMPUTE_BUDGET_KEY", "PATH_RECORD", "PATH_LABEL_KEY")),
    (clients.elastic, strategies.elastic, ("COMPRESSED_KEY", "BANK_KEY", "SHARE_BANK_KEY")),
    (clients.cema, strategies.cema_tally, ("UPLOAD_LABELS",)),
]


def _constants(module) -> dict[str, str]:
    return {name: value for name, value in vars(module).items() if name.isupper() and isinstance(value, str)}


def test_every_name_the_cloud_shares_is_the_edges():
    cloud, edge = _constants(strategies.protocol), _constants(clients.protocol)
    assert {"UPLOADS_RECORD", "ORACLE_RECORD", "STREAM_RECORD", "WEIGHT_KEY", "CORRECT_KEY"} <= set(cloud)
    assert {name: edge.get(name) for name in cloud} == cloud


def test_the_weight_key_is_flowers_default():
    assert clients.protocol.WEIGHT_KEY == strategies.protocol.WEIGHT_KEY == FedAvg().weighted_by_key == "num-examples"


@pytest.mark.parametrize("edge, cloud, names", ALGORITHM_NAMES, ids=lambda v: getattr(v, "__name__", ""))
def test_each_algorithms_names_agree_on_both_sides(edge, cloud, names):
    assert {name: getattr(edge, name) for name in names} == {name: getattr(cloud, name) for name in names}


def _imports(path: Path) -> set[str]:
    """Top packages of every module ``path`` imports (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("side, other", [("strategies", "clients"), ("clients", "strategies")])
def test_strategies_and_clients_never_import_each_other_or_experiments(side, other):
    offenders = {
        path.name: sorted(_imports(path) & {other, "experiments"}) for path in sorted((ROOT / side).glob("*.py"))
    }
    assert {name: found for name, found in offenders.items() if found} == {}
