"""The summary a finished run prints, rendered from a results.json fixture."""

from __future__ import annotations

import re

from experiments.results.closing import closing_summary, next_commands

RESULTS = {
    "config": {"algorithm": {"name": "eclm"}, "dataset": {"name": "digits"}, "scenario": {"name": "corrupted"},
               "fleet": {"devices": 100, "per_round": 10}},
    "summary": {
        "final_accuracy": 0.912, "final_pretrained_accuracy": 0.654, "accuracy_gain": 0.258,
        "mean_accuracy_gain": 0.2311, "final_global_accuracy": 0.801, "pretrained_global_accuracy": 0.872,
        "total_uplink_bytes": 12_300_000, "total_downlink_bytes": 45_600_000, "sim_time_s": 123.4,
        "wall_time_s": 75.0, "rounds": 10,
    },
    "rounds": [],
}


def test_the_summary_shows_before_after_gain_cost_files_and_next_commands():
    text = closing_summary(RESULTS, "outputs/run")
    lines = text.splitlines()
    assert lines[0] == "eclm on digits: 10 rounds, 100 devices (10 per round), scenario corrupted"
    row = {line.split("  ")[1]: line for line in lines if line.startswith("  ") and "  " in line[2:]}
    assert "0.654" in row["before: pre-trained model"] and "0.912" in row["after adaptation"]
    assert "+0.258" in row["gain"] and "mean over rounds +0.231" in row["gain"]
    assert "up 12.3 MB" in row["traffic"] and "down 45.6 MB" in row["traffic"]
    assert "virtual 2 min 3 s" in row["time"] and "wall 1 min 15 s" in row["time"]
    assert "files in outputs/run: results.json, accuracy_per_round.png, accuracy_vs_bytes.png" in text
    assert "python -m experiments.run algorithm=fedavg    # a baseline on the same devices" in text
    assert "python -m experiments.run -m algorithm=eclm,fedavg seed=0,1,2" in text


def test_a_run_without_a_before_shows_no_gain_row_and_an_online_baseline():
    online = {**RESULTS, "config": {**RESULTS["config"], "algorithm": {"name": "cema"}, "scenario": {"name": "online"}},
              "summary": {**RESULTS["summary"], "final_pretrained_accuracy": None, "accuracy_gain": None,
                          "mean_accuracy_gain": None}}
    text = closing_summary(online, "r", baseline="algorithm=source")
    assert "gain" not in text and "before" not in text and "after adaptation" in text
    assert "python -m experiments.run algorithm=source    #" in text
    assert "python -m experiments.run -m algorithm=cema,source seed=0,1,2" in text


def test_the_baseline_comes_from_the_plugin_and_a_sparse_results_file_still_renders():
    from experiments.algorithms import ALGORITHMS

    assert next_commands("fedavg", ALGORITHMS["fedavg"].baseline)[0][0] == "python -m experiments.run algorithm=none"
    elastic = next_commands("elasticdnn", ALGORITHMS["elasticdnn"].baseline)[1][0]
    assert elastic == "python -m experiments.run -m algorithm=elasticdnn algorithm.elasticdnn.method=elasticdnn,tent seed=0,1,2"
    assert next_commands("tent", ALGORITHMS["tent"].baseline)[1][0].startswith("python -m experiments.run -m algorithm=tent,source ")
    text = closing_summary({"config": {}, "summary": {}}, "r")
    assert text.startswith("? on ?: 0 rounds") and re.search(r"after adaptation +- +the same devices", text)
