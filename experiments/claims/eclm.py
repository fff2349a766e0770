"""ECLM's Table 1 on the embedded digits benchmark: NA, LA, AN, FedAvg, HeteroFL, ECLM.

``python -m experiments.claims.eclm`` runs every method on label skew with 2 and 5
classes per device, once per seed (``--seeds``, default 0 1 2; each a real
``python -m experiments.run`` into ``m<classes>/<method>/seed<seed>``), then writes the table
(mean and 95 % interval over the seeds per cell), the bytes, the ECLM issue's targets (each
judged on a per-seed paired quantity, :mod:`experiments.claims.eclm_table`) and the machine
time into ``docs/RESULTS.md`` (the section between the ECLM markers is replaced; the rest of
the file is kept). A run that already completed with the same configuration is reused, so an
interrupted preset resumes; ``--no-run`` writes the section from the finished runs alone.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from experiments.claims import PRESET_SCALE
from experiments.claims.eclm_table import LABELS, accuracy_table, cost_table, difference_table, targets
from experiments.claims.seeds import (
    add_seed_arguments,
    command_line,
    runs_wall_time_s,
    seed_dir,
    seeds_caption,
    unfinished,
)
from experiments.resume.cached_run import run_cached, write_section

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in experiments/<package>/)
#: Method -> overrides (column labels: eclm_table.LABELS). Baselines use the plain CIFAR ResNet18
#: the modular one decomposes; AN its multi-branch version; width 16 is the narrow CPU variant.
METHODS = {
    "none": ["algorithm=none", "model=resnet18"],
    "local": ["algorithm=local", "model=resnet18"],
    "an": ["algorithm=an", "model=multibranch_cnn"],
    "fedavg": ["algorithm=fedavg", "model=resnet18"],
    "heterofl": ["algorithm=heterofl", "model=resnet18"],
    "eclm": ["algorithm=eclm", "model=modular_resnet18"],
}
BEGIN, END = "<!-- eclm-claims:begin -->", "<!-- eclm-claims:end -->"


def run_folder(method: str, classes: int, seed: int, out: Path) -> Path:
    """The folder of one run: ``<out>/m<classes>/<method>/seed<seed>``."""
    return seed_dir(out / f"m{classes}" / method, seed)


def run_overrides(method: str, classes: int, seed: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The ``experiments.run`` overrides of one Table 1 run (method, partition, fleet, scenario, seed, folder)."""
    return [
        *method_overrides(method, classes),
        f"rounds={args.rounds}",
        f"fleet.devices={args.devices}",
        f"fleet.per_round={args.per_round}",
        f"seed={seed}",
        f"hydra.run.dir={run_folder(method, classes, seed, out)}",
        *scenario_overrides(args),
    ]


def scenario_overrides(args: argparse.Namespace) -> list[str]:
    """ECLM 7.2's one adaptation step on one shared domain: ``args.shift`` at ``args.severity`` (or clean).

    The default run's mix of domains is not the paper's setting, so the preset pins this scenario.
    """
    if args.shift == "none":
        return ["scenario=one_step"]
    return ["scenario=one_step", f"scenario.corruptions=[{args.shift}]", f"scenario.severity={args.severity}"]


def shift_folder(args: argparse.Namespace) -> Path:
    """The folder of this shift's runs: ``<out>/<shift><severity>`` (``<out>/clean`` without a shift)."""
    return args.out / (f"{args.shift}{args.severity}" if args.shift != "none" else "clean")


def run_one(method: str, classes: int, seed: int, args: argparse.Namespace) -> dict:
    """One ``experiments.run`` of ``method`` at ``seed``; returns its results.json (or a record of why not).

    With ``args.no_run`` nothing is started: a finished run is returned, anything else is missing.
    """
    out = shift_folder(args)
    return run_cached(run_folder(method, classes, seed, out), run_overrides(method, classes, seed, args, out),
                      run=not args.no_run)


def method_overrides(method: str, classes: int) -> list[str]:
    """The method's own overrides at ``classes`` per device (ECLM's subtasks match the classes, 7.1)."""
    own = [f"algorithm.eclm.subtask_size={classes}", "algorithm.eclm.ability_epochs=3"] if method == "eclm" else []
    return [*METHODS[method], *PRESET_SCALE, f"dataset.partition.classes_per_device={classes}", *own]


def collect_runs(args: argparse.Namespace) -> dict[tuple[int, str], dict[int, dict]]:
    """``runs[(classes, method)][seed]``, run seed by seed so that early seeds give complete pairs first."""
    runs: dict[tuple[int, str], dict[int, dict]] = {(c, m): {} for c in args.classes for m in METHODS}
    for seed in args.seeds:
        for classes in args.classes:
            for method in METHODS:
                result = runs[(classes, method)][seed] = run_one(method, classes, seed, args)
                print(f"{classes} classes {method} seed {seed}: {result['summary'].get('final_accuracy')}", flush=True)
    return runs


def build_parser() -> argparse.ArgumentParser:
    """The preset's command line (sizes, seeds, --no-run, where runs and the document go)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    add_seed_arguments(parser)
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "claims_eclm")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md")
    parser.add_argument(
        "--shift", default="fog", help="corruption of every device's data (the cloud's proxy stays clean); 'none' for clean"
    )
    parser.add_argument("--severity", type=int, default=5)
    return parser


def section(args: argparse.Namespace, runs: dict, command: str, elapsed_s: float) -> str:
    """The markdown of the ECLM section: setting, command, tables with intervals, targets with verdicts."""
    labelled = {f"{c} classes {LABELS[m]}": by_seed for (c, m), by_seed in runs.items()}
    missing = unfinished(labelled, args.seeds)
    counted_s = runs_wall_time_s(run for by_seed in runs.values() for run in by_seed.values())
    edge = (
        f"Edge data: {args.shift} at severity {args.severity} (the cloud pre-trains on the clean proxy "
        "part; on clean digits the pre-trained model already scores ~99 % and every method saturates)."
        if args.shift != "none"
        else "Edge data: clean."
    )
    return "\n".join(
        [
            "## ECLM Table 1 on digits (label skew)",
            "",
            edge,
            "",
            f"Command: `{command}` ({args.devices} devices, {args.per_round} per round, "
            f"{args.rounds} rounds, seeds {' '.join(map(str, args.seeds))}). Machine: {platform.machine()}, "
            f"{platform.processor() or 'cpu'}, 2 cores; the counted runs' rounds took {counted_s / 60:.1f} min "
            f"of wall time in all, this invocation {elapsed_s / 60:.1f} min (finished runs are reused"
            f"{'; written with --no-run, starting none' if args.no_run else ''}).",
            "",
            "Cells: "
            + seeds_caption(args.seeds)
            + (f" Not counted: {', '.join(missing)}." if missing else " Every asked run completed."),
            "",
            "Accuracy after adaptation (%), the final round's cohort on its own local test data:",
            "",
            accuracy_table(runs, args.seeds),
            "",
            "ECLM minus each method, final accuracy in points, paired by seed (mean ± 95 % half-width, n pairs):",
            "",
            difference_table(runs, args.seeds),
            "",
            "Traffic and time per run (bytes: mean over the completed seeds; seconds: mean ± 95 % half-width (n)):",
            "",
            cost_table(runs, args.seeds),
            "",
            "Targets (each quantity formed per seed, then its 95 % interval; met only when the whole interval "
            "clears the target):",
            "",
            *targets(runs, args.seeds),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run (or, with --no-run, only read) the preset's runs and write the ECLM section of docs/RESULTS.md."""
    args = build_parser().parse_args(argv)
    started = time.time()
    runs = collect_runs(args)
    body = section(args, runs, command_line("experiments.claims.eclm", argv), time.time() - started)
    write_section(args.doc, body, BEGIN, END)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
