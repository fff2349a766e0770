"""A run reused when it already finished with the same configuration: what presets and sweeps build on.

:func:`run_cached` starts ``python -m experiments.run <overrides>`` into a run folder unless that
folder holds a completed run whose stored configuration is the one the overrides compose to
now. A preset can therefore be stopped and started again: it redoes only what is missing or
stale. :func:`write_section` replaces one marked section of a document, keeping the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from experiments.results.aside import free_name
from experiments.resume.checkpoint import config_differences

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in experiments/<package>/)
#: Keys of a stored configuration that name where a run went or kept its caches, not what it ran.
WHERE_KEYS = ("output_dir", "dataset.cache_dir", "pretrain.cache_dir")
MISSING = "missing"  # the status of a run that is not there (absent, unfinished, stale)


def not_finished(status: str = MISSING) -> dict:
    """A run record with no rounds and no summary (a fresh dict each call) for a run that is not there."""
    return {"status": status, "rounds": [], "summary": {}}


def composed_config(overrides: list[str]) -> dict:
    """The JSON configuration ``experiments.run overrides`` would store (Hydra's own keys dropped)."""
    from experiments.config import compose
    from experiments.results.writer import to_json_safe
    from experiments.schema import to_dict

    return to_json_safe(to_dict(compose([o for o in overrides if not o.lstrip("+~").startswith("hydra.")])))


def run_cached(run_dir: Path, overrides: list[str], run: bool = True) -> dict:
    """``python -m experiments.run overrides`` into ``run_dir``, unless it already completed there.

    A completed run is reused only when its stored configuration is the one ``overrides``
    compose to now (a new option or default makes it stale); a stale run folder is moved
    aside to ``<name>.stale-<n>``, never overwritten. Code changes with the same configuration
    are not detected: delete the run folder to redo such a run.

    With ``run=False`` nothing is started, moved or written: a completed, current run is
    returned and anything else (absent, unfinished, failed, stale) comes back as
    :func:`not_finished`, with a note on stderr.

    Returns the run's results.json, or a failure record (the run's stderr is echoed).
    """
    path = run_dir / "results.json"
    if path.exists():
        stored = json.loads(path.read_text())
        stale = config_differences(stored.get("config") or {}, composed_config(overrides), WHERE_KEYS)
        if stored["status"] == "completed" and not stale:
            return stored
        if not run:
            why = f"stored configuration differs at {', '.join(stale[:5])}" if stale else f"status {stored['status']}"
            print(f"{run_dir}: not counted ({why}; --no-run starts nothing)", file=sys.stderr)
            return not_finished()
        if stale:
            aside = free_name(run_dir)
            print(f"{run_dir}: the stored configuration differs at {', '.join(stale[:5])}; "
                  f"moved to {aside.name} and re-running", file=sys.stderr)
            run_dir.rename(aside)
    if not run:
        print(f"{run_dir}: no finished run (--no-run starts nothing)", file=sys.stderr)
        return not_finished()
    proc = subprocess.run([sys.executable, "-m", "experiments.run", *overrides], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
    return json.loads(path.read_text()) if path.exists() else not_finished("failed")


def write_section(path: Path, body: str, begin: str, end: str, title: str = "# Results") -> None:
    """Replace the section of ``path`` between the ``begin`` and ``end`` markers, keeping the rest.

    A document without the markers gets the section appended; a missing document starts with ``title``.
    """
    text = path.read_text() if path.exists() else f"{title}\n"
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text.split(begin)[0] + section + text.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
