"""Shared test setup: offline switches, one torch thread, a process identity for Messages."""

import os

import pytest

import experiments  # noqa: F401  (offline switches)


@pytest.fixture(autouse=True)
def _message_identity():
    """Flower's Message constructor reads the running task's identity; give tests one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _flower_logger_restored():
    """A test that quiets Flower's logger (as a run's worker does) leaves it as it found it."""
    import logging

    flwr_logger = logging.getLogger("flwr")
    propagate, level = flwr_logger.propagate, flwr_logger.level
    yield
    flwr_logger.propagate, flwr_logger.level = propagate, level
