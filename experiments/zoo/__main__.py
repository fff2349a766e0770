"""``python -m experiments.zoo``: run every algorithm with its name alone and write docs/ALGORITHMS.md."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from experiments.algorithms import ALGORITHMS
from experiments.resume.cached_run import ROOT, run_cached, write_section
from experiments.zoo.table import ONLINE_SOURCE, markdown_table, zoo_row

BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
TITLE = "# Algorithms out of the box"


def overrides(name: str, seed: int, out: Path) -> list[str]:
    """The run of ``name`` with its name alone: only the seed and the run folder are set."""
    return [f"algorithm={name}", f"seed={seed}", f"hydra.run.dir={out / name}"]


def collect(names: list[str], args: argparse.Namespace) -> tuple[dict[str, dict], float]:
    """Every algorithm's results (``source`` first: the online methods' "before"), and the host's
    mean 1-minute load average sampled after each run (how busy the machine was)."""
    order = sorted(names, key=lambda n: n != ONLINE_SOURCE)
    runs, loads = {}, [os.getloadavg()[0]]
    for name in order:
        runs[name] = run_cached(args.out / name, overrides(name, args.seed, args.out), run=not args.no_run)
        loads.append(os.getloadavg()[0])
        print(f"{name}: {runs[name].get('status')}", flush=True)
    return runs, sum(loads) / len(loads)


def commit() -> str:
    """The repository's short commit (``unknown`` outside a git checkout)."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def host(args: argparse.Namespace, load: float, minutes: float) -> str:
    """How busy the host was while the runs ran (unknown when the table is written from finished runs)."""
    if args.no_run:
        return "written from finished runs (--no-run), so the host's load during them is not known here"
    return (f"mean 1-minute load {load:.1f} while this command ran (above the core count, other jobs shared the "
            f"host and wall times are inflated); the sweep took {minutes:.1f} min (runs reused from an earlier "
            "sweep with the same configuration count as zero)")


def most_batches_per_device(results: dict) -> int:
    """How many rounds the most-sampled device of a run took part in (an online device's batches)."""
    counts: dict[int, int] = {}
    for record in results.get("rounds") or []:
        for pid in record.get("cohort") or []:
            counts[pid] = counts.get(pid, 0) + 1
    return max(counts.values(), default=0)


def document(rows_md: str, args: argparse.Namespace, minutes: float, load: float, batches: int) -> str:
    """The section: command, machine (and how busy it was), what the columns mean, the table."""
    names = " ".join(args.algorithms) if args.algorithms != list(ALGORITHMS) else ""
    command = f"python -m experiments.zoo {names}".strip()
    return "\n".join([
        f"Command: `{command}` at commit {commit()}, seed {args.seed}; each row is "
        "`python -m experiments.run algorithm=<name>` with nothing else set (the quick start's fleet, rounds and "
        "data; the algorithm's own scenario and network). Machine: "
        f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores; {host(args, load, minutes)}.",
        "",
        "Accuracy before and after adaptation is measured on the same data: the pre-trained model on the same "
        "devices' local tests (ECLM and its baselines, mean over rounds), the device's model before it adapts to "
        "a domain on the same held-out batch (ElasticDNN, mean over rounds), the `source` run's online accuracy on "
        "the same seeded stream batches (CEMA and the TTA baselines). Traffic is uplink plus downlink; virtual time "
        "is the simulated devices' time, wall time the host's time in rounds. One seed: a point or two either way "
        f"is noise. At this fleet an online device predicts at most {batches} stream batch(es) in the run "
        "(the cohort changes every round), so the online methods differ only in what they do on a device's "
        "first batches: Tent, PL, ETA and CEMA's edge model predict a first batch with its own BN statistics, "
        "before any update lands.",
        "",
        rows_md,
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the zoo and write its section of the document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algorithms", nargs="*", default=list(ALGORITHMS), help="default: every registered algorithm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "zoo")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "ALGORITHMS.md")
    parser.add_argument("--no-run", action="store_true", help="write the table from finished runs only")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.algorithms) - set(ALGORITHMS))
    if unknown:
        parser.error(f"unknown algorithm {unknown[0]!r}; choose from {sorted(ALGORITHMS)}")
    started = time.time()
    runs, load = collect(list(dict.fromkeys([*args.algorithms, ONLINE_SOURCE])), args)
    rows = [zoo_row(name, runs[name], runs.get(ONLINE_SOURCE)) for name in args.algorithms]
    reasons = {name: ALGORITHMS[name].caveat for name in args.algorithms if ALGORITHMS[name].caveat}
    batches = most_batches_per_device(runs[ONLINE_SOURCE])
    body = document(markdown_table(rows, reasons), args, (time.time() - started) / 60, load, batches)
    write_section(args.doc, body, BEGIN, END, title=TITLE)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
