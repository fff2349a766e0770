"""The deployment path: `flower-superlink` + `flower-supernode` + `flwr run` on 127.0.0.1 (slow).

One SuperLink with TLS (certificates made by the test) and SuperNode authentication
(keys registered with `flwr supernode register`) and three SuperNodes (one per way a
device gets its budget: sampled, declared in --node-config, profiled on the device) runs
a 2-round FedAvg, a short ECLM run, and a FedAvg run in which a SuperNode is SIGKILLed
while it trains; a fourth SuperNode whose key was never registered is refused. One
secured deployment serves every test: each ClientApp message starts a fresh process
(~10 s of imports on this machine), so a second SuperLink would double the module's
time for a difference of command-line flags. Every process is stopped by PID.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from experiments.fleet.startup import LOG_PREFIX
from tests.deploy_cluster import Deployment, make_node_keys, make_tls_files

SMALL = {
    "fleet.devices": 3,
    "fleet.per_round": 3,
    "rounds": 2,
    "dataset.proxy_samples": 300,
    "dataset.global_test_samples": 200,
    "dataset.partition.size_min": 20,
    "dataset.partition.size_max": 40,
    "dataset.partition.test_size": 10,
    "pretrain.epochs": 2,
    "model.width": 8,
}
# tests/test_e2e.py's cheap ECLM: a small modular MLP, one ability epoch, a binding budget
ECLM = {
    "algorithm.name": "eclm",
    "model.name": "modular_mlp",
    "model.width": 16,
    "model.modules_per_layer": 8,
    "algorithm.eclm.round_budget_s": 0.4,
    "algorithm.eclm.size_cap": 1.0,
    "algorithm.eclm.ability_epochs": 1,
    "rounds": 1,
}
NODE_CONFIGS = {  # partition id -> the rest of its --node-config
    0: "",  # budget sampled from the device-class table, as in simulation
    1: 'device-class="jetson-nano-4gb" memory-bytes=2e9 flops-per-s=5e10 uplink-bps=2.5e6 downlink-bps=1.25e7',
    2: 'budget="profile" uplink-bps=1.25e7 downlink-bps=6.25e7',  # memory and speed measured
}
RUN_TIMEOUT_S = 300
#: Round timeout of the run that loses a node: long enough for a cold ClientApp on a busy
#: 2-core machine (~10-20 s), short enough to keep the test short (waited twice: train, evaluate).
KILL_ROUND_TIMEOUT_S = 40.0


def _run_config(values: dict) -> str:
    """A --run-config string (strings quoted for TOML)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items())


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _run(deployment: Deployment, tmp: Path, name: str, **values) -> dict:
    config = {"algorithm.name": "fedavg", **SMALL, "pretrain.cache_dir": str(tmp / "cache"),
              "output_dir": str(tmp / name), **values}
    started = time.monotonic()
    done = deployment.run(_run_config(config), RUN_TIMEOUT_S)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + deployment.logs()
    results = _results(tmp / name)
    print(f"\n{name}: flwr run took {time.monotonic() - started:.1f} s")  # seen with pytest -s
    return results


def _start_up_lines(deployment: Deployment, partition_id: int) -> list[tuple[float, float]]:
    """(process age, message age) of every message the node's ClientApp handled."""
    pattern = re.escape(LOG_PREFIX) + r" \w+ handler started ([\d.]+) s after its process started, ([\d.]+) s"
    return [(float(a), float(b)) for a, b in re.findall(pattern, deployment.node_log(partition_id))]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One folder for the module: the pre-training cache is shared by its runs."""
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def secured(work):
    """A SuperLink with TLS and SuperNode authentication, and three registered SuperNodes."""
    folder = work / "secured"
    with Deployment(folder, tls=make_tls_files(folder / "certs"), node_auth=True) as deployment:
        deployment.start_superlink()
        for pid, extra in NODE_CONFIGS.items():
            private, public = make_node_keys(folder / "keys", f"node{pid}")
            deployment.register_node(public)
            deployment.start_supernode(pid, len(NODE_CONFIGS), extra, private_key=private)
        yield deployment


def test_fedavg_through_superlink_and_three_supernodes(secured, work):
    results = _run(secured, work, "fedavg")
    assert results["status"] == "completed"
    assert results["summary"]["devices_discovered"] == 3
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for record in results["rounds"]:
        assert record["clients"] == [0, 1, 2] and record["failures"] == []
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["global_accuracy"] <= 1.0
        assert record["uplink_bytes"] > 0 and record["sim_time_s"] > 0
    # one fresh ClientApp process per message: query, then train + evaluate per round
    figures = {pid: _start_up_lines(secured, pid) for pid in NODE_CONFIGS}
    assert all(len(lines) == 5 for lines in figures.values()), figures
    ages = sorted(age for lines in figures.values() for age, _ in lines)
    waits = sorted(wait for lines in figures.values() for _, wait in lines)
    assert all(age > 0 for age in ages)
    print(f"start-up per message: process age median {ages[len(ages) // 2]:.2f} s (max {ages[-1]:.2f} s), "
          f"since the cloud sent it median {waits[len(waits) // 2]:.2f} s (max {waits[-1]:.2f} s)")


def test_short_eclm_run_through_the_deployment(secured, work):
    results = _run(secured, work, "eclm", **ECLM)
    assert results["status"] == "completed"
    assert results["summary"]["devices_discovered"] == 3
    (record,) = results["rounds"]
    assert record["clients"] == [0, 1, 2] and record["failures"] == []
    assert record["train_submodel_fraction"] > 0
    sizes = record["train_submodel_bytes_by_device"]  # each device's own sub-model, measured
    assert set(sizes) == {"0", "1", "2"} and all(size > 0 for size in sizes.values())


def test_a_supernode_whose_key_was_never_registered_is_refused(secured, work):
    stranger_key, _ = make_node_keys(work / "secured" / "keys", "stranger")
    stranger_id = len(NODE_CONFIGS)  # its own log, beside the registered nodes'
    stranger = secured.start_supernode(stranger_id, stranger_id + 1, private_key=stranger_key, wait=False)
    assert stranger.wait(timeout=RUN_TIMEOUT_S) != 0
    assert "Failed to activate SuperNode" in secured.node_log(stranger_id)


def _kill_when_training(deployment: Deployment, partition_id: int, runs_before: int) -> None:
    """SIGKILL the SuperNode by PID once it has received a train message of the new run."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while deployment.node_log(partition_id).count("Receiving: train message") <= runs_before:
        assert time.monotonic() < deadline, "the SuperNode never received a train message"
        time.sleep(0.2)
    deployment.nodes[partition_id].send_signal(signal.SIGKILL)
    deployment.nodes[partition_id].wait(timeout=30)


def test_a_supernode_killed_mid_round_does_not_stop_the_run(secured, work):
    victim = 2
    before = secured.node_log(victim).count("Receiving: train message")
    killer = threading.Thread(target=_kill_when_training, args=(secured, victim, before))
    killer.start()
    try:
        results = _run(secured, work, "killed", rounds=1, **{"engine.round_timeout_s": KILL_ROUND_TIMEOUT_S})
    finally:
        killer.join(timeout=RUN_TIMEOUT_S)
    assert secured.nodes[victim].poll() == -signal.SIGKILL
    assert results["status"] == "completed"
    (record,) = results["rounds"]
    assert record["cohort"] == [0, 1, 2]
    assert record["clients"] == [0, 1]  # the survivors' updates were used
    assert record["accuracy"] is not None
    for phase in ("train", "evaluate"):
        failures = [f for f in record["failures"] if f["phase"] == phase]
        assert [f["partition_id"] for f in failures] == [victim], record["failures"]  # counted once, by name
    for failure in record["failures"]:
        # Silence until the timeout, or, once the node missed two heartbeats, the SuperLink's
        # "Node Unavailable" error reply (matched to the device by the message it answers).
        reason = failure["reason"]
        assert reason == f"no reply within {KILL_ROUND_TIMEOUT_S} s" or "Node Unavailable" in reason, failure
