"""The zoo's before/after on fabricated results: each scoring kind, and the notes beside rows."""

from __future__ import annotations

from experiments.zoo.table import before_and_after, markdown_table, zoo_row


def _run(rounds, scenario="corrupted", network="cnn", status="completed", **summary):
    return {"status": status, "config": {"scenario": {"name": scenario}, "model": {"name": network}},
            "rounds": rounds, "summary": summary}


def test_local_tests_pair_the_pretrained_model_with_the_adapted_one_round_by_round():
    # rounds 1 and 3 have both values; round 2 has no pre-trained score and does not count
    rounds = [{"pretrained_accuracy": 0.5, "accuracy": 0.7}, {"accuracy": 0.1},
              {"pretrained_accuracy": 0.6, "accuracy": 0.9}]
    before, after, what = before_and_after(_run(rounds), None)
    assert (round(before, 6), round(after, 6)) == (0.55, 0.8)
    assert what.startswith("pre-trained model")


def test_evolving_domains_compare_before_and_after_adapting_on_the_held_out_batch():
    rounds = [{"train_accuracy_before": 0.4, "accuracy": 0.5}, {"train_accuracy_before": 0.2, "accuracy": 0.6}]
    before, after, what = before_and_after(_run(rounds, "evolving"), None)
    assert (round(before, 6), round(after, 6)) == (0.3, 0.55)
    assert what.startswith("before adapting")


def test_online_methods_are_compared_with_the_source_runs_final_online_accuracy():
    tent = _run([{"train_online_accuracy": 0.5}, {"train_online_accuracy": 0.62}], "online")
    source = _run([{"train_online_accuracy": 0.55}, {"train_online_accuracy": 0.58}], "online")
    assert before_and_after(tent, source)[:2] == (0.58, 0.62)
    assert before_and_after(tent, None)[:2] == (None, 0.62)


def test_rows_name_a_reason_only_where_accuracy_fell_and_say_so_when_none_is_known():
    up = zoo_row("eclm", _run([{"pretrained_accuracy": 0.5, "accuracy": 0.8}], total_uplink_bytes=1000,
                              total_downlink_bytes=1500, sim_time_s=65, wall_time_s=5), None)
    down = zoo_row("fedavg", _run([{"pretrained_accuracy": 0.8, "accuracy": 0.6}]), None)
    unknown = zoo_row("local", _run([{"pretrained_accuracy": 0.8, "accuracy": 0.7}]), None)
    failed = zoo_row("an", _run([], status="failed"), None)
    table = markdown_table([up, down, unknown, failed], {"fedavg": "one model for label-skewed devices", "eclm": "x"})
    lines = table.splitlines()[2:]
    assert lines[0] == ("| `eclm` | corrupted | cnn | 50.0 | 80.0 | +30.0 | pre-trained model, same local tests | "
                        "2.5 kB | 1 min 5 s | 5 s |  |")
    assert lines[1].endswith("| -20.0 | pre-trained model, same local tests | 0 B | 0 s | 0 s | "
                             "one model for label-skewed devices |")
    assert lines[2].endswith("| adaptation hurt here; no reason is known |")
    assert lines[3].endswith("| run failed |")


def test_the_zoo_counts_how_many_batches_the_most_sampled_online_device_saw():
    from experiments.zoo.__main__ import most_batches_per_device

    rounds = [{"cohort": [4, 7]}, {"cohort": [7, 9]}, {"cohort": [1, 7]}]
    assert most_batches_per_device({"rounds": rounds}) == 3
    assert most_batches_per_device({"rounds": []}) == 0
