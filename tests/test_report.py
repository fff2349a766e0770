"""Tests for experiments/report.py: collecting runs, grouping, the markdown table, the plot, the CLI.

The fake multirun folder holds hand-written results.json files (2 algorithms x 2 seeds, plus one
failed and one unfinished ECLM run). Expected table cells are worked out by hand in comments: mean
± half-width of the two-sided 95 % Student-t interval, ``t_{0.975, n-1} * s / sqrt(n)`` with the
sample std ``s`` (ddof=1); t_{0.975,1} = 12.706205, t_{0.975,2} = 4.302653.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import report
from experiments.report import collect, flatten_config, group_runs, main, markdown_table
from experiments.results.intervals import METHOD_CAPTION
from experiments.results.writer import ResultsWriter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, algorithm, seed, accuracies, per_round, summary, status="completed", error=None):
    """Write one hand-made results.json; ``per_round`` = (uplink, downlink, sim s, wall s) of every round."""
    uplink, downlink, sim, wall = per_round
    rounds = [
        {"round": i + 1, "accuracy": acc, "global_accuracy": acc, "uplink_bytes": uplink,
         "downlink_bytes": downlink, "sim_time_s": sim, "wall_time_s": wall, "clients": 2, "failures": 0}
        for i, acc in enumerate(accuracies)
    ]
    config = {
        "seed": seed,
        "rounds": 2,
        "algorithm": {"name": algorithm, "lr": 0.001},
        "engine": {"num_cpus": 1.0 + seed},  # volatile: must not split groups
        "pretrain": {"cache_dir": f"/tmp/cache{seed}", "epochs": 8},  # cache_dir is volatile too
    }
    data = {"status": status, "config": config, "rounds": rounds, "summary": summary, "error": error}
    Path(folder).mkdir(parents=True)
    (Path(folder) / "results.json").write_text(json.dumps(data), encoding="utf-8")


def summary_of(final, best, up, down, sim, wall, rounds=2):
    return {"final_accuracy": final, "best_accuracy": best, "total_uplink_bytes": up,
            "total_downlink_bytes": down, "sim_time_s": sim, "wall_time_s": wall, "rounds": rounds}


@pytest.fixture()
def multirun(tmp_path):
    root = tmp_path / "multirun"
    write_run(root / "0", "fedavg", 0, [0.85, 0.80], (1000, 2000, 1.5, 0.5),
              summary_of(0.80, 0.85, 2000, 4000, 3.0, 1.0))
    write_run(root / "1", "fedavg", 1, [0.90, 0.90], (2000, 3000, 2.5, 1.5),
              summary_of(0.90, 0.90, 4000, 6000, 5.0, 3.0))
    write_run(root / "2", "eclm", 0, [0.60, 0.70], (500, 500, 1.0, 0.5),
              summary_of(0.70, 0.70, 1000, 1000, 2.0, 1.0))
    write_run(root / "3", "eclm", 1, [0.50, 0.74], (800, 500, 2.0, 1.0),
              summary_of(0.74, 0.74, 1600, 1000, 4.0, 2.0))
    write_run(root / "4", "eclm", 2, [0.55], (800, 500, 2.0, 1.0),
              summary_of(0.55, 0.55, 800, 500, 2.0, 1.0, rounds=1),
              status="failed", error="Traceback (most recent call last):\n  ...\nRuntimeError: out of memory")
    write_run(root / "5", "eclm", 3, [0.65], (800, 500, 2.0, 1.0),
              summary_of(0.65, 0.65, 800, 500, 2.0, 1.0, rounds=1),
              status="running")
    return root


# With two values a, b: s = |a - b| / sqrt(2), so the half-width is 12.706205 * |a - b| / 2.
# fedavg: final (0.80, 0.90) -> 0.850 +- 12.706205 * 0.05 = 0.635; best (0.85, 0.90) -> 0.875 +- 0.318;
#         uplink (2000 + 4000) / 2 = 3.0 kB; downlink (4000 + 6000) / 2 = 5.0 kB; virtual 4.0; wall 2.0
FEDAVG_ROW = "| algorithm.name=fedavg | 2 | 0.850 ± 0.635 | 0.875 ± 0.318 | 3.0 kB | 5.0 kB | 4.0 | 2.0 |"
# eclm (completed seeds 0, 1 only): final = best (0.70, 0.74) -> 0.720 +- 12.706205 * 0.02 = 0.254;
#         uplink (1000 + 1600) / 2 = 1.3 kB; downlink 1.0 kB; virtual (2 + 4) / 2 = 3.0; wall 1.5
ECLM_ROW = "| algorithm.name=eclm | 2 | 0.720 ± 0.254 | 0.720 ± 0.254 | 1.3 kB | 1.0 kB | 3.0 | 1.5 |"


def test_collect_finds_every_run_recursively(multirun):
    runs = collect(multirun)
    assert [Path(run["run_dir"]).name for run in runs] == ["0", "1", "2", "3", "4", "5"]


def test_collect_on_a_single_run_folder_returns_that_run(multirun):
    runs = collect(multirun / "2")
    assert len(runs) == 1 and runs[0]["config"]["algorithm"]["name"] == "eclm"


def test_flatten_config_uses_dotted_keys():
    assert flatten_config({"seed": 0, "algorithm": {"name": "eclm", "opt": {"lr": 0.1}}, "mix": {}}) == {
        "seed": 0, "algorithm.name": "eclm", "algorithm.opt.lr": 0.1, "mix": {},
    }


def test_groups_ignore_seed_and_volatile_keys_and_are_sorted(multirun):
    groups = group_runs(collect(multirun))
    assert list(groups) == ["algorithm.name=eclm", "algorithm.name=fedavg"]
    assert [run["config"]["seed"] for run in groups["algorithm.name=eclm"]] == [0, 1, 2, 3]


def test_label_lists_every_differing_key():
    runs = [
        {"config": {"seed": s, "algorithm": {"name": name, "lr": lr}}, "status": "completed", "rounds": []}
        for s, name, lr in [(0, "fedavg", 0.01), (1, "fedavg", 0.01), (0, "fedavg", 0.1), (0, "eclm", 0.1)]
    ]
    groups = group_runs(runs)
    assert list(groups) == [
        "algorithm.lr=0.01, algorithm.name=fedavg",
        "algorithm.lr=0.1, algorithm.name=eclm",
        "algorithm.lr=0.1, algorithm.name=fedavg",
    ]
    assert len(groups["algorithm.lr=0.01, algorithm.name=fedavg"]) == 2


def test_single_group_is_labelled_by_its_algorithm(multirun):
    assert list(group_runs(collect(multirun / "0"))) == ["algorithm.name=fedavg"]
    assert list(group_runs([{"config": {"seed": 0}, "status": "completed", "rounds": []}])) == ["all runs"]


def test_table_mean_and_interval_match_hand_computed_values(multirun):
    table = markdown_table(group_runs(collect(multirun)))
    lines = table.splitlines()
    assert lines[0] == report.TABLE_CAPTION and METHOD_CAPTION in lines[0]
    assert lines[2].startswith("| config | n | final accuracy (mean ± 95 % CI) |")
    assert lines[4] == ECLM_ROW
    assert lines[5] == FEDAVG_ROW


def test_three_seeds_use_t_with_two_degrees_of_freedom():
    # final 0.80, 0.85, 0.90: mean 0.85, s = 0.05, half-width 4.302653 * 0.05 / sqrt(3) = 0.1242
    # best 0.90, 0.90, 0.96: mean 0.92, s = 0.034641, half-width 4.302653 * 0.034641 / sqrt(3) = 0.0861
    runs = [
        {"config": {"seed": seed, "algorithm": {"name": "tent"}}, "status": "completed", "rounds": [],
         "summary": summary_of(final, best, 10, 20, 1.0, 1.0)}
        for seed, final, best in [(0, 0.80, 0.90), (1, 0.85, 0.90), (2, 0.90, 0.96)]
    ]
    row = markdown_table(group_runs(runs)).splitlines()[4]
    assert row == "| algorithm.name=tent | 3 | 0.850 ± 0.124 | 0.920 ± 0.086 | 10 B | 20 B | 1.0 | 1.0 |"


def test_failed_and_unfinished_runs_are_listed_below_the_table(multirun):
    table = markdown_table(group_runs(collect(multirun)))
    failed_part = table.split("**Failed runs**")[1].split("**Unfinished runs**")[0]
    assert f"`{multirun / '4'}` (algorithm.name=eclm, seed=2): RuntimeError: out of memory" in failed_part
    unfinished_part = table.split("**Unfinished runs**")[1]
    assert "seed=3): status running, 1 rounds recorded" in unfinished_part
    assert "seed=2" not in unfinished_part


def test_group_curves_average_over_completed_seeds(multirun):
    curves = report.group_curves(group_runs(collect(multirun))["algorithm.name=fedavg"])
    np.testing.assert_allclose(curves["round"], [1, 2])
    np.testing.assert_allclose(curves["accuracy_mean"], [0.875, 0.85])  # (0.85+0.90)/2, (0.80+0.90)/2
    # half-widths 12.706205 * 0.025 = 0.317655 (round 1) and 12.706205 * 0.05 = 0.635310 (round 2)
    np.testing.assert_allclose(curves["accuracy_low"], [0.875 - 0.317655, 0.85 - 0.635310], atol=1e-6)
    np.testing.assert_allclose(curves["accuracy_high"], [0.875 + 0.317655, 0.85 + 0.635310], atol=1e-6)
    # cumulative up+down: seed 0 3000, 6000; seed 1 5000, 10000 -> means 4000, 8000
    np.testing.assert_allclose(curves["bytes_mean"], [4000, 8000])


def test_main_writes_report_files_and_prints_the_table(multirun, capsys):
    assert main([str(multirun)]) == 0
    printed = capsys.readouterr().out
    assert FEDAVG_ROW in printed and ECLM_ROW in printed
    assert (multirun / "report.md").read_text(encoding="utf-8") == printed
    assert (multirun / "report.png").read_bytes()[:8] == PNG_SIGNATURE


def test_main_with_out_writes_beside_the_given_file(multirun, tmp_path, capsys):
    out = tmp_path / "reports" / "sweep.md"
    assert main([str(multirun), "--out", str(out)]) == 0
    assert ECLM_ROW in out.read_text(encoding="utf-8")
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (multirun / "report.md").exists()


def test_main_reports_a_run_written_by_results_writer(tmp_path, capsys):
    writer = ResultsWriter(tmp_path / "run", {"seed": 0, "algorithm": {"name": "heterofl"}})
    for number, accuracy in [(1, 0.5), (2, 0.6)]:
        writer.add_round({"round": number, "accuracy": accuracy, "global_accuracy": None,
                          "uplink_bytes": 10, "downlink_bytes": 20, "sim_time_s": 1.0,
                          "wall_time_s": 0.25, "clients": 1, "failures": 0})
    writer.finish()
    assert main([str(tmp_path / "run")]) == 0
    assert "| algorithm.name=heterofl | 1 | 0.600 | 0.600 | 20 B | 40 B | 2.0 | 0.5 |" in (  # one run: no interval
        capsys.readouterr().out
    )


def test_main_on_empty_folder_exits_2_with_one_message(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "no results.json found under" in captured.err
    assert not (tmp_path / "report.md").exists()


def test_main_on_missing_folder_or_broken_file_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{", encoding="utf-8")
    assert main([str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
