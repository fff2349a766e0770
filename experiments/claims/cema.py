"""CEMA's poster table on the embedded digits: online accuracy per corruption and uploads.

``python -m experiments.claims.cema`` runs every on-device baseline (source, bn_adapt,
onda, lame, pl, tent, cotta, eta, eta_upload) and CEMA over online per-device streams of
all 15 corruptions, at severity 3 and 5 (each a real ``python -m experiments.run``), and
writes methods x corruptions + average + uploaded samples into ``docs/RESULTS.md``
(between the CEMA markers).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from experiments.claims import PRESET_SCALE
from experiments.claims.eclm import run_cached, write_section
from experiments.data.corruptions import CORRUPTIONS

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is in experiments/<package>/)
METHODS = ("source", "bn_adapt", "onda", "lame", "pl", "tent", "cotta", "eta", "eta_upload", "cema")
BEGIN, END = "<!-- cema-claims:begin -->", "<!-- cema-claims:end -->"


def run_one(method: str, severity: int, args: argparse.Namespace) -> dict:
    """One online run of ``method``; returns its results.json (or a failure record)."""
    run_dir = args.out / args.partition / f"sev{severity}" / method
    overrides = [
        f"algorithm={method}",
        *PRESET_SCALE,
        "scenario=online",
        f"scenario.corruptions=[{','.join(CORRUPTIONS)}]",
        f"scenario.severity={severity}",
        f"scenario.batches_per_domain={args.batches_per_domain}",
        f"scenario.stream_batch={args.batch}",
        f"fleet.devices={args.devices}",
        f"fleet.per_round={args.devices}",
        "fleet.availability_min=1.0",  # every device sees every batch of its stream
        f"rounds={len(CORRUPTIONS) * args.batches_per_domain}",
        f"dataset.partition.kind={args.partition}",
        f"seed={args.seed}",
        f"hydra.run.dir={run_dir}",
    ]
    return run_cached(run_dir, overrides)


def row(results: dict) -> tuple[dict, float | None, int]:
    """Per-corruption online accuracy, its average and the uploaded samples of one run."""
    if not results.get("rounds"):
        return {}, None, 0
    last = results["rounds"][-1]
    by_domain = last.get("train_online_accuracy_by_domain") or {}
    uploads = int(sum(r.get("train_uploaded_samples") or 0 for r in results["rounds"]))
    return by_domain, last.get("train_online_accuracy"), uploads


def table(severity: int, runs: dict[str, dict]) -> str:
    """Markdown: methods x corruptions (%) + average + uploads."""
    short = [c.split("_")[0][:6] for c in CORRUPTIONS]
    lines = [
        f"Severity {severity}:",
        "",
        "| method | " + " | ".join(short) + " | avg | uploads |",
        "|---|" + "---|" * (len(CORRUPTIONS) + 2),
    ]
    for method in METHODS:
        by_domain, average, uploads = row(runs[method])
        cells = [f"{100 * by_domain[c]:.1f}" if c in by_domain else "-" for c in CORRUPTIONS]
        avg = "-" if average is None else f"{100 * average:.1f}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {avg} | {uploads} |")
    return "\n".join(lines)


def targets(runs: dict[str, dict]) -> str:
    """The CEMA issue's target at one severity: uploads <= 0.4x eta_upload's, accuracy >= ETA's."""
    _, cema_acc, cema_up = row(runs["cema"])
    _, eta_acc, _ = row(runs["eta"])
    _, _, eta_up = row(runs["eta_upload"])
    if cema_acc is None or eta_acc is None:
        return "- not measured (a run failed)"
    ratio = "n/a (eta_upload uploaded nothing)" if eta_up == 0 else f"{cema_up / eta_up:.2f}x"
    return f"- CEMA uploads {cema_up} vs eta_upload {eta_up} ({ratio}; target <= 0.4x); online accuracy CEMA {100 * cema_acc:.1f} vs ETA {100 * eta_acc:.1f} (target: >=)"


def main(argv: list[str] | None = None) -> int:
    """Run the preset and write the CEMA section of docs/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--severities", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--batches-per-domain", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--partition", default="iid", help="how test samples reach devices: iid (TTA's usual shuffled stream) or label_skew"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "claims_cema")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args(argv)
    started = time.time()
    sections = []
    for severity in args.severities:
        runs = {}
        for method in METHODS:
            runs[method] = run_one(method, severity, args)
            print(f"severity {severity} {method}: {row(runs[method])[1]}", flush=True)
        sections += [table(severity, runs), "", targets(runs), ""]
    command = "python -m experiments.claims.cema " + " ".join(argv if argv is not None else sys.argv[1:])
    body = "\n".join(
        [
            "## CEMA poster table on digits (online, per-device corruption streams)",
            "",
            f"Command: `{command.strip()}` ({args.devices} devices, all in every round, {args.partition} samples, "
            "each device its own order of the "
            f"15 corruptions, {args.batches_per_domain} batches of {args.batch} per corruption; edge model: the "
            f"small CNN, CEMA's foundation: the narrow ResNet18). Machine: {platform.machine()}, 2 cores; wall "
            f"time {(time.time() - started) / 60:.1f} min. Online accuracy (%): each batch predicted before any "
            "adaptation on it, accumulated per corruption over the run.",
            "",
            *sections,
        ]
    )
    write_section(args.doc, body, BEGIN, END)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
