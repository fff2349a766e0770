"""Tests for experiments/results/writer.py: results.json, summary, plots, progress line, byte units."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.config import scenario_named
from experiments.results.progress import ProgressLine, format_bytes
from experiments.results.summary import summarize
from experiments.results.writer import ResultsWriter, load_results
from experiments.resume import checkpoint
from experiments.schema import CORRUPTION_SUITE, RunConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_record(number, accuracy=0.5, **overrides):
    """A complete round record; fields not under test are fixed small numbers."""
    record = {
        "round": number,
        "accuracy": accuracy,
        "global_accuracy": 0.4,
        "uplink_bytes": 100,
        "downlink_bytes": 300,
        "sim_time_s": 2.0,
        "wall_time_s": 1.0,
        "clients": 10,
        "failures": 0,
    }
    record.update(overrides)
    return record


def read_strict(path):
    """Parse JSON, failing on NaN/Infinity tokens (strict JSON)."""

    def reject(token):
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=reject)


# --------------------------------------------------------------------------- writer
def test_file_exists_with_config_as_soon_as_the_writer_is_created(tmp_path):
    ResultsWriter(tmp_path / "run", {"seed": 3, "algorithm": {"name": "fedavg"}})
    data = read_strict(tmp_path / "run" / "results.json")
    assert data["status"] == "running"
    assert data["config"] == {"seed": 3, "algorithm": {"name": "fedavg"}}
    assert data["rounds"] == []
    assert data["error"] is None
    assert data["summary"]["rounds"] == 0


def test_crash_after_round_two_keeps_both_rounds(tmp_path):
    writer = ResultsWriter(tmp_path, {"seed": 0})
    writer.add_round(make_record(1, accuracy=0.6))
    writer.add_round(make_record(2, accuracy=0.7))
    del writer  # the process "dies": finish() is never called
    data = read_strict(tmp_path / "results.json")
    assert data["status"] == "running"
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert data["summary"]["final_accuracy"] == 0.7
    assert data["summary"]["rounds"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp files left


def test_failed_write_leaves_previous_file_intact_and_no_temp_file(tmp_path, monkeypatch):
    writer = ResultsWriter(tmp_path, {"seed": 0})
    writer.add_round(make_record(1))

    def broken_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)  # results.json is written through it
    with pytest.raises(OSError, match="disk full"):
        writer.add_round(make_record(2))
    data = read_strict(tmp_path / "results.json")
    assert [r["round"] for r in data["rounds"]] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_run_config_dataclass_is_stored_as_plain_json(tmp_path):
    cfg = dataclasses.replace(RunConfig(seed=7), scenario=scenario_named("corrupted"))
    ResultsWriter(tmp_path, cfg)
    config = read_strict(tmp_path / "results.json")["config"]
    assert config["seed"] == 7
    assert config["algorithm"]["name"] == RunConfig().algorithm.name
    assert config["scenario"]["corruptions"] == list(CORRUPTION_SUITE)  # a tuple in the config, a list in JSON


def test_missing_keys_raise_and_name_them(tmp_path):
    writer = ResultsWriter(tmp_path, {})
    record = make_record(1)
    del record["uplink_bytes"], record["failures"]
    with pytest.raises(ValueError, match=r"\['uplink_bytes', 'failures'\]"):
        writer.add_round(record)
    assert read_strict(tmp_path / "results.json")["rounds"] == []


@pytest.mark.parametrize("next_round", [2, 1])
def test_round_numbers_must_strictly_increase(tmp_path, next_round):
    writer = ResultsWriter(tmp_path, {})
    writer.add_round(make_record(2))
    with pytest.raises(ValueError, match=f"got round {next_round} after round 2"):
        writer.add_round(make_record(next_round))
    assert len(writer.rounds) == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"round": "1"}, "round number must be an integer"),
        ({"uplink_bytes": -5}, "'uplink_bytes' must be >= 0"),
        ({"accuracy": "high"}, "'accuracy' must be a number or null"),
    ],
)
def test_bad_field_values_raise(tmp_path, overrides, message):
    writer = ResultsWriter(tmp_path, {})
    with pytest.raises(ValueError, match=message):
        writer.add_round(make_record(1, **overrides))


def test_nan_and_inf_are_written_as_null(tmp_path):
    writer = ResultsWriter(tmp_path, {"lr": float("nan")})
    writer.add_round(make_record(1, accuracy=float("nan"), global_accuracy=np.float64(np.inf)))
    writer.add_round(make_record(2, accuracy=0.75, wall_time_s=np.float32("nan")))
    data = read_strict(tmp_path / "results.json")  # would fail on a NaN token
    assert data["config"]["lr"] is None
    assert data["rounds"][0]["accuracy"] is None
    assert data["rounds"][0]["global_accuracy"] is None
    assert data["rounds"][1]["wall_time_s"] is None
    assert data["summary"]["best_accuracy"] == 0.75
    assert data["summary"]["wall_time_s"] == 1.0  # round 1 only; the null is skipped


def test_numpy_scalars_and_arrays_serialise_as_plain_numbers(tmp_path):
    writer = ResultsWriter(tmp_path, {})
    writer.add_round(
        make_record(
            np.int64(1),
            accuracy=np.float32(0.5),
            uplink_bytes=np.int64(1000),
            per_device_accuracy=np.array([0.25, 0.75]),
        )
    )
    stored = read_strict(tmp_path / "results.json")["rounds"][0]
    assert stored["round"] == 1 and isinstance(stored["round"], int)
    assert stored["accuracy"] == 0.5
    assert stored["uplink_bytes"] == 1000 and isinstance(stored["uplink_bytes"], int)
    assert stored["per_device_accuracy"] == [0.25, 0.75]


def test_unserialisable_value_raises(tmp_path):
    writer = ResultsWriter(tmp_path, {})
    with pytest.raises(ValueError, match="cannot store"):
        writer.add_round(make_record(1, model=object()))


def test_rounds_property_returns_copies(tmp_path):
    writer = ResultsWriter(tmp_path, {})
    writer.add_round(make_record(1))
    writer.rounds[0]["accuracy"] = 0.0
    assert writer.rounds[0]["accuracy"] == 0.5


def test_finish_writes_status_summary_and_plots(tmp_path):
    writer = ResultsWriter(tmp_path, {})
    writer.add_round(make_record(1, accuracy=0.6))
    writer.add_round(make_record(2, accuracy=None))
    final = writer.finish(extra_summary={"pretrain_accuracy": np.float64(0.3)})
    assert final == read_strict(tmp_path / "results.json")
    assert final["status"] == "completed"
    assert final["summary"]["final_accuracy"] == 0.6
    assert final["summary"]["pretrain_accuracy"] == 0.3
    for name in ("accuracy_per_round.png", "accuracy_vs_bytes.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_SIGNATURE


def test_failed_run_without_rounds_stores_error_and_draws_no_plot(tmp_path):
    writer = ResultsWriter(tmp_path, {})
    final = writer.finish("failed", error="RuntimeError: out of memory")
    assert final["status"] == "failed"
    assert final["error"] == "RuntimeError: out of memory"
    assert not list(tmp_path.glob("*.png"))


def test_finish_rejects_unknown_status_and_writer_closes_after_finish(tmp_path):
    writer = ResultsWriter(tmp_path, {})
    with pytest.raises(ValueError, match="status must be one of"):
        writer.finish("done")
    writer.finish()
    with pytest.raises(ValueError, match="already completed"):
        writer.add_round(make_record(1))


# --------------------------------------------------------------------------- summary
def test_summary_against_hand_computed_values():
    rounds = [
        make_record(1, accuracy=0.6, global_accuracy=0.5, uplink_bytes=100, sim_time_s=2.5, wall_time_s=1.0),
        make_record(2, accuracy=None, global_accuracy=0.7, uplink_bytes=200, sim_time_s=3.0, wall_time_s=2.0),
        make_record(3, accuracy=0.8, global_accuracy=0.6, uplink_bytes=50, sim_time_s=1.5, wall_time_s=0.5),
        make_record(4, accuracy=0.7, global_accuracy=None, uplink_bytes=150, sim_time_s=1.0, wall_time_s=0.5),
    ]
    assert summarize(rounds) == {
        "final_accuracy": 0.7,  # last round's accuracy
        "best_accuracy": 0.8,  # round 3
        "final_global_accuracy": 0.6,  # round 4 has none, round 3 is the last with one
        "best_global_accuracy": 0.7,
        "final_pretrained_accuracy": None, "accuracy_gain": None, "mean_accuracy_gain": None,  # no "before" recorded
        "total_uplink_bytes": 500,  # 100 + 200 + 50 + 150
        "total_downlink_bytes": 1200,  # 4 x 300
        "sim_time_s": 8.0,  # 2.5 + 3.0 + 1.5 + 1.0
        "wall_time_s": 4.0,  # 1.0 + 2.0 + 0.5 + 0.5
        "rounds": 4,
    }


def test_summary_puts_the_pre_trained_models_accuracy_beside_the_adapted_one():
    rounds = [
        make_record(1, accuracy=0.6, pretrained_accuracy=0.5),
        make_record(2, accuracy=0.9, pretrained_accuracy=None),  # a round without a "before"
        make_record(3, accuracy=0.8, pretrained_accuracy=0.4),
        make_record(4, accuracy=None, pretrained_accuracy=0.3),  # no device evaluated: skipped
    ]
    summary = summarize(rounds)
    assert summary["final_accuracy"] == 0.8 and summary["final_pretrained_accuracy"] == 0.4  # round 3's pair
    assert summary["accuracy_gain"] == pytest.approx(0.4)  # 0.8 - 0.4
    assert summary["mean_accuracy_gain"] == pytest.approx(0.25)  # (0.1 + 0.4) / 2


def test_summary_without_any_accuracy_or_rounds_does_not_crash():
    none_evaluated = summarize([make_record(1, accuracy=None), make_record(2, accuracy=float("nan"))])
    assert none_evaluated["final_accuracy"] is None and none_evaluated["best_accuracy"] is None
    empty = summarize([])
    assert empty["rounds"] == 0 and empty["total_uplink_bytes"] == 0 and empty["final_accuracy"] is None


# --------------------------------------------------------------------------- load
def test_load_results_accepts_folder_or_file(tmp_path):
    ResultsWriter(tmp_path, {"seed": 1}).add_round(make_record(1))
    assert load_results(tmp_path) == load_results(tmp_path / "results.json")
    assert load_results(tmp_path)["rounds"][0]["round"] == 1


def test_load_results_rejects_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="no results.json"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text('{"rounds": []}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks the keys \['status', 'config'\]"):
        load_results(tmp_path)


# --------------------------------------------------------------------------- progress line
def test_progress_line_eta_is_mean_wall_times_rounds_left():
    stream = io.StringIO()
    progress = ProgressLine(total_rounds=5, stream=stream)
    common = {"clients": 10, "failures": 0}
    progress.update(
        {"round": 1, "accuracy": 0.8, "global_accuracy": 0.75, "uplink_bytes": 500_000,
         "downlink_bytes": 1_500_000, "sim_time_s": 5.0, "wall_time_s": 1.0, **common}
    )
    line = progress.update(
        {"round": 2, "accuracy": 0.812, "global_accuracy": 0.79, "uplink_bytes": 700_000,
         "downlink_bytes": 1_900_000, "sim_time_s": 7.3, "wall_time_s": 3.0, **common}
    )
    # mean wall (1.0 + 3.0) / 2 = 2.0 s x 3 rounds left = 6 s; bytes and times are running totals
    assert line == (
        "round 2/5  acc 0.812  global 0.790  up 1.2 MB  down 3.4 MB  virtual 12.3 s  wall 4.0 s  ETA 6 s"
    )
    assert stream.getvalue().splitlines()[1] == line


def test_progress_line_defaults_to_stdout_and_shows_missing_accuracy(capsys):
    line = ProgressLine(total_rounds=1).update(make_record(1, accuracy=None))
    assert capsys.readouterr().out == line + "\n"
    assert "acc -" in line and line.endswith("ETA 0 s")


def test_progress_line_long_eta_uses_minutes():
    line = ProgressLine(total_rounds=101, stream=io.StringIO()).update(make_record(1, wall_time_s=1.25))
    assert line.endswith("ETA 2 min 5 s")  # 1.25 s x 100 rounds = 125 s


@pytest.mark.parametrize("total", [0, -3, 2.5])
def test_progress_line_rejects_bad_total(total):
    with pytest.raises(ValueError, match="total_rounds must be a positive integer"):
        ProgressLine(total_rounds=total)


# --------------------------------------------------------------------------- bytes
@pytest.mark.parametrize(
    "count, text",
    [
        (0, "0 B"),
        (999, "999 B"),
        (999.6, "1.0 kB"),
        (1000, "1.0 kB"),
        (1234, "1.2 kB"),
        (3_400_000, "3.4 MB"),
        (999_999, "1.0 MB"),
        (10**9, "1.0 GB"),
        (np.int64(2_500_000_000_000), "2.5 TB"),
    ],
)
def test_format_bytes(count, text):
    assert format_bytes(count) == text


@pytest.mark.parametrize("count", [-1, float("nan"), float("inf")])
def test_format_bytes_rejects_impossible_counts(count):
    with pytest.raises(ValueError, match="byte count must be a finite number >= 0"):
        format_bytes(count)


# --------------------------------------------------------------------------- import cost
def test_importing_results_does_not_import_matplotlib():
    code = "import sys, experiments.results.writer; print('matplotlib' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert output.stdout.strip() == "False"


def test_omegaconf_config_is_stored_resolved(tmp_path):
    from omegaconf import OmegaConf

    config = OmegaConf.create({"seed": 2, "rounds": 5, "total": "${rounds}", "mix": [1, 2]})
    ResultsWriter(tmp_path, config)
    assert read_strict(tmp_path / "results.json")["config"] == {"seed": 2, "rounds": 5, "total": 5, "mix": [1, 2]}
