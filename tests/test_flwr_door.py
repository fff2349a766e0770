"""`flwr run .` through a real SuperLink gives the same run as the Hydra door (slow: ~40 s).

The test starts a simulation SuperLink on a free loopback port, points a Flower CLI
connection at it (in a private FLWR_HOME), runs the app with `flwr run`, compares its
results.json with `python -m experiments.run` on the same config, and stops the
SuperLink's whole process group by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_e2e import HOST_TIMES, ROOT, SMALL, _free_port

BIN = Path(sys.executable).parent


def _wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"SuperLink did not open port {port} within {timeout_s} s")


@pytest.fixture
def superlink(tmp_path):
    """A simulation SuperLink on 127.0.0.1 and a FLWR_HOME whose connection reaches it."""
    port = _free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "edgecloud-test"\n\n'
        f'[superlink.edgecloud-test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_port(port)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def _flat(overrides: list[str]) -> str:
    """Hydra overrides as a Flower --run-config string (strings quoted for TOML)."""
    parts = []
    for item in overrides:
        key, value = item.split("=", 1)
        try:
            float(value)
            parts.append(f"{key}={value}")
        except ValueError:
            parts.append(f"{key}='{value}'")
    return " ".join(parts)


def _comparable(rounds):
    return [{k: v for k, v in r.items() if k not in HOST_TIMES} for r in rounds]


def test_flwr_run_matches_the_hydra_door(tmp_path, superlink):
    cache = f"pretrain.cache_dir={tmp_path / 'cache'}"
    small = ["algorithm=fedavg", *SMALL]
    hydra = subprocess.run(
        [sys.executable, "-m", "experiments.run", *small, cache, f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert hydra.returncode == 0, hydra.stderr[-3000:]
    # Flower's run_config is flat: the algorithm group's name is the key algorithm.name
    run_config = _flat(["algorithm.name=fedavg", *SMALL, cache, f"output_dir={tmp_path / 'flwr'}"])
    flwr = subprocess.run(
        [str(BIN / "flwr"), "run", ".", "edgecloud-test", "--stream", "--run-config", run_config,
         "--federation-config", "num-supernodes=6"],
        cwd=ROOT, env=superlink, capture_output=True, text=True, timeout=300,
    )
    assert flwr.returncode == 0, (flwr.stdout + flwr.stderr)[-3000:]
    via_flwr = json.loads((tmp_path / "flwr" / "results.json").read_text())
    via_hydra = json.loads((tmp_path / "hydra" / "results.json").read_text())
    assert via_flwr["status"] == "completed"
    assert via_flwr["config"] == {**via_hydra["config"], "output_dir": str(tmp_path / "flwr")}
    assert _comparable(via_flwr["rounds"]) == _comparable(via_hydra["rounds"])
