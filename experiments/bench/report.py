"""The benchmark's arithmetic and its report: medians, ratios against the performance targets,
the machine description and ``docs/PERFORMANCE.md`` (used by :mod:`experiments.bench.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

GIB = 1024**3
#: Packages whose versions shape the numbers (named in the report).
VERSIONED_PACKAGES = ("flwr", "ray", "torch", "numpy", "hydra-core")


# --------------------------------------------------------------------------- statistics
def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not > 0."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return numerator / denominator


def verdict(value: float | None, limit: float | None) -> str:
    """``met`` if ``value <= limit``, ``not met`` if above, ``n/a`` without a value, ``-`` without a limit."""
    if limit is None:
        return "-"
    if value is None:
        return "n/a"
    return "met" if value <= limit else "not met"


def summarize_case(records: Sequence[dict]) -> dict:
    """Medians over a case's successful repetitions.

    ``round_s`` pools every per-round time of every repetition (rounds 2..R); start-up,
    memory and whole-run time are medians of the per-repetition values.
    """
    ok = [r for r in records if r["status"] == "ok"]
    pooled = [t for r in ok for t in r.get("round_s", [])]
    train = [t for r in ok for t in r.get("train_s", [])]
    return {
        "reps_ok": len(ok),
        "reps": len(records),
        "startup_s": median([r.get("startup_s") for r in ok]),
        "round_s": median(pooled),
        "round_s_min": min(pooled, default=None),
        "round_s_max": max(pooled, default=None),
        "train_s": median(train),
        "total_s": median([r["total_s"] for r in ok]),
        "peak_pss_bytes": median([r["peak_pss_bytes"] for r in ok]),
        "peak_rss_bytes": median([r["peak_rss_bytes"] for r in ok]),
        "max_processes": max((r["max_processes"] for r in ok), default=None),
    }


def startup_floor(summary: dict[str, dict], devices: int, cores: int) -> dict[str, dict]:
    """The start-up floor at ``devices``: the stack's import plus the plain loop's round on ``cores`` cores.

    A lower bound on any run's start-up to the end of round 1 on this machine: it must import
    the stack (case ``stack``, :mod:`experiments.bench.stack`), then do one round's work,
    which the plain loop (case ``floor``) does on one core, on at most ``cores`` at once;
    data, networks, workers and messages come on top. Returns
    ``{"startup_floor@<devices>": {"startup_s": value}}``, the value None when a part is missing.
    """
    stack = (summary.get(f"stack@{devices}") or {}).get("startup_s")
    loop_round = (summary.get(f"floor@{devices}") or {}).get("round_s")
    value = None if stack is None or loop_round is None or cores < 1 else stack + loop_round / cores
    return {f"startup_floor@{devices}": {"startup_s": value}}


@dataclass(frozen=True)
class Target:
    """A ratio (or an absolute value when ``baseline`` is None) and the issue's limit for it."""

    label: str
    metric: str
    case: str
    baseline: str | None
    limit: float | None


def issue_targets(sizes: Sequence[tuple[int, int]]) -> list[Target]:
    """The performance targets (limit set) and the reference ratios beside them (limit None)."""
    d = sizes[0][0]
    largest = max(n for n, _ in sizes)
    rows = [
        Target("project FedAvg round / plain-Flower FedAvg round", "round_s", f"fedavg@{d}", f"plain@{d}", 1.05),
        Target("ECLM round / project FedAvg round, same network", "round_s", f"eclm@{d}", f"fedavg_eclm_network@{d}", 1.25),
        Target("ECLM round / project FedAvg round (default CNN)", "round_s", f"eclm@{d}", f"fedavg@{d}", None),
        Target("CEMA round / project FedAvg round", "round_s", f"cema@{d}", f"fedavg@{d}", None),
        Target("ElasticDNN round / project FedAvg round", "round_s", f"elasticdnn@{d}", f"fedavg@{d}", None),
        Target("project FedAvg round / plain loop round", "round_s", f"fedavg@{d}", f"floor@{d}", 0.75),
        Target("plain-Flower round / plain loop round", "round_s", f"plain@{d}", f"floor@{d}", None),
        Target("project start-up to end of round 1 (s)", "startup_s", f"fedavg@{d}", None, 8.0),
        Target("the stack's import alone: Hydra, torch, Flower's runtime (s)", "startup_s", f"stack@{d}", None, None),
        Target("start-up floor: the stack's import + a plain loop round / cores (s)", "startup_s",
               f"startup_floor@{d}", None, None),
        Target("project start-up / start-up floor", "startup_s", f"fedavg@{d}", f"startup_floor@{d}", None),
        Target("plain-Flower start-up to end of round 1 (s)", "startup_s", f"plain@{d}", None, None),
        Target("project peak PSS / plain loop peak PSS", "peak_pss_bytes", f"fedavg@{d}", f"floor@{d}", 1.5),
        Target("plain-Flower peak PSS / plain loop peak PSS", "peak_pss_bytes", f"plain@{d}", f"floor@{d}", None),
    ]
    for n in sorted({d, largest}):
        rows.append(Target(f"project FedAvg round at {n} devices, Flower's message pump / the fast pump", "round_s",
                           f"fedavg_flower_pump@{n}", f"fedavg@{n}", None))
        for metric, what in (("round_s", "round"), ("startup_s", "start-up"), ("peak_pss_bytes", "peak PSS")):
            rows.append(Target(f"project FedAvg {what} at {n} devices, Ray backend / process backend", metric,
                               f"fedavg_ray@{n}", f"fedavg@{n}", None))
    if largest != d:
        rows.append(Target(f"project peak PSS at {largest} / at {d} devices", "peak_pss_bytes",
                           f"fedavg@{largest}", f"fedavg@{d}", 1.1))
    return rows


def evaluate_targets(targets: Sequence[Target], summary: dict[str, dict]) -> list[dict]:
    """Each target's value from the case summaries, and whether it is met."""
    rows = []
    for target in targets:
        value = (summary.get(target.case) or {}).get(target.metric)
        if target.baseline is not None:
            value = ratio(value, (summary.get(target.baseline) or {}).get(target.metric))
        rows.append({**dataclasses.asdict(target), "value": value, "verdict": verdict(value, target.limit)})
    return rows


# --------------------------------------------------------------------------- the report
def _read_first(path: str, prefix: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith(prefix)), None)
    except OSError:
        return None


def machine_description() -> dict:
    """Cores, memory, CPU model, load and the versions that shape the numbers."""
    memory_kib = _read_first("/proc/meminfo", "MemTotal")
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": int(memory_kib.split()[0]) / 1024**2 if memory_kib else None,
        "cpu_model": _read_first("/proc/cpuinfo", "model name") or platform.processor() or None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "load_average_at_start": os.getloadavg()[0],
    }


def fmt(value: float | None, digits: int = 2, scale: float = 1.0) -> str:
    """``value / scale`` with ``digits`` decimals, or ``n/a`` for a missing value."""
    return "n/a" if value is None else f"{value / scale:.{digits}f}"


def targets_table(rows: Sequence[dict]) -> list[str]:
    """Markdown lines: each measure, its value, the issue's target and the verdict."""
    lines = ["| measure | value | target | verdict |", "|---|---|---|---|"]
    for row in rows:
        limit = "-" if row["limit"] is None else f"<= {row['limit']:g}"
        lines.append(f"| {row['label']} | {fmt(row['value'])} | {limit} | {row['verdict']} |")
    return lines


def cases_table(cases: Sequence[dict], summary: dict[str, dict]) -> list[str]:
    """Markdown lines: one row per case (``name``, ``runner``, ``devices``, ``per_round``) with its medians."""
    lines = [
        "| case | runner | devices | cohort | reps ok | start-up to end of round 1 (s) | per round, median (min-max) (s) "
        "| training only (s) | peak PSS (GiB) | peak RSS (GiB) | processes | whole run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        s = summary[case["name"]]
        spread = f"{fmt(s['round_s'])} ({fmt(s['round_s_min'])}-{fmt(s['round_s_max'])})"
        lines.append(
            f"| {case['name']} | {case['runner']} | {case['devices']} | {case['per_round']} | {s['reps_ok']}/{s['reps']} "
            f"| {fmt(s['startup_s'], 1)} | {spread} | {fmt(s['train_s'])} | {fmt(s['peak_pss_bytes'], 2, GIB)} "
            f"| {fmt(s['peak_rss_bytes'], 2, GIB)} | {s['max_processes'] or 'n/a'} | {fmt(s['total_s'], 1)} |"
        )
    return lines


#: Load average (1 min) per usable core above which the report warns that timings are noisy
#: (assumption: half the cores busy with other work already shifts round times visibly).
BUSY_LOAD_PER_CORE = 0.5


def warnings(report: dict) -> list[str]:
    """Bold lines (each followed by a blank line) for a smoke run or a machine busy at the start.

    Only the load before the first run tells of other work: the load at the end is mostly
    the benchmark's own last run (a simulation keeps both cores busy).
    """
    machine, settings = report["machine"], report["settings"]
    lines = []
    if settings.get("quick") or settings.get("tiny"):
        lines += ["**A smoke run (--quick/--tiny): it checks the benchmark works; its numbers are not a measurement.**", ""]
    at_start = machine["load_average_at_start"]
    if at_start > BUSY_LOAD_PER_CORE * machine["usable_cores"]:
        lines += [f"**The machine was busy before the benchmark started (load average {at_start:.1f} on "
                  f"{machine['usable_cores']} cores): re-run on a quiet machine before reading the ratios.**", ""]
    return lines


def markdown_report(report: dict) -> str:
    """The whole ``PERFORMANCE.md``: machine, command, targets, cases, method, failures."""
    machine, settings = report["machine"], report["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    warm_s = sum(w["total_s"] for w in report["warmup"].values())
    lines = [
        "# Performance",
        "",
        f"Written by `{report['command']}` on {report['created']} (ratios and medians: `{report['json']}`).",
        "",
        f"Machine: {machine['cores']} cores ({machine['usable_cores']} usable), {fmt(machine['memory_gib'], 1)} GiB RAM, "
        f"{machine['cpu_model']}; {machine['os']}; Python {machine['python']}; {versions}. "
        f"Load average (1 min) at start {machine['load_average_at_start']:.2f}, at end {report['load_average_at_end']:.2f} "
        "(the end includes the benchmark's own last run).",
        "",
        *warnings(report),
        f"Settings: {settings['reps']} repetition(s), {settings['rounds']} rounds a run, sizes {settings['sizes']}, "
        f"extra overrides {list(settings['overrides']) or 'none'}.",
        "",
        "## Targets",
        "",
        *targets_table(report["targets"]),
        "",
        "## Runs",
        "",
        *cases_table(report["cases"], report["summary"]),
        "",
        "## How it is measured",
        "",
        "- Every run is a fresh process, timed from launch; a thread samples the RSS and PSS "
        "(`/proc/<pid>/smaps_rollup`) of the process and all its descendants (workers, Ray's processes) every "
        "0.2 s; peaks are of the sums.",
        "- project: `python -m experiments.run <overrides>` with the default `engine.backend=auto`, i.e. the "
        "process backend (`experiments/engine/processes.py`: workers from a fork server forked off the driver, no Ray); "
        "`fedavg_ray` is the same run on Flower's Ray backend (`engine.backend=ray`), `fedavg_flower_pump` "
        "with Flower's own message pump (`engine.fast_pump=false`). A round ends when `results.json` shows "
        "it (its modification time). plain: Flower's built-in `FedAvg` and a minimal ClientApp "
        "(`experiments/bench/plain.py`) on Flower's simulation as it ships (Ray), same model, data partition, "
        "local training, cohort size and resources per ClientApp; Flower samples its cohort unseeded. floor: "
        "the same FedAvg rounds in one process without Flower (`experiments/bench/floor.py`), torch with "
        "`engine.torch_threads` threads. All three do the same work a round: cohort training, weighted "
        "average, the cohort's local evaluation and the global test set. The floor uses one core; the "
        "simulations need two at once, so other load on the machine costs them more. stack: "
        "`python -m experiments.bench.stack`, which imports Hydra, torch and Flower's app APIs and simulation "
        "runtime and exits; the start-up floor adds a plain loop round divided by the usable cores to it (a lower "
        "bound: data, networks, workers and messages come on top).",
        "- per round: time between the ends of consecutive rounds, rounds 2 to R of every repetition pooled; "
        "start-up: launch to the end of round 1 (imports, data, workers or Ray, discovery, round 1).",
        f"- Cloud pre-training and the device partitions are cached by the project; the caches were warmed first, in a process without "
        f"a simulation, and excluded from every timing (warm-up took {warm_s:.1f} s).",
        "- ECLM runs its own network (`model=auto`); the like-for-like target compares it with FedAvg on that network.",
    ]
    failures = [(name, r) for name, records in report["runs"].items() for r in records if r["status"] != "ok"]
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {name}: {r['status']}: {last_line(r.get('error'))}" for name, r in failures]
    return "\n".join(lines) + "\n"


def last_line(text: str | None) -> str:
    """The last non-empty line of ``text`` (an error's summary), or an empty string."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def write_report(report: dict, json_path: Path, markdown_path: Path) -> None:
    """Write the JSON and the markdown report (folders created as needed)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    markdown_path.write_text(markdown_report(report))
