"""ElasticDNN's claims on the embedded digits: evolving domains and co-running apps (seed 003, IV).

``python -m experiments.claims.elastic`` runs the ``evolving`` scenario (each device its own
seeded order of the 15 corruptions, one domain a round, every device in every round) for
ElasticDNN and every comparison method of ``algorithm.elasticdnn.method`` (same-size
``source``/``bn_adapt``/``tent``/``shot`` on a magnitude-pruned master, ``full`` = the whole
master retrained), each a real ``python -m experiments.run`` per seed with identical model,
pre-training, dataset, scenario and seed overrides (so a seed's runs load one cached pre-trained
master), into ``<out>/sev<severity>/<method>/seed<seed>``. It then runs the multi-application
comparison (:mod:`experiments.claims.elastic_multiapp`) on each seed's master and writes the
per-domain accuracy curves (PNG), the method and memory tables, the targets with their paired
intervals and verdicts, the multi-app tables, the command and the machine time into
``docs/RESULTS.md`` (between the ElasticDNN markers; the rest of the file is kept).

Every cell is a mean with its 95 % interval over the seeds (``--seeds``, default 0 1 2);
``--no-run`` writes the section from the finished runs and reports only, starting nothing.
Costs are like for like: the memory each method keeps on the device while adapting (master, bank,
adapted model, optimizer state) and the training step's peak, measured on the tensors
(:mod:`models.elastic.footprint`); speed-ups from measured wall time and from the FLOPs counted on
the executed work (:mod:`models.elastic.ledger`), both recorded per round by the devices.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from experiments.claims import PRESET_SCALE, elastic_multiapp
from experiments.claims.elastic_multiapp_tables import multiapp_section, multiapp_targets
from experiments.claims.elastic_rows import DEFAULT_OUT, DEFAULT_SEVERITY, ROOT, run_folder
from experiments.claims.elastic_tables import mean_curves, memory_table, method_table, plot_curves, targets
from experiments.claims.seeds import (
    add_seed_arguments,
    command_line,
    runs_wall_time_s,
    seeds_caption,
    unfinished,
)
from experiments.resume.cached_run import run_cached, write_section

#: The runs in table order: label -> overrides of ``algorithm.elasticdnn``. Each method retrains
#: with its best (lr, epochs) of ``python -m experiments.claims.elastic_tune``, searched on the
#: tuning split (originals, devices and streams no evaluated run uses; the paper searches every
#: method's hyperparameters, IV; docs/RESULTS.md has the grid): ElasticDNN's best is its default in
#: conf/algorithm/elasticdnn.yaml, which ``full`` shares (the speed-up compares the same passes of
#: the same loss); Tent's and SHOT's are set here. ``source`` and ``bn_adapt`` train nothing.
#: ``elasticdnn_no_update`` is the paper's ablation without master updates (IV),
#: ``elasticdnn_bn_write_back`` also writes the surrogates' BN gamma/beta back (the paper is
#: silent), ``elasticdnn_sandwich_largest`` pre-trains its own master with the full master only
#: besides the drawn share (the default also trains the smallest share), ``elasticdnn_bank_fedavg``
#: the extension that averages the devices' banks.
RUNS = {
    "elasticdnn": ("method=elasticdnn",),
    "elasticdnn_no_update": ("method=elasticdnn", "master_update=false"),
    "elasticdnn_bn_write_back": ("method=elasticdnn", "write_back_bn=true"),
    "elasticdnn_sandwich_largest": ("method=elasticdnn", "sandwich=largest"),
    "elasticdnn_bank_fedavg": ("method=elasticdnn", "bank_fedavg=true"),
    "source": ("method=source",),
    "bn_adapt": ("method=bn_adapt",),
    "tent": ("method=tent", "lr=0.003", "epochs=20"),
    "shot": ("method=shot", "lr=0.001", "epochs=10"),
    "full": ("method=full",),
}
#: Variants reported against ``elasticdnn``: (label, what differs, +1 when the variant has it, -1
#: when ``elasticdnn`` has it), so every effect reads as "having it minus not having it".
VARIANT_EFFECTS = (
    ("elasticdnn_no_update", "master updates (the paper's ablation: +11.33 / +6.62 points)", -1),
    ("elasticdnn_bn_write_back", "writing the surrogates' BN gamma/beta back too (paper silent)", +1),
    ("elasticdnn_sandwich_largest", "the smallest share in the master's pre-training (sandwich rule)", -1),
    ("elasticdnn_bank_fedavg", "FedAvg over the devices' banks (extension)", +1),
)
#: Method names of the runs (models.elastic.remodel.METHODS and the ablation/extension labels).
METHODS = tuple(RUNS)
BEGIN, END = "<!-- elastic-claims:begin -->", "<!-- elastic-claims:end -->"
PLOT_NAME = "elastic_accuracy_per_domain.png"
#: What the preset's setting is described as, for the section's first paragraph.
SETTING = ("its own order of the 15 corruptions at severity {severity}, 100 unlabeled samples to adapt on and 100 "
           "held-out per domain; master: the gated ResNet14 at width {width}, pre-trained on the clean proxy part; "
           "same-size baselines on its 20 % largest-L1 filters, fine-tuned on the proxy part by the cloud "
           "(`algorithm.elasticdnn.compress_epochs`), adapted continually")


def shared_overrides(args: argparse.Namespace, seed: int | None = None) -> list[str]:
    """Overrides every method's run shares (same model, pre-training, data, scenario, fleet, seed).

    ``seed`` defaults to the first of ``args.seeds``.
    """
    return [
        "algorithm=elasticdnn",
        *PRESET_SCALE,
        "scenario=evolving",
        f"scenario.severity={args.severity}",
        f"model.width={args.width}",
        f"dataset.partition.kind={args.partition}",
        f"fleet.devices={args.devices}",
        f"fleet.per_round={args.devices}",
        "fleet.availability_min=1.0",  # every device adapts to every domain of its sequence
        f"rounds={args.rounds}",
        f"seed={args.seeds[0] if seed is None else seed}",
        # the preset's own cache: its runs share one master per seed, and a master cached by another
        # version of the pre-training code under the same key is never picked up
        f"pretrain.cache_dir={args.out / 'pretrain_cache'}",
    ]


def run_one(label: str, seed: int, args: argparse.Namespace) -> dict:
    """One evolving-domain run of :data:`RUNS` ``label`` at ``seed``; its results.json (or a record of why not).

    With ``args.no_run`` nothing is started: a finished run is returned, anything else is missing.
    """
    run_dir = run_folder(args.out, args.severity, label, seed)
    options = [f"algorithm.elasticdnn.{item}" for item in RUNS[label]]
    return run_cached(run_dir, [*shared_overrides(args, seed), *options, f"hydra.run.dir={run_dir}"],
                      run=not args.no_run)


def collect_runs(args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    """``runs[label][seed]`` for ``args.methods``, seed by seed so that early seeds give complete pairs first."""
    runs: dict[str, dict[int, dict]] = {label: {} for label in args.methods}
    for seed in args.seeds:
        for label in args.methods:
            result = runs[label][seed] = run_one(label, seed, args)
            accuracy = result.get("summary", {}).get("final_accuracy")
            print(f"{label} seed {seed}: {result.get('status')} (final accuracy {accuracy})", flush=True)
    return runs


def _methods(text: str) -> str:
    if text not in RUNS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose from {', '.join(RUNS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The preset's command line (also the default configuration of ``experiments.claims.elastic_tune``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15, help="domains per device (15 = each corruption once)")
    parser.add_argument("--severity", type=int, default=DEFAULT_SEVERITY)
    parser.add_argument("--width", type=int, default=16, help="master width (16: ResNet56's, the preset's)")
    add_seed_arguments(parser)
    parser.add_argument("--partition", default="iid", help="how samples reach devices (iid: every class)")
    parser.add_argument("--methods", type=_methods, nargs="+", default=list(METHODS),
                        help="the runs to make and tabulate (default: all; the targets need elasticdnn, tent, "
                             "shot and full)")
    parser.add_argument("--sizes", type=float, nargs="+", default=list(elastic_multiapp.CANDIDATE_SIZES))
    parser.add_argument("--apps", type=int, nargs="+", default=list(elastic_multiapp.APP_COUNTS))
    parser.add_argument("--skip-multiapp", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md")
    return parser


def section(args: argparse.Namespace, runs: Mapping[str, Mapping[int, dict]], reports: Mapping[int, dict | None],
            command: str, elapsed_s: float, plot: Path) -> str:
    """The markdown of the ElasticDNN section: setting, command, time, tables, targets, multi-app comparison."""
    missing = unfinished(runs, args.seeds)
    counted_s = runs_wall_time_s(run for by_seed in runs.values() for run in by_seed.values())
    multiapp_s = sum((r or {}).get("wall_s", 0.0) for r in reports.values())
    multiapp = ["Multi-app comparison: skipped (--skip-multiapp)."] if args.skip_multiapp else \
        multiapp_section(reports, args.seeds, with_targets=False)
    return "\n".join([
        "## ElasticDNN on digits (evolving domains, same-size baselines, co-running apps)",
        "",
        f"Command: `{command}` ({args.devices} devices, all in every round, {args.rounds} domains each: "
        f"{SETTING.format(severity=args.severity, width=args.width)}). Machine: {platform.machine()}, 2 cores shared "
        f"with other jobs (times are slower and noisier than on a quiet machine). Wall time: the counted runs' "
        f"rounds {counted_s / 60:.1f} min in all (plus each run's start-up), the multi-app measurements "
        f"{multiapp_s / 60:.1f} min; this invocation {elapsed_s / 60:.1f} min (finished runs and reports under "
        f"`{_shown(args.out)}` are reused, delete them to redo; each seed's pre-trained master is cached under "
        f"`pretrain_cache` there{'; written with --no-run, starting none' if args.no_run else ''}).",
        "",
        "Cells: " + seeds_caption(args.seeds)
        + (f" Not counted: {', '.join(missing)}." if missing else " Every asked run completed."),
        "",
        f"![accuracy per domain]({plot.name})",
        "",
        "Per domain, mean over devices and domains, then over seeds (accuracy on the domain's held-out batch after "
        "adapting). Speed-ups are `full`'s cost over the method's, seed by seed: measured adaptation wall time, and "
        "the FLOPs counted by torch on the work the adaptation executed (surrogate generation, BN re-estimation, "
        "scoring and loss passes, training steps, the master update). Device memory while adapting = everything "
        "the method keeps (master, bank, adapted model, optimizer state); training peak = that + the larger "
        "training step's gradients and saved activations (parts below):",
        "",
        method_table(runs, args.seeds),
        "",
        "Memory by part (bytes measured on the tensors, mean over domains; the domain's samples, the same for "
        "every method, are not included):",
        "",
        memory_table(runs, args.seeds),
        "",
        "Targets (each quantity formed per seed, then its 95 % interval; met only when the whole interval clears "
        "the target):",
        "",
        *targets(runs, args.seeds, VARIANT_EFFECTS),
        *([] if args.skip_multiapp else multiapp_targets(reports, args.seeds)),
        "",
        *multiapp,
    ])


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (for the docs), else as given."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Run (or, with --no-run, only read) the preset's runs and write the ElasticDNN section of docs/RESULTS.md."""
    args = build_parser().parse_args(argv)
    started = time.time()
    runs = collect_runs(args)
    reports = {} if args.skip_multiapp or "elasticdnn" not in runs else \
        elastic_multiapp.seed_reports(runs["elasticdnn"], args)
    plot = plot_curves(mean_curves(runs, args.seeds), args.doc.parent / PLOT_NAME)
    body = section(args, runs, reports, command_line("experiments.claims.elastic", argv), time.time() - started, plot)
    write_section(args.doc, body, BEGIN, END)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
