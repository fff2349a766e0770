"""End to end through the Hydra door on the real engines (slow: ~3 min in all).

A handful of devices, two rounds: the run writes a valid results.json, the same seed
gives the same cohorts and numbers (on local worker processes, on a local Ray, and
attached to a Ray head the test starts and stops), and a sweep survives jobs whose
simulation crashes: each leaves an error record, the next job runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = [
    "fleet.devices=6",
    "fleet.per_round=3",
    "rounds=2",
    "dataset.proxy_samples=300",
    "dataset.global_test_samples=200",
    "dataset.partition.size_min=20",
    "dataset.partition.size_max=40",
    "dataset.partition.test_size=10",
    "pretrain.epochs=2",
    "model.width=8",
]
REQUIRED_ROUND_KEYS = {
    "round", "accuracy", "global_accuracy", "uplink_bytes", "downlink_bytes",
    "sim_time_s", "wall_time_s", "clients", "failures",
}
REQUIRED_SUMMARY_KEYS = {
    "final_accuracy", "best_accuracy", "total_uplink_bytes", "total_downlink_bytes", "sim_time_s", "wall_time_s",
}
#: Per-round fields that measure the host, not the simulation: they may differ run to run.
HOST_TIMES = {"wall_time_s", "train_wall_time_s"}


def _run(args: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    flags = [a for a in args if a.startswith("-")]  # Hydra wants its flags before overrides
    overrides = [a for a in args if not a.startswith("-")]
    if not any(a.startswith("algorithm=") for a in overrides):
        overrides.insert(0, "algorithm=fedavg")  # the platform's tests run FedAvg unless told
    cmd = [sys.executable, "-m", "experiments.run", *flags, *SMALL, f"pretrain.cache_dir={tmp_path / 'cache'}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _comparable(rounds: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in HOST_TIMES} for r in rounds]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head():
    """A single-node Ray head on a free port, stopped afterwards."""
    port = _free_port()
    start = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
             "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)


def test_fedavg_end_to_end_is_valid_and_deterministic_without_ray_on_a_local_and_an_attached_ray(tmp_path, ray_head):
    local = _run([f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)  # engine.backend=auto: local processes
    assert local.returncode == 0, local.stderr[-3000:]
    attached = _run([f"hydra.run.dir={tmp_path / 'b'}", f"engine.ray_address={ray_head}"], tmp_path)  # auto: Ray
    assert attached.returncode == 0, attached.stderr[-3000:]
    on_ray = _run([f"hydra.run.dir={tmp_path / 'c'}", "engine.backend=ray"], tmp_path)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]

    a, b = _results(tmp_path / "a"), _results(tmp_path / "b")
    assert a["status"] == "completed"
    assert a["config"]["algorithm"]["name"] == "fedavg" and a["config"]["fleet"]["devices"] == 6
    assert len(a["rounds"]) == 2
    for record in a["rounds"]:
        assert REQUIRED_ROUND_KEYS <= set(record)
        assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["global_accuracy"] <= 1.0
        assert record["uplink_bytes"] > 0 and record["downlink_bytes"] > record["uplink_bytes"]
        assert record["sim_time_s"] > 0
    assert REQUIRED_SUMMARY_KEYS <= set(a["summary"])
    assert (tmp_path / "a" / "accuracy_per_round.png").exists()
    assert _comparable(a["rounds"]) == _comparable(b["rounds"])  # same seed, same numbers
    assert _comparable(a["rounds"]) == _comparable(_results(tmp_path / "c")["rounds"])  # on either backend
    # the backend that really ran the ClientApps: no Ray in the default run
    assert [_results(tmp_path / d)["summary"]["engine_backend"] for d in "abc"] == ["processes", "ray", "ray"]
    assert "ClientAppActor" not in local.stderr and "ClientAppActor" in on_ray.stderr
    assert "round 2/2" in local.stdout  # progress line per round
    assert "fedavg on digits (cnn): 6 devices, 3 per round, 2 rounds, scenario corrupted" in local.stdout  # the first line


def test_sweep_over_baselines_survives_a_crashed_job(tmp_path):
    # Two of the four jobs crash their ServerApp when round 1 starts (faults.crash_server_round=1).
    sweep = _run(
        ["-m", "algorithm=local,none", "faults.crash_server_round=null,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        tmp_path,
        timeout=600,
    )
    assert sweep.returncode == 1, sweep.stderr[-3000:]  # a job failed, the sweep finished
    assert "2 job(s) failed" in sweep.stderr
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4
    statuses = {}
    for job in jobs:
        results = _results(job)
        statuses[(results["config"]["algorithm"]["name"], results["config"]["faults"]["crash_server_round"])] = results
    assert statuses[("local", None)]["status"] == "completed"
    assert statuses[("none", None)]["status"] == "completed"
    assert len(statuses[("none", None)]["rounds"]) == 2
    for name in ("local", "none"):
        failed = statuses[(name, 1)]
        assert failed["status"] == "failed" and "injected ServerApp crash in round 1" in failed["error"]
        assert failed["rounds"] == []
    crashed_dirs = [job for job in jobs if (job / "error.json").exists()]
    assert len(crashed_dirs) == 2
    for job in crashed_dirs:
        error = json.loads((job / "error.json").read_text())
        assert error["error"].startswith("InjectedServerCrash: injected ServerApp crash in round 1")
        assert "in _ready" in error["traceback"] and "in run_round" in error["traceback"]  # the ServerApp's frames
    # LA sends nothing up but metrics; NA trains nothing
    local_rounds = statuses[("local", None)]["rounds"]
    assert all(r["uplink_bytes"] < 2000 for r in local_rounds)
    # before and after on the same devices: NA's "after" is its "before"; LA records both
    for record in statuses[("none", None)]["rounds"]:
        assert record["accuracy"] == pytest.approx(record["pretrained_accuracy"], abs=1e-12)
    assert all(0 <= r["pretrained_accuracy"] <= 1 for r in local_rounds)
    summary = statuses[("local", None)]["summary"]
    assert summary["accuracy_gain"] == pytest.approx(summary["final_accuracy"] - summary["final_pretrained_accuracy"])


def test_bad_override_fails_fast_with_a_readable_message(tmp_path):
    result = _run([f"hydra.run.dir={tmp_path / 'bad'}", "fleet.per_round=60"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert "fleet.per_round=60 exceeds fleet.devices=6" in result.stderr
    assert not (tmp_path / "bad" / "results.json").exists()  # failed before Ray


def test_eclm_end_to_end_sends_each_device_its_own_sub_model(tmp_path):
    # A tight round budget makes the comm/compute knapsack bind per device class.
    run = _run(
        [
            f"hydra.run.dir={tmp_path / 'eclm'}",
            "algorithm=eclm",
            "model=modular_mlp",
            "model.width=16",
            "model.modules_per_layer=8",
            "algorithm.eclm.round_budget_s=0.4",
            "algorithm.eclm.size_cap=1.0",
            "algorithm.eclm.ability_epochs=1",
            "fleet.per_round=5",
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = _results(tmp_path / "eclm")
    assert results["status"] == "completed"
    sizes = {}
    for record in results["rounds"]:
        sizes.update(record.get("train_submodel_bytes_by_device") or {})
        assert 0 < record["train_submodel_fraction"] <= 1.0
    assert len(sizes) >= 3
    assert len(set(sizes.values())) >= 2  # messages really differ in size per device budget


def test_cema_end_to_end_uploads_fewer_samples_than_it_sees(tmp_path):
    run = _run(
        [
            f"hydra.run.dir={tmp_path / 'cema'}",
            "algorithm=cema",
            "scenario=online",
            "scenario.stream_batch=32",
            "rounds=3",
            "algorithm.cema.foundation_model=cnn",
            "algorithm.cema.foundation_width=16",
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = _results(tmp_path / "cema")
    assert results["status"] == "completed"
    seen = sum(3 * 32 for _ in results["rounds"])  # 3 devices x 32 samples per round
    uploaded = sum(r.get("train_uploaded_samples", 0) for r in results["rounds"])
    assert 0 <= uploaded < seen
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["rounds"])
    assert results["rounds"][-1].get("train_online_accuracy_by_domain")


def test_elasticdnn_end_to_end_remodels_small_surrogates_on_each_domain(tmp_path):
    run = _run(
        [
            f"hydra.run.dir={tmp_path / 'elastic'}",
            "+experiment=elasticdnn_digits",
            "algorithm=elasticdnn",  # _run defaults to fedavg otherwise
            "scenario.stream_batch=24",
            "algorithm.elasticdnn.epochs=2",
            "pretrain.epochs=1",
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = _results(tmp_path / "elastic")
    assert results["status"] == "completed"
    for record in results["rounds"]:
        assert len(record["clients"]) == 3 and not record["failures"]
        assert 0 < record["train_model_fraction"] < 0.3  # real smaller networks (20 % of filters)
        assert 0.0 <= record["accuracy"] <= 1.0 and record["train_peak_memory_bytes"] > 0
    assert results["rounds"][-1]["train_adapted_accuracy_by_domain"]
    first, second = results["rounds"]
    returning = set(first["clients"]) & set(second["clients"])  # they hold the master already
    per_master = first["downlink_bytes"] / len(first["clients"])
    assert second["downlink_bytes"] < (len(second["clients"]) - len(returning) + 0.01) * per_master
