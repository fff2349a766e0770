"""ElasticDNN claims preset over seeds: rows, tables, paired targets and --no-run, on hand-made results.

Runs are small hand-made results.json records (no real runs). Intervals are worked out by hand:
mean ± t * s / sqrt(n), s with ddof=1, t_{0.975,2} = 4.302653 (three seeds: half-width
2.484138 * s), t_{0.975,1} = 12.706205 (two seeds: 8.984682 * s).
"""

import argparse
import json

import pytest

from experiments.claims import elastic as ce
from experiments.claims import elastic_rows as rows
from experiments.claims import elastic_tables as tables
from experiments.resume.cached_run import composed_config

SEEDS = [0, 1, 2]
HALF_3 = 2.484138  # t_{0.975,2} / sqrt(3)


def record(acc, before=0.5, wall=1.0, flops=1e9, master=0, bank=0, model=100, optimizer=0, gradients=0,
           activations=0):
    """One round record (device means) with the ``train_`` metrics the devices report."""
    parts = {"master": master, "bank": bank, "model": model, "optimizer": optimizer, "gradients": gradients,
             "activations": activations}
    resident = master + bank + model + optimizer
    return {"accuracy": acc, "train_accuracy_before": before, "train_adapt_wall_s": wall, "train_adapt_flops": flops,
            "train_model_fraction": 0.05, **{f"train_memory_{k}_bytes": v for k, v in parts.items()},
            "train_resident_memory_bytes": resident, "train_peak_memory_bytes": resident + gradients + activations}


def run(*records, status="completed", wall=60.0):
    return {"status": status, "config": {}, "rounds": list(records), "summary": {"wall_time_s": wall}}


# --------------------------------------------------------------------------- one run
def test_method_row_averages_a_run_over_its_domains_by_hand():
    elastic = run(record(0.6, 0.2, 0.5, 1e9, 1000, 1000, 100, 50, 50, 400),
                  record(0.8, 0.4, 1.5, 3e9, 1000, 1000, 120, 70, 70, 400))
    row = rows.method_row(elastic)
    assert row["accuracy"] == pytest.approx(0.7) and row["accuracy_before"] == pytest.approx(0.3)
    assert row["wall_s"] == pytest.approx(1.0) and row["flops"] == pytest.approx(2e9)
    assert row["model_bytes"] == pytest.approx(110) and row["optimizer_bytes"] == pytest.approx(60)
    assert row["resident_bytes"] == pytest.approx(2170)  # (2150 + 2190) / 2
    assert row["peak_bytes"] == pytest.approx(2630)  # (2600 + 2660) / 2
    assert row["domains"] == 2 and rows.domain_curve(elastic) == [0.6, 0.8]


def test_unfinished_runs_count_as_missing_seeds():
    assert rows.method_row(run(status="failed")) is None
    assert rows.method_row({**run(record(0.5)), "status": "running"}) is None
    by_seed = {0: run(record(0.6)), 1: run(status="failed"), 2: run(record(0.8))}
    values = rows.seed_values(by_seed, "accuracy", SEEDS)
    assert values[0] == 0.6 and values[2] == 0.8 and values[1] != values[1]  # NaN for the failed seed


def test_run_folders_carry_the_seed(tmp_path):
    assert rows.run_folder(tmp_path, 5, "tent", 2) == tmp_path / "sev5" / "tent" / "seed2"
    assert rows.multiapp_path(tmp_path, 3, 1) == tmp_path / "sev3" / "multiapp" / "seed1" / "report.json"


# --------------------------------------------------------------------------- tables over seeds
def runs_over_seeds():
    """Three seeds; ElasticDNN clears Tent by 0.21 ± 0.025 and misses SHOT's +0.10; speed-ups by hand."""
    def seeds(accuracies, walls, flops, resident=(1000, 1000, 1000)):
        return {s: run(record(a, wall=w, flops=f, model=m)) for s, a, w, f, m in
                zip(SEEDS, accuracies, walls, flops, resident)}
    return {
        "elasticdnn": seeds([0.80, 0.82, 0.84], [1.0, 2.0, 2.0], [1e9, 1e9, 2e9], (1000, 1100, 1200)),
        "tent": seeds([0.60, 0.61, 0.62], [1.0, 1.0, 1.0], [1e9, 1e9, 1e9]),
        "shot": seeds([0.75, 0.78, 0.80], [1.0, 1.0, 1.0], [1e9, 1e9, 1e9]),
        "full": seeds([0.90, 0.90, 0.90], [3.0, 6.0, 7.0], [12e9, 12e9, 20e9]),
    }


def test_method_table_cells_are_means_with_intervals_by_hand():
    table = tables.method_table(runs_over_seeds(), SEEDS)
    line = next(line for line in table.splitlines() if line.startswith("| elasticdnn"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[1] == f"82.0 ± {HALF_3 * 2:.1f} (n=3)"  # 80, 82, 84: s = 2 points
    # wall speed-ups per seed 3/1, 6/2, 7/2 = 3, 3, 3.5: mean 3.17, s = 0.288675
    assert cells[4] == f"3.17 ± {HALF_3 * 0.288675:.2f} (n=3)"
    # FLOP speed-ups 12, 12, 10: mean 11.33, s = 1.1547
    assert cells[6] == f"11.33 ± {HALF_3 * 1.1547:.2f} (n=3)"
    assert cells[7] == "1.1 kB ± 248 B (n=3)"  # 1000, 1100, 1200 bytes: s = 100
    full = next(line for line in table.splitlines() if line.startswith("| full"))
    assert "| 1.00 ± 0.00 (n=3) |" in full


def test_targets_are_judged_on_paired_intervals():
    lines = tables.targets(runs_over_seeds(), SEEDS)
    tent, shot, wall, flops = lines
    # ElasticDNN - Tent per seed: 20, 21, 22 points -> 21.0 ± 2.5, all above +10
    assert f"21.0 ± {HALF_3:.1f} points (n=3; target >= 10.0 points): **met**" in tent
    # ElasticDNN - SHOT: 5, 4, 4 points -> 4.3 ± 1.4, all below +10
    assert "(n=3; target >= 10.0 points): **missed**" in shot and "4.3 ±" in shot
    assert f"3.17 ± {HALF_3 * 0.288675:.2f}x (n=3; target >= 5.00x): **missed**" in wall  # 3.17 + 0.72 < 5
    assert f"11.33 ± {HALF_3 * 1.1547:.2f}x (n=3; target >= 5.00x): **met**" in flops  # 11.33 - 2.87 > 5


def test_a_single_seed_or_a_failed_baseline_leaves_targets_undecided():
    runs = runs_over_seeds()
    one = tables.targets(runs, [0])
    assert all("**undecided**" in line and "(n=1;" in line for line in one)
    runs["tent"][1] = run(status="failed")
    tent = tables.targets(runs, SEEDS)[0]
    assert "(n=2;" in tent  # only the seeds where both runs completed are paired
    runs["tent"] = {s: run(status="failed") for s in SEEDS}
    assert "not measured (n=0;" in tables.targets(runs, SEEDS)[0]
    without = tables.targets({"full": runs["full"]}, SEEDS)  # --methods without elasticdnn
    assert len(without) == 4 and all("not measured (n=0;" in line for line in without)


def test_variant_effects_read_having_it_minus_not():
    runs = runs_over_seeds()
    runs["elasticdnn_no_update"] = {s: run(record(a)) for s, a in zip(SEEDS, [0.75, 0.77, 0.79])}
    runs["elasticdnn_bank_fedavg"] = {s: run(record(a)) for s, a in zip(SEEDS, [0.81, 0.83, 0.85])}
    effects = (("elasticdnn_no_update", "master updates", -1), ("elasticdnn_bank_fedavg", "bank averaging", +1))
    lines = tables.targets(runs, SEEDS, effects)[4:]
    assert lines[0] == "- effect of master updates: 5.0 ± 0.0 (n=3) points (paired per seed)"  # 0.80 - 0.75, ...
    assert lines[1] == "- effect of bank averaging: 1.0 ± 0.0 (n=3) points (paired per seed)"


def test_memory_table_parts_add_up_to_the_resident_and_peak_columns():
    runs = {"elasticdnn": {s: run(record(0.8, master=800, bank=800, model=40, optimizer=20, gradients=20,
                                         activations=300)) for s in SEEDS}}
    table = tables.memory_table(runs, SEEDS)
    cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert cells == ["elasticdnn", "800 B ± 0 B (n=3)", "800 B ± 0 B (n=3)", "40 B ± 0 B (n=3)", "20 B ± 0 B (n=3)",
                     "1.7 kB ± 0 B (n=3)", "20 B ± 0 B (n=3)", "300 B ± 0 B (n=3)", "2.0 kB ± 0 B (n=3)"]


def test_mean_curves_average_the_completed_seeds(tmp_path):
    runs = {"tent": {0: run(record(0.6), record(0.8)), 1: run(record(0.4), record(0.6)), 2: run(status="failed")}}
    assert tables.mean_curves(runs, SEEDS) == {"tent": pytest.approx([0.5, 0.7])}
    path = tables.plot_curves({"tent": [0.5, 0.7], "failed": []}, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the preset
def preset_args(tmp_path, *extra):
    return ce.build_parser().parse_args(["--out", str(tmp_path), "--doc", str(tmp_path / "RESULTS.md"), *extra])


def test_each_run_names_its_method_seed_and_folder(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(ce, "run_cached", lambda run_dir, overrides, run=True: seen.setdefault(run_dir, (overrides, run)))
    args = preset_args(tmp_path, "--seeds", "3", "4", "--no-run")
    for label in ce.RUNS:
        ce.run_one(label, 4, args)
    overrides, started = seen[tmp_path / "sev5" / "tent" / "seed4"]
    assert "seed=4" in overrides and not started  # --no-run starts nothing
    assert {"algorithm.elasticdnn.method=tent", "algorithm.elasticdnn.lr=0.003"} <= set(overrides)
    no_update = seen[tmp_path / "sev5" / "elasticdnn_no_update" / "seed4"][0]
    assert "algorithm.elasticdnn.master_update=false" in no_update
    for label in ("elasticdnn", "full"):  # both retrain with ElasticDNN's own searched (lr, epochs), its defaults
        tuned = [o for o in seen[tmp_path / "sev5" / label / "seed4"][0]
                 if o.startswith("algorithm.") and o.split("=")[0].endswith((".lr", ".epochs"))]
        assert tuned == []
    assert ce.shared_overrides(args)[-2:] == ["seed=3", f"pretrain.cache_dir={tmp_path / 'pretrain_cache'}"]


def test_the_parser_takes_seeds_no_run_and_known_methods_only(tmp_path):
    args = preset_args(tmp_path)
    assert args.seeds == [0, 1, 2] and not args.no_run and args.methods == list(ce.RUNS)
    with pytest.raises(SystemExit):
        preset_args(tmp_path, "--methods", "ekya")


def test_no_run_writes_the_section_from_finished_runs_only(tmp_path, capsys):
    """Two seeds of four methods on disk (seed 1 of SHOT missing): the section says so and starts nothing."""
    args = preset_args(tmp_path, "--seeds", "0", "1", "--methods", "elasticdnn", "tent", "shot", "full", "--no-run",
                       "--skip-multiapp")
    fabricated = runs_over_seeds()
    for label in args.methods:
        for seed in args.seeds:
            if (label, seed) == ("shot", 1):
                continue
            run_dir = rows.run_folder(tmp_path, 5, label, seed)
            overrides = [*ce.shared_overrides(args, seed), *[f"algorithm.elasticdnn.{o}" for o in ce.RUNS[label]],
                         f"hydra.run.dir={run_dir}"]
            run_dir.mkdir(parents=True)
            (run_dir / "results.json").write_text(json.dumps({**fabricated[label][seed],
                                                              "config": composed_config(overrides)}))
    assert ce.main(["--out", str(tmp_path), "--doc", str(tmp_path / "RESULTS.md"), "--seeds", "0", "1",
                    "--methods", "elasticdnn", "tent", "shot", "full", "--no-run", "--skip-multiapp"]) == 0
    doc = (tmp_path / "RESULTS.md").read_text()
    assert ce.BEGIN in doc and "Not counted: shot seed 1 (missing)." in doc
    assert "`python -m experiments.claims.elastic --out" in doc and "--no-run`" not in doc
    assert "ElasticDNN - same-size tent accuracy: 20.5 ±" in doc  # seeds 0, 1: 20 and 21 points
    assert "(n=2; target >= 10.0 points): **met**" in doc  # 20.5 - 8.98 * 0.71 > 10
    assert "ElasticDNN - same-size shot accuracy: 5.0 points (n=1;" in doc and "**undecided**" in doc
    assert "no finished run" in capsys.readouterr().err
    assert not (tmp_path / "sev5" / "shot" / "seed1").exists()  # nothing was started


def test_shared_overrides_default_to_the_first_seed_for_the_tuning_script():
    args = argparse.Namespace(severity=5, width=8, partition="iid", devices=4, rounds=15, seeds=[7, 8],
                              out=ce.ROOT / "outputs" / "x")
    shared = ce.shared_overrides(args)
    assert "model.width=8" in shared and "seed=7" in shared and "fleet.per_round=4" in shared
    assert not any(o.startswith(("algorithm.elasticdnn.method", "hydra")) for o in shared)
    assert "seed=8" in ce.shared_overrides(args, 8)
