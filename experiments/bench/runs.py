"""How the benchmark makes and times one run: a child process per run, its memory sampled.

:func:`run_child` starts a command in a process group of its own, samples the memory of its
whole tree (:mod:`experiments.bench.memory`) and kills the group at a hard timeout;
:class:`RoundWatcher` and :func:`timings` turn a run's ``results.json`` into start-up and
per-round times; :data:`RUNNERS` maps each case's runner (project | plain | floor | stack) to
the function that runs it. Planning the cases and the report are :mod:`experiments.bench.cli`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from experiments.bench.cases import Case
from experiments.bench.memory import TreeMemorySampler

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in experiments/<package>/)
POLL_S = 0.02  # how often the parent looks at a child's results.json (rounds last >= 0.1 s)


def child_env() -> dict[str, str]:
    """The environment of a child: a fresh local Ray unless the user names one.

    Without ``RAY_ADDRESS``, ``ray.init()`` attaches to the latest cluster started with
    ``ray start`` on this machine (someone else's, on a shared host), whose memory and
    cores are not the benchmark's.
    """
    return {**os.environ, "RAY_ADDRESS": os.environ.get("RAY_ADDRESS") or "local", "PYTHONUNBUFFERED": "1"}


def _kill_group(pgid: int) -> None:
    """SIGKILL the process group this benchmark started (the child and Ray's processes)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(cmd: Sequence[str], log_path: Path, timeout_s: float, poll: Callable[[], None] | None = None) -> dict:
    """Run ``cmd`` in a new process group, sample its tree's memory, kill it at ``timeout_s``.

    ``poll()`` is called every :data:`POLL_S` while it runs and once after it exits.

    Returns
    -------
    dict
        ``status`` (ok | failed | timeout), ``returncode``, ``launched_unix``,
        ``total_s`` (launch to exit), memory peaks (bytes), ``max_processes``,
        ``load_average`` at launch, and ``error`` (the log's tail) unless ok.
    """
    load = os.getloadavg()[0]
    with open(log_path, "w", encoding="utf-8") as log:
        launched = time.time()
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = TreeMemorySampler(proc.pid).start()
        deadline, timed_out = time.monotonic() + timeout_s, False
        while proc.poll() is None:
            if poll is not None:
                poll()
            if time.monotonic() > deadline:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
                break
            time.sleep(POLL_S)
        total = time.time() - launched
        memory = sampler.stop()
    _kill_group(proc.pid)  # leftovers of a child that exited (Ray normally stops its own)
    if poll is not None:
        poll()
    status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
    record = {"status": status, "returncode": proc.returncode, "launched_unix": launched, "total_s": total,
              **dataclasses.asdict(memory), "load_average": load}
    if status != "ok":
        record["error"] = log_path.read_text(errors="replace")[-2000:]
    return record


class RoundWatcher:
    """Watches a run's ``results.json``: the file's modification time when each round appears.

    ``ResultsWriter`` rewrites the file right after every round, so the time a round first
    shows up in it is the end of that round (to the file system's timestamp resolution).
    When several rounds appear at one look, only the last of them gets that time (the
    earlier ones ended before it, when, is unknown).
    """

    def __init__(self, results_path: Path) -> None:
        self.path = results_path
        self.round_ends: dict[int, float] = {}
        self._seen: set[int] = set()
        self._last_mtime: int | None = None
        self.data: dict | None = None

    def __call__(self) -> None:
        """Look once; record the rounds that appeared since the last look."""
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime == self._last_mtime:
                return
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # not written yet, or replaced while being read: look again next time
        self._last_mtime, self.data = mtime, data
        new = [int(r["round"]) for r in data.get("rounds", []) if int(r["round"]) not in self._seen]
        self._seen.update(new)
        if new:
            self.round_ends[max(new)] = mtime / 1e9


def timings(launched: float, round_ends: dict[int, float], rounds: int) -> dict:
    """Start-up (launch to the end of round 1) and per-round times (rounds 2.., consecutive ends).

    A round whose end, or whose predecessor's end, was not seen is left out.
    """
    per_round = [round_ends[r] - round_ends[r - 1] for r in range(2, rounds + 1) if {r, r - 1} <= round_ends.keys()]
    startup = round_ends[1] - launched if 1 in round_ends else None
    return {"startup_s": startup, "round_s": per_round}


def run_project(case: Case, cfg, work: Path, timeout_s: float) -> dict:
    """The project's door, as a user runs it: ``python -m experiments.run <overrides>``."""
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "experiments.run", *case.overrides, f"rounds={cfg.rounds}", f"hydra.run.dir={run_dir}"]
    watcher = RoundWatcher(run_dir / "results.json")
    record = run_child(cmd, work / "child.log", timeout_s, poll=watcher)
    record.update(timings(record["launched_unix"], watcher.round_ends, cfg.rounds))
    results = watcher.data or {}
    record["server_round_s"] = [r.get("wall_time_s") for r in results.get("rounds", [])][1:]
    record["discovery_s"] = (results.get("summary") or {}).get("discovery_s")
    finished = len(results.get("rounds", []))
    if record["status"] == "ok" and finished < cfg.rounds:
        record.update(status="failed", error=f"results.json holds {finished} of {cfg.rounds} rounds")
    return record


def run_module(module: str, cfg, work: Path, timeout_s: float) -> dict:
    """A baseline module (``experiments.bench.plain`` or ``experiments.bench.floor``) in a child."""
    from experiments.config import to_flat

    config_path, out = work / "config.json", work / "out.json"
    config_path.write_text(json.dumps(to_flat(cfg)))
    cmd = [sys.executable, "-m", module, "--config", str(config_path), "--out", str(out)]
    record = run_child(cmd, work / "child.log", timeout_s)
    if record["status"] == "ok":
        result = json.loads(out.read_text())
        ends = dict(enumerate(result["round_end_unix"], start=1))
        record.update(timings(record["launched_unix"], ends, cfg.rounds))
        if "rounds" in result:  # the floor's pure training time per round
            record["train_s"] = [r["train_s"] for r in result["rounds"]][1:]
    return record


def run_stack(case: Case, cfg, work: Path, timeout_s: float) -> dict:
    """The stack's import alone (:mod:`experiments.bench.stack`) in a child; its start-up is launch to exit."""
    record = run_child([sys.executable, "-m", "experiments.bench.stack"], work / "child.log", timeout_s)
    record.update(startup_s=record["total_s"] if record["status"] == "ok" else None, round_s=[])
    return record


def skipped_record(warmup: dict) -> dict:
    """The record of a run not made because its warm-up failed."""
    return {"status": "skipped", "total_s": None, "peak_pss_bytes": None, "peak_rss_bytes": None,
            "max_processes": None, "error": f"warm-up {warmup['status']}: {warmup.get('error', '')}"}


RUNNERS = {
    "project": run_project,
    "plain": lambda case, cfg, work, t: run_module("experiments.bench.plain", cfg, work, t),
    "floor": lambda case, cfg, work, t: run_module("experiments.bench.floor", cfg, work, t),
    "stack": run_stack,
}
