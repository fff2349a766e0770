"""ECLM 5.2 module-wise aggregation on a hand-worked example (there is no official ECLM code).

Paper, section 5.2: ``w_i' = sum_{k in U_i} Importance(w_i | D_k) * w_ik'`` over the set U_i of
sub-models that hold module i, the importances normalised over U_i; modules nobody trained keep
their weights; shared layers and the selector are averaged by data size, as FedAvg does
(ALGORITHMS.md, "Module-wise aggregation").

The example: one module layer of four modules, three devices. Every device reports an importance
for every module (its profiling reply), but only the modules it holds count.

=======  ==========  ===================  =========================  ==============
device   examples    holds                importance reported        data weight
=======  ==========  ===================  =========================  ==============
A        10          m0, m2               m0 .5, m1 .4, m2 .1, m3 0  10/100 = 0.1
B        30          m0, m1, m2           m0 .2, m1 .3, m2 .1, m3 0  30/100 = 0.3
C        60          m1, m2               m0 .1, m1 .6, m2 .2, m3 0  60/100 = 0.6
=======  ==========  ===================  =========================  ==============

By hand (cloud values are all 9 and must not leak into anything a device trained):

- m0, holders A, B: weights .5/.7 = 5/7 and .2/.7 = 2/7 (A's m1 importance .4 and C's m0
  importance .1 do not count: they do not hold those modules).
  5/7 * [7, 0] + 2/7 * [0, 7] = [5, 2].
- m1, holders B, C: .3/.9 = 1/3 and .6/.9 = 2/3.  1/3 * [3, 3] + 2/3 * [6, 0] = [5, 1].
- m2, holders A, B, C: .1/.4, .1/.4, .2/.4 = 1/4, 1/4, 1/2.
  1/4 * [4, 8] + 1/4 * [8, 4] + 1/2 * [2, 2] = [4, 4].
- m3, nobody: keeps the cloud's [9, 9] bit for bit.
- selector head (shared): .1 * [10, 0] + .3 * [0, 10] + .6 * [5, 5] = [4, 6].
- classifier head (shared): .1 * 1 + .3 * 2 + .6 * 3 = 2.5.
- ``layers.0.active`` is the cloud's own mask (per-device masks are never averaged).

Plain importance weights (not normalised) would give m0 = .5 * [7, 0] + .2 * [0, 7] = [3.5, 1.4];
weighting modules by data size would give m0 = (10 * [7, 0] + 30 * [0, 7]) / 40 = [1.75, 5.25].
"""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from strategies.base import DeviceInfo
from strategies.eclm import ECLM, ModuleCatalog, modulewise_average
from tests.golden.fixture import COMPARISONS, Comparison, assert_close

#: float32 arithmetic on values of a few units: a few ulp.
TOLERANCE = 1e-6
JUDGE = "hand-worked example (ECLM 5.2)"
M = "layers.0.modules.m{}.0.weight"
SELECTOR, HEAD, ACTIVE = "selector.heads.0.weight", "head.weight", "layers.0.active"
EXPECTED = {M.format(0): [5, 2], M.format(1): [5, 1], M.format(2): [4, 4], M.format(3): [9, 9],
            SELECTOR: [4, 6], HEAD: [2.5]}
IMPORTANCE = {
    "A": {"l0.m0": 0.5, "l0.m1": 0.4, "l0.m2": 0.1, "l0.m3": 0.0},
    "B": {"l0.m0": 0.2, "l0.m1": 0.3, "l0.m2": 0.1, "l0.m3": 0.0},
    "C": {"l0.m0": 0.1, "l0.m1": 0.6, "l0.m2": 0.2, "l0.m3": 0.0},
}
EXAMPLES = {"A": 10, "B": 30, "C": 60}
HOLDS = {"A": ("l0.m0", "l0.m2"), "B": ("l0.m0", "l0.m1", "l0.m2"), "C": ("l0.m1", "l0.m2")}


def _record(values: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=bool if k == ACTIVE else np.float32)) for k, v in values.items()})


CLOUD = _record({**{M.format(i): [9, 9] for i in range(4)}, SELECTOR: [9, 9], HEAD: [9],
                 ACTIVE: [True, True, True, False]})
TRAINED = {
    "A": _record({M.format(0): [7, 0], M.format(2): [4, 8], SELECTOR: [10, 0], HEAD: [1]}),
    "B": _record({M.format(0): [0, 7], M.format(1): [3, 3], M.format(2): [8, 4], SELECTOR: [0, 10], HEAD: [2]}),
    "C": _record({M.format(1): [6, 0], M.format(2): [2, 2], SELECTOR: [5, 5], HEAD: [3]}),
}


def _check_against_hand_values(out: ArrayRecord, path: str) -> None:
    assert list(out.keys()) == list(CLOUD.keys())
    worst = 0.0
    for key, expected in EXPECTED.items():
        worst = max(worst, assert_close(out[key].numpy(), np.asarray(expected, np.float32), TOLERANCE, f"{path} {key}"))
        assert out[key].numpy().dtype == np.float32
    assert out[M.format(3)].numpy().tobytes() == CLOUD[M.format(3)].numpy().tobytes()
    assert out[ACTIVE].numpy().tolist() == [True, True, True, False]
    what = f"module-wise average via {path}"
    COMPARISONS.append(Comparison(f"eclm-aggregation-{path}", JUDGE, what, worst, TOLERANCE))


def test_modulewise_average_matches_the_hand_worked_example():
    updates = [(TRAINED[d], IMPORTANCE[d], float(EXAMPLES[d])) for d in "ABC"]
    _check_against_hand_values(modulewise_average(CLOUD, updates), "modulewise_average")


def test_the_strategys_aggregate_train_gives_the_same_numbers():
    catalog = ModuleCatalog({f"l0.m{i}": 0 for i in range(4)}, {f"l0.m{i}": (1.0, 1.0, 1.0) for i in range(4)},
                            (1.0, 1.0, 1.0))
    strategy = ECLM(catalog=catalog, layer_sizes=(4,), samples_per_device=10, epochs=1, round_budget_s=1.0,
                    size_cap=1.0, per_round=3, seed=0, expected_devices=3)
    strategy._cloud = CLOUD
    replies = []
    for pid, device in enumerate("ABC"):
        strategy.devices[pid] = DeviceInfo(pid, 100 + pid, EXAMPLES[device], {})
        strategy._by_node[100 + pid] = pid
        strategy.importance[pid] = IMPORTANCE[device]  # the profiling reply of this round
        strategy.selections[pid] = HOLDS[device]
        strategy.ledger.completed.add(pid)
        sent = Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=100 + pid,
                       message_type=MessageType.TRAIN)
        metrics = MetricRecord({"num-examples": EXAMPLES[device], "accuracy": 0.5})
        replies.append(Message(RecordDict({"arrays": TRAINED[device], "metrics": metrics}), reply_to=sent))
    new, metrics = strategy.aggregate_train(1, replies)
    assert strategy.ledger.failures == [] and metrics["devices"] == 3
    _check_against_hand_values(new, "ECLM.aggregate_train")

