"""``python -m experiments.bench``: what the platform costs beyond the training itself.

One run measures, side by side, with repetitions and medians:

* the project's FedAvg (``python -m experiments.run algorithm=fedavg``) against a minimal
  plain-Flower FedAvg app (:mod:`experiments.bench.plain`) on the same model, data and cohort
  size, and against the same rounds in a single-process plain loop (:mod:`experiments.bench.floor`,
  the physical floor of this machine), and the start-up against the floor of importing the
  stack (:mod:`experiments.bench.stack`) and doing one such round on every core;
* ECLM, CEMA and ElasticDNN rounds against the project's FedAvg (ECLM also against FedAvg on
  ECLM's own network, the like-for-like ratio);
* the levers undone: Flower's own message pump (``pump``) and Flower's Ray backend (``ray``)
  instead of the project's process backend;
* fleets of 100, 500 and 1,000 devices (cohorts 10, 25, 50): start-up to the end of round 1,
  per-round time, peak PSS and RSS of the whole process tree (workers and Ray's processes included).

Every measurement runs in a fresh process (start-up and memory are measured as a user meets
them) under a hard timeout, while a thread samples the tree's memory
(:mod:`experiments.bench.memory`). Cloud pre-training and the fleet's device partitions are
cached by the project; the caches are warmed first, in a process of its own, and that time is
excluded (reported apart).

Output: a JSON (``docs/performance.json`` or ``--out``) and a markdown report
(``docs/PERFORMANCE.md``, or beside ``--out``) with the machine, the command and every ratio
next to its target.

``--first-run`` times only README's first command, cold and warm
(:mod:`experiments.bench.first_run`), and writes that section of the markdown report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from experiments.bench.cases import (
    GROUPS,
    Case,
    model_overrides,
    parse_sizes,
    plan_cases,
)
from experiments.bench.report import (
    GIB,
    evaluate_targets,
    fmt,
    issue_targets,
    machine_description,
    median,
    startup_floor,
    summarize_case,
    targets_table,
    write_report,
)
from experiments.bench.runs import ROOT, RUNNERS, run_child, skipped_record
from experiments.config import compose
from experiments.results.aside import move_aside

DEFAULT_JSON = ROOT / "docs" / "performance.json"
DEFAULT_MARKDOWN = ROOT / "docs" / "PERFORMANCE.md"
DEFAULT_SIZES = "100,500,1000"
DEFAULT_REPS = 3  # repetitions and medians; 3 is the least that has a median
DEFAULT_ROUNDS = 5  # round 1 holds the start-up; rounds 2-5 give 4 per-round samples a rep
#: --quick: one repetition, 3 rounds, the default fleet only (a smoke run, not a measurement).
QUICK = {"reps": 1, "rounds": 3, "sizes": "100"}
#: --tiny: the smallest workload that runs every part (tests/test_e2e.py's small run).
TINY_SIZES = "6:3"
TINY_OVERRIDES = (
    "dataset.proxy_samples=300",
    "dataset.global_test_samples=200",
    "dataset.partition.size_min=20",
    "dataset.partition.size_max=40",
    "dataset.partition.test_size=10",
    "pretrain.epochs=2",
    "model.width=8",
    "algorithm.local_epochs=1",
)
DEFAULT_TIMEOUT_S = 1800.0  # a hung child is killed after this (1,000 devices on 2 cores: minutes)
#: Pre-training happens once per configuration and may be long: ECLM's cloud training of the
#: modular ResNet18 on the digits proxy part took ~45 min on the busy 2-core development machine.
DEFAULT_WARM_TIMEOUT_S = 4 * 3600.0


def warm_server(flat: dict) -> None:
    """What the cloud does before round 1, without Ray: fills the pre-training and partition caches.

    Mirrors ``experiments.server_app.run_cloud``: data (and the fleet's partition, cached under
    ``dataset.cache_dir`` like the pre-training), network, cached pre-training on the proxy
    part, then the algorithm's strategy arguments (CEMA pre-trains its foundation model there).
    """

    from experiments.algorithms import ALGORITHMS
    from experiments.config import from_flat
    from experiments.data import build_federated_data
    from experiments.pretrain.cache import pretrained_model
    from experiments.pretrain.networks import build_run_model

    cfg = from_flat(flat)
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    _ = data.partitions
    algorithm = ALGORITHMS[cfg.algorithm.name]
    model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
    algorithm.check_model(model)
    model = pretrained_model(cfg, model, data, algorithm.pretraining(cfg))
    algorithm.strategy_args(cfg, model, data)


def warm(cfg, work: Path, timeout_s: float) -> dict:
    """Fill the pre-training caches for ``cfg`` in a child without Ray (excluded from timing)."""
    from experiments.config import to_flat

    config_path = work / "warm.json"
    config_path.write_text(json.dumps(to_flat(cfg)))
    cmd = [sys.executable, "-m", "experiments.bench", "--warm", str(config_path)]
    record = run_child(cmd, work / "warm.log", timeout_s)
    return {"status": record["status"], "total_s": record["total_s"], **({"error": record["error"]} if "error" in record else {})}


# --------------------------------------------------------------------------- the run
def fresh_folder(folder: Path) -> Path:
    """An empty ``folder`` for one run; an earlier run's folder there (``--work`` reused) is moved aside.

    A run timed in a used folder would see the earlier ``results.json`` first and record no
    round at all (measured: every start-up and round time came out n/a).
    """
    aside = move_aside(folder)
    if aside is not None:
        print(f"{folder} held an earlier run: moved to {aside.name}", flush=True)
    folder.mkdir(parents=True)
    return folder


def measure(
    cases: Sequence[Case], rounds: int, reps: int, work: Path, timeout_s: float, warm_timeout_s: float
) -> tuple[dict, dict]:
    """Warm every configuration's caches, then run the cases, repetitions interleaved."""
    configs = {case.name: compose([*case.overrides, f"rounds={rounds}"]) for case in cases}
    warmup = {}
    for case in (c for c in cases if c.runner == "project"):  # the baselines use no pre-training
        fresh_folder(work / f"warm-{case.name}")
        warmup[case.name] = warm(configs[case.name], work / f"warm-{case.name}", warm_timeout_s)
        print(f"warm-up {case.name}: {warmup[case.name]['status']} in {warmup[case.name]['total_s']:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {case.name: [] for case in cases}
    for rep in range(reps):
        for case in cases:
            folder = fresh_folder(work / f"{case.name}-rep{rep}")
            if warmup.get(case.name, {"status": "ok"})["status"] == "ok":
                record = RUNNERS[case.runner](case, configs[case.name], folder, timeout_s)
            else:  # measuring it would time the pre-training the warm-up could not finish
                record = skipped_record(warmup[case.name])
            runs[case.name].append(record)
            print(f"rep {rep + 1}/{reps} {case.name}: {record['status']}, start-up {fmt(record.get('startup_s'), 1)} s, "
                  f"per round {fmt(median(record.get('round_s', [])))} s, peak PSS "
                  f"{fmt(record['peak_pss_bytes'], 2, GIB)} GiB", flush=True)
    return warmup, runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, help=f"repetitions of every case (default {DEFAULT_REPS})")
    parser.add_argument("--rounds", type=int, help=f"rounds a run (default {DEFAULT_ROUNDS}; >= 2)")
    parser.add_argument("--sizes", help=f"fleet sizes N or N:K, default size first (default {DEFAULT_SIZES})")
    parser.add_argument("--cases", default=",".join(GROUPS), help=f"case groups (default: all of {','.join(GROUPS)})")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repetition, 3 rounds, 100 devices")
    parser.add_argument("--tiny", action="store_true", help=f"the tiniest workload ({TINY_SIZES} devices, small data)")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override for every run (repeatable)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds before a run is killed")
    parser.add_argument("--warm-timeout", type=float, default=DEFAULT_WARM_TIMEOUT_S,
                        help="seconds before a pre-training warm-up is killed")
    parser.add_argument("--out", type=Path, help=f"the JSON (default {DEFAULT_JSON.relative_to(ROOT)})")
    parser.add_argument("--markdown", type=Path, help="the report (default docs/PERFORMANCE.md, or beside --out)")
    parser.add_argument("--work", type=Path, help="keep every run's folder and log here (default: a temporary folder)")
    parser.add_argument("--first-run", action="store_true",
                        help="time README's first command cold (empty caches) and warm; writes its section of --markdown")
    parser.add_argument("--warm", type=Path, help=argparse.SUPPRESS)  # internal: warm the caches of a flat config
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    args.reps = args.reps or quick.get("reps", DEFAULT_REPS)
    args.rounds = args.rounds or quick.get("rounds", DEFAULT_ROUNDS)
    args.sizes = args.sizes or (TINY_SIZES if args.tiny else quick.get("sizes", DEFAULT_SIZES))
    if args.reps < 1 or args.rounds < 2:
        parser.error(f"--reps must be >= 1 and --rounds >= 2 (round 1 holds the start-up), got {args.reps}, {args.rounds}")
    args.markdown = args.markdown or (DEFAULT_MARKDOWN if args.out is None else args.out.with_suffix(".md"))
    args.out = args.out or DEFAULT_JSON
    return args


def display_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (what the report shows)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def run_benchmark(args: argparse.Namespace, argv: Sequence[str], work: Path) -> dict:
    """Plan, warm, measure and summarise; returns the report (also written to disk)."""
    sizes = parse_sizes(args.sizes)
    base = (*(TINY_OVERRIDES if args.tiny else ()), *args.override)
    groups = [g.strip() for g in args.cases.split(",") if g.strip()]
    eclm_model = model_overrides(compose([*base, "algorithm=eclm"]).model) if "eclm" in groups else ()
    cases = plan_cases(sizes, groups, base, eclm_model)
    machine = machine_description()
    warmup, runs = measure(cases, args.rounds, args.reps, work, args.timeout, args.warm_timeout)
    summary = {case.name: summarize_case(runs[case.name]) for case in cases}
    summary.update(startup_floor(summary, sizes[0][0], machine["usable_cores"]))
    report = {
        "command": shlex.join(["python", "-m", "experiments.bench", *argv]),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "json": display_path(args.out),
        "machine": machine,
        "load_average_at_end": os.getloadavg()[0],
        "settings": {"quick": args.quick, "tiny": args.tiny, "reps": args.reps, "rounds": args.rounds, "sizes": args.sizes, "cases": groups,
                     "overrides": list(base), "timeout_s": args.timeout, "warm_timeout_s": args.warm_timeout},
        "cases": [dataclasses.asdict(case) for case in cases],
        "warmup": warmup,
        "runs": runs,
        "summary": summary,
        "targets": evaluate_targets(issue_targets(sizes), summary),
    }
    write_report(report, args.out, args.markdown)
    return report


def time_first_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--first-run``: the cold and warm default command (:mod:`experiments.bench.first_run`)."""
    from experiments.bench import first_run

    with tempfile.TemporaryDirectory(prefix="edgecloud-first-run-") as folder:
        work = args.work or Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        records = first_run.first_run(work, args.timeout, args.override)
    machine = machine_description()
    where = f"{machine['cpu_model']}, {machine['usable_cores']} cores, load {machine['load_average_at_start']:.1f} at start"
    command = shlex.join(["python", "-m", "experiments.bench", *argv])
    first_run.write_section(args.markdown, first_run.markdown(records, command, where))
    print(f"wrote {display_path(args.markdown)}")
    return 0 if all(r["exit_code"] == 0 for r in records.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 1 if any run failed (the report is written anyway)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.warm is not None:
        warm_server(json.loads(args.warm.read_text()))
        return 0
    if args.first_run:
        return time_first_run(args, argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        report = run_benchmark(args, argv, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="edgecloud-bench-") as folder:
            report = run_benchmark(args, argv, Path(folder))
    print("\n".join(targets_table(report["targets"])))
    print(f"report: {args.markdown}")
    failed = any(r["status"] != "ok" for records in report["runs"].values() for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
