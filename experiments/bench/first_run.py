"""``python -m experiments.bench --first-run``: README's first command, timed as a new user meets it.

Cold: the default command (``python -m experiments.run``, nothing overridden but where the
caches and the run folder live) with empty cache folders, so the cloud pre-trains and the fleet
is partitioned. Warm: the same command again on the filled caches. Each run is a child process;
the report records its wall time, when its first line of output came (the "silent minute"),
when round 1 finished, and the before/after accuracy its results.json holds. Python's bytecode
and the OS page cache stay warm between runs (a fresh clone's first import is slower still).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.bench.runs import ROOT
from experiments.results.writer import load_results

#: The README's targets for the first command on the 2-core machine: seconds cold and warm.
COLD_TARGET_S = 180.0
WARM_TARGET_S = 90.0
#: The first output must come within this many seconds (no silent start).
FIRST_OUTPUT_TARGET_S = 10.0
BEGIN, END = "<!-- first-run:begin -->", "<!-- first-run:end -->"
#: How a round-1 progress line starts (experiments.results.progress.ProgressLine).
ROUND_ONE_PREFIX = "round 1/"


def run_timed(cmd: Sequence[str], log: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``cmd``, teeing its merged output into ``log``; seconds to first output, round 1 and exit."""
    started = time.perf_counter()
    first_output = round_one = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w", encoding="utf-8") as sink:
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in child.stdout:
            now = time.perf_counter() - started
            first_output = now if first_output is None and line.strip() else first_output
            round_one = now if round_one is None and line.startswith(ROUND_ONE_PREFIX) else round_one
            sink.write(line)
            sink.flush()  # the log is readable while the run goes on
            if now > timeout_s:
                child.kill()
        code = child.wait()
    return {"exit_code": code, "wall_s": time.perf_counter() - started, "first_output_s": first_output,
            "round_one_s": round_one}


def first_run(work: Path, timeout_s: float, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The cold and the warm run (module docstring) in ``work``; their records."""
    caches = [f"pretrain.cache_dir={work / 'cache'}", f"dataset.cache_dir={work / 'cache'}"]
    records = {}
    for phase in ("cold", "warm"):
        run_dir = work / phase
        cmd = [sys.executable, "-m", "experiments.run", *caches, *overrides, f"hydra.run.dir={run_dir}"]
        record = run_timed(cmd, work / f"{phase}.log", timeout_s)
        summary = load_results(run_dir)["summary"] if (run_dir / "results.json").exists() else {}
        record.update({key: summary.get(key) for key in ("final_accuracy", "final_pretrained_accuracy",
                                                          "accuracy_gain", "mean_accuracy_gain")})
        records[phase] = record
        print(f"first run, {phase}: {record['wall_s']:.1f} s (first output {_s(record['first_output_s'])}, "
              f"round 1 done {_s(record['round_one_s'])}), gain {record['accuracy_gain']}", flush=True)
    return records


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def markdown(records: dict[str, dict], command: str, machine: str) -> list[str]:
    """The report's section: one row per run against the targets."""
    lines = [
        BEGIN,
        "## The first run (README's first command)",
        "",
        f"Command: `{command}`. Machine: {machine}. Cold: empty cache folders; warm: the same command "
        "on the filled caches.",
        "",
        "| run | wall | target | first output | round 1 done | accuracy before -> after | gain (final; mean over rounds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, target in (("cold", COLD_TARGET_S), ("warm", WARM_TARGET_S)):
        r = records[phase]
        verdict = "met" if r["exit_code"] == 0 and r["wall_s"] <= target else "NOT met"
        accuracy = f"{_pct(r['final_pretrained_accuracy'])} -> {_pct(r['final_accuracy'])}"
        gain = f"{_pts(r['accuracy_gain'])}; {_pts(r['mean_accuracy_gain'])}"
        lines.append(f"| {phase} | {r['wall_s']:.1f} s | <= {target:.0f} s ({verdict}) | {_s(r['first_output_s'])} | "
                     f"{_s(r['round_one_s'])} | {accuracy} | {gain} |")
    return [*lines, END]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _pts(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} points"


def write_section(path: Path, section: list[str]) -> None:
    """Put ``section`` between its markers in ``path`` (appended the first time)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = "\n".join(section)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
