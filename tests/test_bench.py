"""The benchmark's pieces: sizes and cases, medians and ratios, the memory sampler on
real child processes, child timeouts, round timing from results.json, the floor's FedAvg
arithmetic and cohorts, the plain-Flower app's settings, and the markdown report.

The end-to-end smoke run (Ray twice) takes ~40 s on a quiet 2-core machine and minutes on a
busy one: it runs only with EDGECLOUD_BENCH_SMOKE=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.bench.cases import GROUPS, model_overrides, parse_sizes, plan_cases
from experiments.bench.cli import fresh_folder, main
from experiments.bench.floor import COHORT_STREAM, average_states, cohort_of
from experiments.bench.memory import TreeMemorySampler, read_pss_bytes, sample_tree
from experiments.bench.report import (
    evaluate_targets,
    issue_targets,
    markdown_report,
    median,
    ratio,
    startup_floor,
    summarize_case,
    verdict,
    write_report,
)
from experiments.bench.runs import RoundWatcher, run_child, timings
from experiments.bench.stack import STACK
from experiments.config import compose
from experiments.schema import RunConfig

MIB = 1024**2


# --------------------------------------------------------------------------- sizes and cases
def test_sizes_take_the_issue_cohorts_or_explicit_ones():
    assert parse_sizes("100,500,1000") == [(100, 10), (500, 25), (1000, 50)]
    assert parse_sizes("6:3, 40:4") == [(6, 3), (40, 4)]


@pytest.mark.parametrize("text, fix", [("7", "7:K"), ("10:0", r"\[1, 10\]"), ("10:11", r"\[1, 10\]"),
                                       ("ten", "N or N:K"), ("", "N or N:K")])
def test_bad_sizes_name_the_value_and_the_fix(text, fix):
    with pytest.raises(ValueError, match=fix):
        parse_sizes(text)


def test_cases_of_every_group_at_the_default_size_and_the_fleet_sizes():
    cases = plan_cases([(100, 10), (500, 25)], GROUPS, ("x=1",), ("++model.name=m",))
    names = [c.name for c in cases]
    assert names == ["fedavg@100", "plain@100", "floor@100", "stack@100", "eclm@100", "fedavg_eclm_network@100", "cema@100",
                     "elasticdnn@100", "fedavg_flower_pump@100", "fedavg_ray@100", "fedavg@500", "fedavg_flower_pump@500",
                     "fedavg_ray@500"]
    by_name = {c.name: c for c in cases}
    assert by_name["plain@100"].runner == "plain" and by_name["floor@100"].runner == "floor"
    assert by_name["stack@100"].runner == "stack"
    assert by_name["fedavg_eclm_network@100"].overrides == (
        "x=1", "algorithm=fedavg", "++model.name=m", "fleet.devices=100", "fleet.per_round=10")
    assert by_name["fedavg@500"].overrides[-2:] == ("fleet.devices=500", "fleet.per_round=25")
    assert "scenario=online" in by_name["cema@100"].overrides
    assert by_name["fedavg_ray@500"].overrides[-3:] == ("engine.backend=ray", "fleet.devices=500", "fleet.per_round=25")
    assert "scenario=evolving" in by_name["elasticdnn@100"].overrides
    assert by_name["fedavg_flower_pump@500"].overrides == (
        "x=1", "algorithm=fedavg", "engine.fast_pump=false", "fleet.devices=500", "fleet.per_round=25")


def test_fleet_group_alone_still_measures_the_default_size():
    assert [c.name for c in plan_cases([(100, 10), (1000, 50)], ["fleet"], ())] == ["fedavg@100", "fedavg@1000"]
    with pytest.raises(ValueError, match="unknown case group"):
        plan_cases([(100, 10)], ["fedavg", "elastic"], ())


def test_fedavg_on_eclms_network_gets_exactly_eclms_network():
    eclm = compose(["algorithm=eclm"])
    fedavg = compose(["algorithm=fedavg", *model_overrides(eclm.model)])
    assert fedavg.algorithm.name == "fedavg" and fedavg.model == eclm.model
    assert fedavg.model.name != compose(["algorithm=fedavg"]).model.name


# --------------------------------------------------------------------------- arithmetic
def test_median_ratio_verdict_by_hand():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median([None, 5.0]) == 5.0 and median([]) is None
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None and ratio(None, 2.0) is None and ratio(2.0, None) is None
    assert verdict(1.05, 1.05) == "met" and verdict(1.0501, 1.05) == "not met"
    assert verdict(None, 1.0) == "n/a" and verdict(2.0, None) == "-"


def _record(status="ok", startup=10.0, rounds=(1.0,), pss=100, rss=200, total=30.0, processes=12):
    return {"status": status, "startup_s": startup, "round_s": list(rounds), "peak_pss_bytes": pss,
            "peak_rss_bytes": rss, "total_s": total, "max_processes": processes}


def test_case_summary_pools_rounds_and_takes_medians_of_successful_reps():
    records = [
        _record(startup=10.0, rounds=(1.0, 2.0), pss=100, total=30.0),
        _record(startup=20.0, rounds=(4.0,), pss=300, total=50.0, processes=14),
        _record(status="failed", startup=1.0, rounds=(0.1,), pss=1),
    ]
    summary = summarize_case(records)
    assert summary["reps_ok"] == 2 and summary["reps"] == 3
    assert summary["startup_s"] == 15.0
    assert summary["round_s"] == 2.0  # median of 1, 2, 4
    assert (summary["round_s_min"], summary["round_s_max"]) == (1.0, 4.0)
    assert summary["peak_pss_bytes"] == 200 and summary["total_s"] == 40.0 and summary["max_processes"] == 14


def test_startup_and_round_times_from_round_ends():
    assert timings(100.0, {1: 110.0, 2: 112.0, 3: 115.5}, 3) == {"startup_s": 10.0, "round_s": [2.0, 3.5]}
    assert timings(100.0, {1: 110.0, 3: 115.0}, 3) == {"startup_s": 10.0, "round_s": []}  # round 2 unseen
    assert timings(100.0, {}, 3) == {"startup_s": None, "round_s": []}


def test_targets_compare_the_right_cases():
    summary = {
        "fedavg@100": {"round_s": 1.2, "startup_s": 7.0, "peak_pss_bytes": 3.0},
        "plain@100": {"round_s": 1.0, "startup_s": 9.0, "peak_pss_bytes": 2.0},
        "floor@100": {"round_s": 2.0, "peak_pss_bytes": 1.0},
        "fedavg@1000": {"peak_pss_bytes": 3.3},
    }
    rows = {row["label"]: row for row in evaluate_targets(issue_targets([(100, 10), (1000, 50)]), summary)}
    plain = rows["project FedAvg round / plain-Flower FedAvg round"]
    assert plain["value"] == pytest.approx(1.2) and plain["verdict"] == "not met"
    assert rows["project FedAvg round / plain loop round"]["value"] == pytest.approx(0.6)
    assert rows["project FedAvg round / plain loop round"]["verdict"] == "met"
    assert rows["project start-up to end of round 1 (s)"]["verdict"] == "met"
    assert rows["project peak PSS / plain loop peak PSS"]["verdict"] == "not met"  # 3.0 > 1.5
    assert rows["project peak PSS at 1000 / at 100 devices"]["value"] == pytest.approx(1.1)
    assert rows["ECLM round / project FedAvg round, same network"]["verdict"] == "n/a"  # not measured


def test_startup_floor_is_the_stacks_import_plus_a_loop_round_on_every_core_by_hand():
    summary = {"stack@100": {"startup_s": 6.0}, "floor@100": {"round_s": 4.0}, "fedavg@100": {"startup_s": 11.0}}
    assert startup_floor(summary, 100, 2) == {"startup_floor@100": {"startup_s": 8.0}}  # 6 + 4 / 2
    assert startup_floor(summary, 100, 1) == {"startup_floor@100": {"startup_s": 10.0}}
    assert startup_floor({"stack@100": {"startup_s": 6.0}}, 100, 2) == {"startup_floor@100": {"startup_s": None}}
    summary.update(startup_floor(summary, 100, 2))
    rows = {row["label"]: row for row in evaluate_targets(issue_targets([(100, 10)]), summary)}
    assert rows["project start-up / start-up floor"]["value"] == pytest.approx(11.0 / 8.0)
    assert rows["start-up floor: the stack's import + a plain loop round / cores (s)"]["value"] == pytest.approx(8.0)


def test_the_stack_the_floor_imports_is_installed():
    missing = [name for name in STACK if importlib.util.find_spec(name) is None]
    assert not missing, f"experiments.bench.stack.STACK names modules that are not installed: {missing}"


# --------------------------------------------------------------------------- the report
def _report(tmp_path: Path) -> dict:
    summary = {"fedavg@100": summarize_case([_record(rounds=(1.25, 1.5, 1.75), pss=3 * 1024**3, rss=4 * 1024**3)])}
    return {
        "command": "python -m experiments.bench --quick",
        "created": "2026-01-01 00:00:00 UTC",
        "json": str(tmp_path / "p.json"),
        "machine": {"cores": 2, "usable_cores": 2, "memory_gib": 16.0, "cpu_model": "Test CPU", "os": "Linux",
                    "python": "3.11", "versions": {"flwr": "1.41.0"}, "load_average_at_start": 0.5},
        "load_average_at_end": 0.75,
        "settings": {"reps": 1, "rounds": 4, "sizes": "100", "overrides": []},
        "cases": [{"name": "fedavg@100", "runner": "project", "devices": 100, "per_round": 10}],
        "warmup": {"fedavg@100": {"status": "ok", "total_s": 2.5}},
        "runs": {"fedavg@100": [_record()], "plain@100": [{"status": "timeout", "error": "trace\nKilled\n"}]},
        "summary": summary,
        "targets": evaluate_targets(issue_targets([(100, 10)]), summary),
    }


def test_markdown_report_holds_machine_command_targets_and_cases(tmp_path):
    text = markdown_report(_report(tmp_path))
    assert "`python -m experiments.bench --quick`" in text
    assert "2 cores (2 usable), 16.0 GiB RAM, Test CPU" in text and "flwr 1.41.0" in text
    assert "| project start-up to end of round 1 (s) | 10.00 | <= 8 | not met |" in text
    assert "| project FedAvg round / plain-Flower FedAvg round | n/a | <= 1.05 | n/a |" in text
    assert "| fedavg@100 | project | 100 | 10 | 1/1 | 10.0 | 1.50 (1.25-1.75) | n/a | 3.00 | 4.00 | 12 | 30.0 |" in text
    assert "warm-up took 2.5 s" in text
    assert "- plain@100: timeout: Killed" in text


def test_report_warns_about_smoke_runs_and_busy_machines(tmp_path):
    report = _report(tmp_path)
    assert "**" not in markdown_report(report)  # load 0.5 on 2 cores at the start: quiet, no smoke run
    report["load_average_at_end"] = 3.0  # the benchmark's own last run: no warning
    assert "**" not in markdown_report(report)
    report["settings"]["quick"], report["machine"]["load_average_at_start"] = True, 1.5
    text = markdown_report(report)
    assert "**A smoke run (--quick/--tiny)" in text and "(load average 1.5 on 2 cores)" in text


def test_write_report_writes_json_and_markdown(tmp_path):
    report = _report(tmp_path)
    write_report(report, tmp_path / "out" / "p.json", tmp_path / "out" / "P.md")
    assert json.loads((tmp_path / "out" / "p.json").read_text())["summary"]["fedavg@100"]["round_s"] == 1.5
    assert (tmp_path / "out" / "P.md").read_text().startswith("# Performance")


# --------------------------------------------------------------------------- memory and children
def test_pss_is_read_from_smaps_rollup(tmp_path):
    (tmp_path / "42").write_text("Rss:  2048 kB\nPss:  1234 kB\nShared_Clean: 0 kB\n")
    assert read_pss_bytes(42, str(tmp_path / "{pid}")) == 1234 * 1024
    assert read_pss_bytes(43, str(tmp_path / "{pid}")) is None
    assert read_pss_bytes(os.getpid()) > 0


_ALLOCATE = "import sys, time; block = b'\\x01' * ({mib} * 1024 * 1024); print('ready', flush=True); time.sleep({hold})"


def test_sampler_sums_the_memory_of_a_child_and_its_grandchild():
    grandchild = _ALLOCATE.format(mib=120, hold=1.5)
    child = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             + _ALLOCATE.format(mib=60, hold=1.5) + "; p.wait()")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.DEVNULL)
    sampler = TreeMemorySampler(proc.pid, interval_s=0.05).start()
    proc.wait(timeout=30)
    peak = sampler.stop()
    assert peak.max_processes == 2 and peak.samples >= 5
    assert peak.peak_rss_bytes >= 180 * MIB  # 120 + 60 MiB written, plus two interpreters
    assert 180 * MIB <= peak.peak_pss_bytes <= peak.peak_rss_bytes  # private pages count fully in PSS
    assert sample_tree(proc.pid).processes == 0  # gone: nothing left to count
    with pytest.raises(ValueError, match="interval_s"):
        TreeMemorySampler(proc.pid, interval_s=0)


def test_a_child_past_its_timeout_is_killed_with_its_descendants(tmp_path):
    code = "import subprocess, time; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)"
    started = time.monotonic()
    record = run_child([sys.executable, "-c", code], tmp_path / "log", timeout_s=1.0)
    assert record["status"] == "timeout" and time.monotonic() - started < 20
    grandchild = int((tmp_path / "log").read_text().split()[0])
    time.sleep(0.5)
    assert not _running(grandchild)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a killed orphan may linger as a zombie until its new parent reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_failing_child_is_recorded_with_its_output(tmp_path):
    record = run_child([sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"], tmp_path / "log", 30)
    assert record["status"] == "failed" and record["returncode"] == 3 and "bad config" in record["error"]


def test_round_watcher_takes_the_file_time_when_a_round_first_appears(tmp_path):
    path = tmp_path / "results.json"
    watcher = RoundWatcher(path)
    watcher()  # no file yet: nothing
    path.write_text(json.dumps({"rounds": [{"round": 1}]}))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    watcher()
    path.write_text(json.dumps({"rounds": [{"round": 1}, {"round": 2}], "summary": {}}))
    os.utime(path, ns=(3_500_000_000, 3_500_000_000))
    watcher()
    assert watcher.round_ends == {1: 1.0, 2: 3.5}
    rounds = [{"round": r} for r in (1, 2, 3, 4)]
    path.write_text(json.dumps({"rounds": rounds}))  # rounds 3 and 4 between two looks
    os.utime(path, ns=(9_000_000_000, 9_000_000_000))
    watcher()
    assert watcher.round_ends == {1: 1.0, 2: 3.5, 4: 9.0}  # round 3's end is unknown, not 9.0


# --------------------------------------------------------------------------- floor and plain
def test_a_reused_work_folder_is_moved_aside_not_timed_or_overwritten(tmp_path, capsys):
    folder = tmp_path / "fedavg@100-rep0"
    assert fresh_folder(folder) == folder and folder.is_dir() and not any(folder.iterdir())
    (folder / "run").mkdir()
    (folder / "run" / "results.json").write_text('{"rounds": [{"round": 1}, {"round": 2}]}')
    assert fresh_folder(folder) == folder and not any(folder.iterdir())  # a clean folder to time the new run in
    kept = tmp_path / "fedavg@100-rep0.stale-1" / "run" / "results.json"
    assert json.loads(kept.read_text())["rounds"][1] == {"round": 2}  # the earlier run is kept
    (folder / "child.log").write_text("second")
    fresh_folder(folder)
    assert (tmp_path / "fedavg@100-rep0.stale-2" / "child.log").read_text() == "second"
    assert "moved to fedavg@100-rep0.stale-1" in capsys.readouterr().out


def test_floor_cohorts_are_the_strategys_cohorts():
    from strategies.base import COHORT_STREAM as STRATEGY_STREAM
    from strategies.base import DeviceInfo
    from strategies.fedavg import FedAvg

    assert COHORT_STREAM == STRATEGY_STREAM
    strategy = FedAvg(per_round=4, seed=7, expected_devices=20)
    strategy.devices = {pid: DeviceInfo(pid, 1000 + pid, 50, {}) for pid in range(20)}
    for server_round in (1, 2, 5):
        assert cohort_of(7, server_round, 20, 4) == strategy.cohort(server_round)
    with pytest.raises(ValueError, match="per_round"):
        cohort_of(7, 1, 20, 0)


def test_floor_averages_weights_by_data_size_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    out = average_states([a, b], [1.0, 3.0])
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))  # 1/4*[1,2] + 3/4*[3,6]
    assert int(out["n"]) == 5  # integer buffers: the first device's
    with pytest.raises(ValueError, match="positive-sum"):
        average_states([a], [0.0])
    with pytest.raises(ValueError, match="positive-sum"):
        average_states([a, b], [1.0])


def test_plain_app_uses_the_projects_ray_resources_and_cohort_size():
    from experiments.bench.plain import plain_backend_config, plain_strategy
    from experiments.config import from_flat
    from experiments.engine.simulation import backend_config

    cfg = from_flat({"fleet.devices": 500, "fleet.per_round": 25, "engine.num_cpus": 0.5})
    assert plain_backend_config(cfg) == backend_config(cfg)
    strategy = plain_strategy(cfg)
    assert int(500 * strategy.fraction_train) == 25 and strategy.min_train_nodes == 25
    assert strategy.min_evaluate_nodes == 25 and strategy.min_available_nodes == 500
    assert isinstance(cfg, RunConfig)


# --------------------------------------------------------------------------- end to end
@pytest.mark.skipif(os.environ.get("EDGECLOUD_BENCH_SMOKE") != "1", reason="Ray twice: set EDGECLOUD_BENCH_SMOKE=1")
def test_smoke_run_at_the_tiniest_size_writes_the_report(tmp_path):
    out = tmp_path / "perf.json"
    code = main(["--tiny", "--rounds", "2", "--reps", "1", "--cases", "fedavg,plain,floor,stack",
                 "--override", f"pretrain.cache_dir={tmp_path / 'cache'}", "--out", str(out), "--timeout", "300"])
    report = json.loads(out.read_text())
    assert code == 0, report["runs"]
    for name in ("fedavg@6", "plain@6", "floor@6"):
        summary = report["summary"][name]
        assert summary["reps_ok"] == 1 and summary["round_s"] > 0 and summary["startup_s"] > summary["round_s"]
        assert summary["peak_pss_bytes"] > 100 * MIB
    assert report["summary"]["fedavg@6"]["max_processes"] > 1  # Ray's processes are in the tree
    assert report["summary"]["stack@6"]["startup_s"] > 0
    assert report["summary"]["startup_floor@6"]["startup_s"] > report["summary"]["stack@6"]["startup_s"]
    assert "| project FedAvg round / plain-Flower FedAvg round |" in out.with_suffix(".md").read_text()
