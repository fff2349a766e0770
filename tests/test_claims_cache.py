"""The claims presets reuse a finished run only when its stored configuration is still the one asked for."""

import json
import subprocess

from experiments.claims import eclm as claims_eclm
from experiments.resume import cached_run
from experiments.resume.cached_run import WHERE_KEYS, composed_config, run_cached
from experiments.resume.checkpoint import config_differences

OVERRIDES = ["algorithm=fedavg", "rounds=2", "fleet.devices=4", "fleet.per_round=4"]


def _finished_run(run_dir, config, status="completed"):
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"status": status, "config": config, "rounds": [], "summary": {}}))


def _record_runs(monkeypatch, run_dir):
    calls = []

    def fake_run(cmd, **kwargs):  # experiments.run would take minutes; it writes results.json like this
        calls.append(cmd)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps({"status": "completed", "config": {}, "rounds": [1]}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cached_run.subprocess, "run", fake_run)
    return calls


def test_differences_are_dotted_keys_and_the_output_dir_does_not_count():
    stored = {"output_dir": "/a", "rounds": 2, "algorithm": {"lr": 0.1, "elasticdnn": {"x": 1}}, "dataset": {"name": "digits"}}
    wanted = {"output_dir": "/b", "rounds": 2, "algorithm": {"lr": 0.2, "elasticdnn": {"x": 1, "new": False}},
              "dataset": {"name": "digits", "cache_dir": "~/.cache"}}  # where caches live changes no result
    assert config_differences(stored, wanted, WHERE_KEYS) == ["algorithm.elasticdnn.new: '<absent>' -> False",
                                                              "algorithm.lr: 0.1 -> 0.2"]
    assert config_differences(wanted, wanted, WHERE_KEYS) == []


def test_a_run_with_the_configuration_asked_for_is_reused(tmp_path, monkeypatch):
    run_dir = tmp_path / "fedavg"
    config = composed_config([*OVERRIDES, f"hydra.run.dir={run_dir}"])
    assert config["rounds"] == 2 and config["fleet"]["devices"] == 4
    _finished_run(run_dir, {**config, "output_dir": str(run_dir)})
    calls = _record_runs(monkeypatch, run_dir)
    assert run_cached(run_dir, [*OVERRIDES, f"hydra.run.dir={run_dir}"])["status"] == "completed"
    assert calls == []


def test_a_stale_run_is_moved_aside_and_run_again(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "fedavg"
    config = composed_config(OVERRIDES)
    del config["algorithm"]["momentum"]  # stored before the option existed
    _finished_run(run_dir, config)
    (tmp_path / "fedavg.stale-1").mkdir()  # an earlier stale copy stays too
    calls = _record_runs(monkeypatch, run_dir)
    assert run_cached(run_dir, OVERRIDES)["rounds"] == [1]
    assert len(calls) == 1 and calls[0][-len(OVERRIDES):] == OVERRIDES
    kept = json.loads((tmp_path / "fedavg.stale-2" / "results.json").read_text())
    assert "momentum" not in kept["config"]["algorithm"]  # nothing already written is lost
    assert "algorithm.momentum" in capsys.readouterr().err


def test_an_unfinished_run_with_the_same_configuration_is_run_again_in_place(tmp_path, monkeypatch):
    run_dir = tmp_path / "fedavg"
    _finished_run(run_dir, composed_config(OVERRIDES), status="running")
    calls = _record_runs(monkeypatch, run_dir)
    run_cached(run_dir, OVERRIDES)
    assert len(calls) == 1 and not (tmp_path / "fedavg.stale-1").exists()


def test_the_multi_app_measurement_is_reused_only_for_its_master_sizes_and_apps(tmp_path, monkeypatch, capsys):
    from experiments.claims import elastic_multiapp
    measured = []

    def measure(cfg, sizes, apps):  # the real measurement takes minutes; it returns a report like this
        measured.append((cfg.algorithm.options.sandwich, list(sizes), list(apps)))
        return {"rows": [], "wall_s": 1.0}

    monkeypatch.setattr(elastic_multiapp, "run_multiapp", measure)
    config = composed_config(["algorithm=elasticdnn", "scenario=evolving"])
    run = {"status": "completed", "rounds": [1], "config": config}
    path = tmp_path / "sev5" / "multiapp" / "seed0" / "report.json"
    first = elastic_multiapp.seed_report(run, path, [0.2, 0.5], [2])
    assert first["asked"] == {"sizes": [0.2, 0.5], "apps": [2]} and len(measured) == 1
    assert elastic_multiapp.seed_report(run, path, [0.2, 0.5], [2]) == first and len(measured) == 1  # reused
    changed = composed_config(["algorithm=elasticdnn", "scenario=evolving", "algorithm.elasticdnn.sandwich=largest"])
    assert elastic_multiapp.seed_report({**run, "config": changed}, path, [0.2, 0.5], [2], run=False) is None
    assert len(measured) == 1 and "--no-run measures nothing" in capsys.readouterr().err  # read-only: nothing moved
    elastic_multiapp.seed_report({**run, "config": changed}, path, [0.2, 0.5], [2])
    assert measured[-1] == ("largest", [0.2, 0.5], [2])
    assert "algorithm.elasticdnn.sandwich" in capsys.readouterr().err
    elastic_multiapp.seed_report({**run, "config": changed}, path, [0.2, 0.5], [3])
    assert len(measured) == 3  # other app counts: measured again
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "report.json", "report.json.stale-1", "report.json.stale-2"]  # nothing measured is lost
    assert elastic_multiapp.seed_report({**run, "status": "failed"}, path, [0.2, 0.5], [3]) is None


def test_every_eclm_table_run_composes():
    # each method's settings block exists only when that method is selected
    for method in claims_eclm.METHODS:
        config = composed_config([*claims_eclm.method_overrides(method, 2), "scenario=one_step"])
        assert config["algorithm"]["name"] == method and config["dataset"]["partition"]["classes_per_device"] == 2
    assert composed_config(claims_eclm.method_overrides("eclm", 5))["algorithm"]["eclm"]["subtask_size"] == 5
