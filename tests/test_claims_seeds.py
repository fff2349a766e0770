"""Claims presets over seeds: cells with intervals, paired targets and their verdicts, --no-run.

Runs are small hand-made results.json records (no real runs). Expected cells are worked out by
hand: mean ± t * s / sqrt(n), s with ddof=1, t_{0.975,1} = 12.706205, t_{0.975,2} = 4.302653
(so for three values the half-width is 2.484138 * s, for two 8.984682 * s).
"""

from __future__ import annotations

import json
import math

import pytest

from experiments.claims import cema, eclm_table
from experiments.claims import eclm as claims_eclm
from experiments.claims.seeds import (
    DEFAULT_SEEDS,
    add_seed_arguments,
    cell,
    command_line,
    per_seed,
    target_line,
    unfinished,
)
from experiments.results.intervals import mean_interval
from experiments.resume import cached_run
from experiments.resume.cached_run import composed_config, not_finished, run_cached

SEEDS = [0, 1, 2]


# --------------------------------------------------------------------------- ECLM records
def eclm_like(final, per_round_bytes=100.0, wall=1.0, accuracies=None, status="completed"):
    """Two rounds; ``per_round_bytes`` split evenly up/down; the last round's accuracy is ``final``."""
    accuracies = accuracies or [final / 2, final]
    rounds = [
        {"round": i + 1, "accuracy": a, "uplink_bytes": per_round_bytes / 2, "downlink_bytes": per_round_bytes / 2,
         "wall_time_s": wall, "sim_time_s": 2 * wall}
        for i, a in enumerate(accuracies)
    ]
    summary = {"final_accuracy": accuracies[-1], "total_uplink_bytes": per_round_bytes,
               "total_downlink_bytes": per_round_bytes, "wall_time_s": 2 * wall, "sim_time_s": 4 * wall}
    return {"status": status, "config": {}, "rounds": rounds, "summary": summary}


def eclm_runs():
    """2 classes x 6 methods x seeds 0-2 (the other methods' numbers only fill the table)."""
    runs = {(2, m): {s: eclm_like(0.5) for s in SEEDS} for m in eclm_table.LABELS}
    # FedAvg: final 0.60, 0.65, 0.70, 200 bytes a round -> 400 bytes in all, 1.0 s a round
    runs[(2, "fedavg")] = {s: eclm_like(f, 200.0) for s, f in zip(SEEDS, [0.60, 0.65, 0.70])}
    # ECLM: round 1 at final/2 (below FedAvg's final), round 2 reaches it after 2 rounds of 20, 24, 28 bytes
    # -> 40, 48, 56 bytes of FedAvg's 400: ratios 0.10, 0.12, 0.14; round wall 1.1, 1.2, 1.3 s
    runs[(2, "eclm")] = {
        s: eclm_like(f, b, w) for s, f, b, w in zip(SEEDS, [0.80, 0.84, 0.90], [20.0, 24.0, 28.0], [1.1, 1.2, 1.3])
    }
    runs[(2, "heterofl")] = {s: eclm_like(f) for s, f in zip(SEEDS, [0.85, 0.80, 0.95])}
    return runs


def test_seed_options_default_three_and_refuse_repeats(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_seed_arguments(parser)
    assert DEFAULT_SEEDS == (0, 1, 2)
    args = parser.parse_args([])
    assert args.seeds == [0, 1, 2] and args.no_run is False
    assert parser.parse_args(["--seeds", "4", "7", "--no-run"]).seeds == [4, 7]
    with pytest.raises(SystemExit):
        parser.parse_args(["--seeds", "0", "1", "0"])
    assert "seed 0 is given twice; list each seed once" in capsys.readouterr().err


def test_per_seed_counts_only_completed_runs_in_seed_order():
    runs = {2: eclm_like(0.3), 0: eclm_like(0.1), 1: eclm_like(0.2, status="failed")}
    values = per_seed(runs, eclm_table.final_accuracy, [0, 1, 2, 3])
    assert values[0] == 0.1 and values[2] == 0.3 and math.isnan(values[1]) and math.isnan(values[3])
    assert unfinished({"FA": runs}, [0, 1, 2, 3]) == ["FA seed 1 (failed)", "FA seed 3 (missing)"]
    assert unfinished({"FA": runs}, [0, 3, 4]) == ["FA seeds 3 4 (missing)"]


def test_cell_and_target_line_formats():
    # 0.60, 0.65, 0.70: mean 0.65, s = 0.05, half-width 2.484138 * 0.05 = 0.124207
    assert cell([0.60, 0.65, 0.70], 100, 1) == "65.0 ± 12.4 (n=3)"
    assert cell([0.60, math.nan], 100, 1) == "60.0 (n=1)"
    assert cell([math.nan]) == "-"
    line = target_line("x", mean_interval([0.10, 0.12, 0.14]), 0.2, at_least=False, digits=3)
    # 0.12 +- 2.484138 * 0.02 = 0.049683 -> [0.070, 0.170], wholly <= 0.2
    assert line == "- x: 0.120 ± 0.050 (n=3; target <= 0.200): **met**"


def test_eclm_table_cells_are_mean_and_half_width_with_n():
    row = eclm_table.accuracy_table(eclm_runs(), SEEDS).splitlines()[2].split(" | ")
    # FA 65.0 +- 12.4; ECLM 0.80, 0.84, 0.90: mean 0.846667, s = 0.050332, half-width 0.125033
    assert row[4] == "65.0 ± 12.4 (n=3)"
    assert row[6] == "84.7 ± 12.5 (n=3) |"


def test_eclm_targets_are_paired_by_seed_with_verdicts():
    lines = eclm_table.targets(eclm_runs(), SEEDS)
    # ECLM - FA = 0.20, 0.19, 0.20: mean 0.196667, s = 0.005774, half-width 0.014343 -> wholly >= 0
    assert lines[0] == "- final accuracy ECLM - FA (2 classes): 19.7 ± 1.4 points (n=3; target >= 0.0 points): **met**"
    # ECLM - HFL = -0.05, 0.04, -0.05: mean -0.02, s = 0.051962, half-width 0.129080 -> straddles 0
    assert lines[1] == ("- final accuracy ECLM - HFL (2 classes): -2.0 ± 12.9 points (n=3; target >= 0.0 points): "
                        "**undecided**")
    # traffic ratios 0.10, 0.12, 0.14: 0.120 +- 0.050 -> wholly <= 0.2
    assert lines[2].endswith("0.120 ± 0.050 (n=3; target <= 0.200): **met**")
    # round cost 1.1, 1.2, 1.3: mean 1.2, s = 0.1, half-width 0.248414 -> [0.95, 1.45] straddles 1.25
    assert lines[3] == "- wall time per round ECLM / FedAvg (2 classes): 1.20 ± 0.25 (n=3; target <= 1.25): **undecided**"


def test_a_missing_seed_shrinks_n_on_both_sides_of_a_pair():
    runs = eclm_runs()
    runs[(2, "fedavg")][2] = not_finished()
    assert eclm_table.accuracy_table(runs, SEEDS).splitlines()[2].split(" | ")[4] == "62.5 ± 31.8 (n=2)"
    # ECLM - FA on seeds 0, 1 only: 0.20, 0.19 -> 0.195 +- 12.706205 * 0.005 = 0.063531
    assert eclm_table.targets(runs, SEEDS)[0].startswith("- final accuracy ECLM - FA (2 classes): 19.5 ± 6.4 points (n=2;")


def test_a_seed_where_eclm_never_reaches_fedavg_keeps_the_traffic_target_from_being_met():
    runs = eclm_runs()
    runs[(2, "eclm")][1] = eclm_like(0.5, accuracies=[0.4, 0.5])  # FedAvg's seed 1 ends at 0.65
    ratios = eclm_table.traffic_ratios(runs[(2, "eclm")], runs[(2, "fedavg")], SEEDS)
    assert ratios[0] == pytest.approx(0.10) and math.isinf(ratios[1]) and ratios[2] == pytest.approx(0.14)
    line = eclm_table.traffic_line(ratios, SEEDS)
    assert "never reached in seed(s) 1" in line and line.endswith("**undecided**")
    assert eclm_table.traffic_line([math.inf, math.inf], [0, 1]).endswith("**missed**")


def test_eclm_difference_table_pairs_every_method():
    table = eclm_table.difference_table(eclm_runs(), SEEDS).splitlines()
    assert table[0] == "| data per device | ECLM - NA | ECLM - LA | ECLM - AN | ECLM - FA | ECLM - HFL |"
    assert table[2].split(" | ")[4] == "19.7 ± 1.4 (n=3)"


# --------------------------------------------------------------------------- CEMA records
def cema_like(online, uploads, gaussian, status="completed"):
    """Two rounds uploading ``uploads`` samples between them; the last round's cumulative accuracies."""
    last = {"train_online_accuracy": online, "train_uploaded_samples": uploads - uploads // 2,
            "train_online_accuracy_by_domain": {"gaussian_noise": gaussian}}
    return {"status": status, "config": {}, "summary": {},
            "rounds": [{"train_uploaded_samples": uploads // 2}, last]}


def cema_runs():
    runs = {m: {s: cema_like(0.5, 0, 0.5) for s in SEEDS} for m in cema.METHODS}
    runs["eta"] = {s: cema_like(a, 0, 0.5) for s, a in zip(SEEDS, [0.85, 0.86, 0.87])}
    runs["eta_upload"] = {s: cema_like(0.86, 100, 0.5) for s in SEEDS}
    runs["cema"] = {s: cema_like(a, u, g) for s, a, u, g in zip(SEEDS, [0.80, 0.82, 0.84], [30, 31, 32], [0.5, 0.6, 0.7])}
    return runs


def test_cema_row_shows_mean_per_corruption_and_intervals_for_avg_and_uploads():
    lines = cema.table(3, cema_runs(), SEEDS).splitlines()
    row = next(line for line in lines if line.startswith("| cema |")).split(" | ")
    assert row[1] == "60.0"  # gaussian noise 0.5, 0.6, 0.7: the mean alone
    assert row[2] == "-"  # no seed saw shot noise
    # avg 0.80, 0.82, 0.84: 82.0 +- 2.484138 * 0.02 = 4.97; uploads 30, 31, 32: 31 +- 2.484138 * 1 = 2
    assert row[-2:] == ["82.0 ± 5.0 (n=3)", "31 ± 2 (n=3) |"]


def test_cema_targets_paired_ratio_and_difference_with_verdicts():
    lines = cema.targets(5, cema_runs(), SEEDS)
    # uploads 0.30, 0.31, 0.32: mean 0.31, s = 0.01, half-width 0.024841 -> wholly <= 0.4
    assert lines[0] == "- uploads CEMA / eta_upload (severity 5): 0.31 ± 0.02 (n=3; target <= 0.40): **met**"
    # CEMA - ETA = -0.05, -0.04, -0.03: mean -0.04, s = 0.01, half-width 0.024841 -> wholly below 0
    assert lines[1] == ("- online accuracy CEMA - ETA (severity 5): -4.0 ± 2.5 points (n=3; target >= 0.0 points): "
                        "**missed**")


def test_cema_single_seed_is_undecided():
    runs = {m: {0: by_seed[0]} for m, by_seed in cema_runs().items()}
    assert all(line.endswith("**undecided**") for line in cema.targets(3, runs, [0]))


# --------------------------------------------------------------------------- --no-run
def _write(run_dir, config, status="completed", online=0.8, uploads=40):
    run_dir.mkdir(parents=True)
    record = cema_like(online, uploads, online, status)
    record["config"] = config
    (run_dir / "results.json").write_text(json.dumps(record))


def test_no_run_returns_finished_runs_and_starts_moves_nothing(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(cached_run.subprocess, "run", lambda *a, **k: started.append(a))
    overrides = ["algorithm=fedavg", "rounds=2"]
    done, running, stale = tmp_path / "done", tmp_path / "running", tmp_path / "stale"
    _write(done, composed_config(overrides))
    _write(running, composed_config(overrides), status="running")
    _write(stale, composed_config(["algorithm=fedavg", "rounds=3"]))
    assert run_cached(done, overrides, run=False)["status"] == "completed"
    assert run_cached(running, overrides, run=False)["status"] == "missing"
    assert run_cached(stale, overrides, run=False) == not_finished()
    assert run_cached(tmp_path / "absent", overrides, run=False)["status"] == "missing"
    assert started == [] and sorted(p.name for p in tmp_path.iterdir()) == ["done", "running", "stale"]
    err = capsys.readouterr().err
    assert "status running" in err and "rounds: 3 -> 2" in err and "absent: no finished run" in err


def test_cema_no_run_writes_the_section_from_finished_seeds_only(tmp_path, capsys):
    args = cema.build_parser().parse_args(
        ["--no-run", "--severities", "3", "--seeds", "0", "1", "--out", str(tmp_path / "runs"),
         "--doc", str(tmp_path / "RESULTS.md")]
    )
    for method, seed, online, uploads in [("cema", 0, 0.80, 30), ("cema", 1, 0.84, 34), ("eta", 0, 0.85, 0),
                                          ("eta", 1, 0.86, 0), ("eta_upload", 0, 0.85, 100)]:
        config = composed_config(cema.run_overrides(method, 3, seed, args))
        _write(cema.run_folder(method, 3, seed, args), config, online=online, uploads=uploads)
    assert cema.main(["--no-run", "--severities", "3", "--seeds", "0", "1", "--out", str(tmp_path / "runs"),
                      "--doc", str(tmp_path / "RESULTS.md")]) == 0
    doc = (tmp_path / "RESULTS.md").read_text()
    assert doc.startswith("# Results") and cema.BEGIN in doc and cema.END in doc
    assert "Command: `python -m experiments.claims.cema --severities 3 --seeds 0 1 --out" in doc  # no --no-run
    assert "written with --no-run" in doc and "Not counted: severity 3 source seeds 0 1 (missing)" in doc
    assert "severity 3 eta_upload seed 1 (missing)" in doc
    # eta_upload ran seed 0 only: the ratio has one pair (30 / 100) and no interval
    assert "- uploads CEMA / eta_upload (severity 3): 0.30 (n=1; target <= 0.40): **undecided**" in doc
    # CEMA - ETA = -0.05, -0.02: -0.035 +- 12.706205 * 0.015 = 0.190593 (points: -3.5 +- 19.1)
    assert "- online accuracy CEMA - ETA (severity 3): -3.5 ± 19.1 points (n=2; target >= 0.0 points)" in doc
    assert "| cema | 82.0 |" in doc and "| 82.0 ± 25.4 (n=2) | 32 ± 25 (n=2) |" in doc
    assert not (tmp_path / "runs" / "iid" / "sev3" / "source").exists()  # nothing was started


def test_command_line_drops_no_run():
    assert command_line("experiments.claims.eclm", ["--no-run", "--seeds", "0"]) == (
        "python -m experiments.claims.eclm --seeds 0")


def test_eclm_no_run_pairs_the_finished_seeds_and_names_the_missing_ones(tmp_path):
    argv = ["--no-run", "--classes", "2", "--seeds", "0", "1", "--rounds", "2", "--devices", "4", "--per-round", "2",
            "--out", str(tmp_path / "runs"), "--doc", str(tmp_path / "RESULTS.md")]
    args = claims_eclm.build_parser().parse_args(argv)
    out = claims_eclm.shift_folder(args)
    assert out == tmp_path / "runs" / "fog5"
    # FedAvg 0.60, 0.70 with 400 bytes; ECLM 0.80, 0.86 reaching them after 2 rounds of 20 and 40 bytes
    for method, seed, record in [("fedavg", 0, eclm_like(0.60, 200.0)), ("fedavg", 1, eclm_like(0.70, 200.0)),
                                 ("eclm", 0, eclm_like(0.80, 20.0)), ("eclm", 1, eclm_like(0.86, 40.0))]:
        folder = claims_eclm.run_folder(method, 2, seed, out)
        assert folder == out / "m2" / method / f"seed{seed}"
        record["config"] = composed_config(claims_eclm.run_overrides(method, 2, seed, args, out))
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(record))
    assert claims_eclm.main(argv) == 0
    doc = (tmp_path / "RESULTS.md").read_text()
    assert "Not counted: 2 classes NA seeds 0 1 (missing)" in doc and "2 classes FA seed" not in doc
    # ECLM - FA = 0.20, 0.16: 18.0 +- 12.706205 * 2 = 25.4 points, straddles 0
    assert "- final accuracy ECLM - FA (2 classes): 18.0 ± 25.4 points (n=2; target >= 0.0 points): **undecided**" in doc
    assert "- final accuracy ECLM - HFL (2 classes): not measured (n=0; target >= 0.0 points): **undecided**" in doc
    # traffic 40 / 400 = 0.1 and 80 / 400 = 0.2: 0.15 +- 12.706205 * 0.05 = 0.635
    assert "FedAvg's total traffic (2 classes): 0.150 ± 0.635 (n=2; target <= 0.200): **undecided**" in doc
    assert "| 2 classes | - | - | - | 65.0 ± 63.5 (n=2) | - | 83.0 ± 38.1 (n=2) |" in doc
