"""The first-run benchmark's pieces: the timed child, its section of the report."""

from __future__ import annotations

import sys

from experiments.bench import first_run

RECORD = {"exit_code": 0, "wall_s": 150.0, "first_output_s": 2.5, "round_one_s": 90.0, "final_accuracy": 0.9,
          "final_pretrained_accuracy": 0.6, "accuracy_gain": 0.3, "mean_accuracy_gain": 0.25}


def test_the_timed_child_reports_first_output_round_one_and_exit(tmp_path):
    code = "import time; print(); print('start'); time.sleep(0.3); print('round 1/2 acc 0.5'); raise SystemExit(3)"
    record = first_run.run_timed([sys.executable, "-c", code], tmp_path / "log", timeout_s=60)
    assert record["exit_code"] == 3
    assert record["first_output_s"] < record["round_one_s"] <= record["wall_s"]
    assert record["round_one_s"] - record["first_output_s"] >= 0.3
    assert (tmp_path / "log").read_text() == "\nstart\nround 1/2 acc 0.5\n"


def test_the_section_judges_each_run_against_its_target():
    slow_warm = {**RECORD, "wall_s": 95.0}
    lines = first_run.markdown({"cold": RECORD, "warm": slow_warm}, "python -m experiments.bench --first-run", "m")
    cold, warm = (line for line in lines if line.startswith(("| cold", "| warm")))
    assert "150.0 s | <= 180 s (met)" in cold and "60.0 % -> 90.0 %" in cold and "+30.0 points; +25.0 points" in cold
    assert "95.0 s | <= 90 s (NOT met)" in warm
    failed = first_run.markdown({"cold": {**RECORD, "exit_code": 1}, "warm": RECORD}, "c", "m")
    assert "(NOT met)" in next(line for line in failed if line.startswith("| cold"))


def test_the_section_replaces_its_old_self_and_keeps_the_rest(tmp_path):
    path = tmp_path / "P.md"
    path.write_text("# Performance\n\nintro\n")
    first_run.write_section(path, [first_run.BEGIN, "one", first_run.END])
    first_run.write_section(path, [first_run.BEGIN, "two", first_run.END])
    text = path.read_text()
    assert text.startswith("# Performance\n\nintro\n") and "two" in text and "one" not in text
    assert text.count(first_run.BEGIN) == 1
