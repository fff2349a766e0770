"""Checkpoints and resume: the codec, atomic files, strategy state, device state, and a real interrupted run.

The end-to-end test runs ``python -m experiments.run`` three times (an uninterrupted run, a run
killed right after its round-2 checkpoint, and its resume) and takes about a minute on an idle
2-core machine (Ray start-up dominates); everything else runs in a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from clients.base import Device, StreamTensors
from clients.cema import CEMAClient
from clients.online import STATE_KEY, OnlineClient
from clients.tta import TTAClient
from experiments.config import from_dict
from experiments.results.writer import ResultsWriter
from experiments.resume.checkpoint import (
    Checkpoint,
    checkpoint_folder,
    config_differences,
    is_due,
    load_checkpoint,
    save_checkpoint,
    write_atomically,
)
from experiments.resume.checkpointer import DEVICE_STATE_SAVED, resumable_checkpoint, start_or_resume
from experiments.resume.device_state import DeviceStateStore, device_state_dir, discard_after
from experiments.resume.state_codec import MARK, decode_state, encode_state
from experiments.schema import ConfigError, to_dict
from models.catalog import build_model
from models.cema.cloud import ReplayBuffer
from models.training import TrainSettings
from strategies.cema import CEMA, SHARED
from strategies.cema_tally import UNKNOWN_LABEL, RoundTally
from strategies.eclm import ECLM, ModuleCatalog
from strategies.fedavg import FedAvg
from strategies.heterofl import FedRolex, HeteroFL
from strategies.tta import OnlineTTA

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BASE = {"per_round": 2, "seed": 3, "expected_devices": 6}
BUDGET = {"flops_per_s": 1e9, "memory_bytes": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e7}


def _arrays(*values: float) -> ArrayRecord:
    return ArrayRecord({f"w{i}": Array(np.full((2, 2), v, dtype=np.float32)) for i, v in enumerate(values)})


def _checkpoint(server_round: int, state=None, records=None, **meta) -> Checkpoint:
    records = records if records is not None else [{"round": r, "accuracy": 0.5} for r in range(1, server_round + 1)]
    return Checkpoint(server_round, _arrays(server_round, -1.0), state or {"cohorts": []}, records, {"seed": 3}, meta)


def _through_checkpoint(state: dict, tmp_path: Path) -> dict:
    """``state`` after a real save and load (JSON + npz files)."""
    save_checkpoint(tmp_path, _checkpoint(1, state))
    return load_checkpoint(tmp_path).strategy_state


def _equal(a, b) -> bool:
    """Deep equality of decoded states (tensors and arrays compared by value and dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------- codec
def test_codec_round_trips_nested_state_without_pickling():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()  # now it holds a momentum buffer under the integer key 0
    state = {
        "cohorts": [[1, [0, 4]], [2, [1, 5]]],
        "by_int": {0: "a", 7: (1.5, None)},
        "tensor": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "pixels": np.zeros((0, 2), dtype=np.uint8),
        "budget": float("inf"),
        "nan": float("nan"),
        "np_scalar": np.float32(0.25),
        "optimizer": optimizer.state_dict(),
    }
    tree, arrays = encode_state(state)
    text = json.dumps(tree)  # plain JSON: no object survives except as data
    back = decode_state(json.loads(text), arrays)
    assert set(arrays) == {"a0", "a1", "a2"}  # the int16 tensor, the pixels, the momentum buffer
    assert back["by_int"] == {0: "a", 7: (1.5, None)}
    assert back["np_scalar"] == 0.25 and type(back["np_scalar"]) is float
    expected = dict(state, np_scalar=0.25)
    assert _equal(expected, back)
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"], torch.ones(3))


def test_codec_refuses_objects_it_would_have_to_pickle():
    with pytest.raises(ValueError, match=r"state.model is a Linear.*state_dict"):
        encode_state({"model": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="reserved key"):
        encode_state({"x": {MARK: "numpy"}})
    with pytest.raises(ValueError, match="does not hold"):
        decode_state({MARK: "torch", "name": "a9"}, {})


# --------------------------------------------------------------------------- atomic files
def test_a_write_that_crashes_midway_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "state.json"
    write_atomically(target, lambda handle: handle.write(b"old"))

    def crash_after_half(handle):
        handle.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, crash_after_half)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # the temporary file is gone
    with pytest.raises(OSError):
        write_atomically(tmp_path / "never.json", crash_after_half)
    assert not (tmp_path / "never.json").exists()


def test_checkpoint_round_trip_keeps_only_the_newest(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(1))
    save_checkpoint(tmp_path, _checkpoint(2, {"cohorts": [[1, [0, 2]]], "x": torch.ones(2)}, device_state_saved=True))
    assert [p.name for p in checkpoint_folder(tmp_path).iterdir()] == ["round-000002"]
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 2 and loaded.meta == {"device_state_saved": True}
    assert list(loaded.arrays.keys()) == ["w0", "w1"]
    assert loaded.arrays["w0"].numpy().tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert loaded.records == [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.5}]
    assert loaded.config == {"seed": 3}
    assert torch.equal(loaded.strategy_state["x"], torch.ones(2))
    assert load_checkpoint(tmp_path / "elsewhere") is None


def test_a_checkpoint_that_fails_while_writing_leaves_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(1))
    # A record JSON cannot hold: both .npz files are written, then state.json fails.
    broken = _checkpoint(2, records=[{"round": 1, "bad": {1, 2}}])
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, broken)
    assert [p.name for p in checkpoint_folder(tmp_path).iterdir()] == ["round-000001"]  # no staging folder left
    assert load_checkpoint(tmp_path).round == 1


def test_checkpoints_are_due_every_k_rounds_and_after_the_last():
    assert [r for r in range(1, 8) if is_due(r, 3, 7)] == [3, 6, 7]
    assert [r for r in range(1, 4) if is_due(r, 1, 3)] == [1, 2, 3]
    assert not any(is_due(r, 0, 5) for r in range(1, 6))


# --------------------------------------------------------------------------- resume checks
def _cfg(**raw):
    return from_dict({"algorithm": {"name": "fedavg"}, "fleet": {"devices": 6, "per_round": 2}, **raw})


def test_config_differences_ignore_how_and_where_the_run_executes():
    saved = to_dict(_cfg(rounds=4))
    assert config_differences(saved, to_dict(_cfg(rounds=4, resume=True, output_dir="x", engine={"num_cpus": 2}))) == []
    assert config_differences(saved, to_dict(_cfg(rounds=5, algorithm={"name": "fedavg", "lr": 0.01}))) == [
        "algorithm.lr: 0.001 -> 0.01",
        "rounds: 4 -> 5",
    ]


def test_resume_is_refused_with_a_reason(tmp_path):
    cfg = _cfg(resume=True)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        resumable_checkpoint(cfg, tmp_path, None)
    save_checkpoint(tmp_path, Checkpoint(1, _arrays(0.0), {"cohorts": []}, [], to_dict(_cfg()), {DEVICE_STATE_SAVED: False}))
    assert resumable_checkpoint(cfg, tmp_path, None).round == 1
    with pytest.raises(ConfigError, match=r"1 key\(s\) differ \(saved -> now\): seed: 0 -> 1"):
        resumable_checkpoint(_cfg(resume=True, seed=1), tmp_path, None)
    tent = _cfg(algorithm={"name": "tent"}, scenario={"name": "online"})
    save_checkpoint(tmp_path, Checkpoint(2, _arrays(0.0), {"cohorts": []}, [], to_dict(tent), {DEVICE_STATE_SAVED: False}))
    with pytest.raises(ConfigError, match="cannot resume tent: its devices keep state"):
        resumable_checkpoint(from_dict({**to_dict(tent), "resume": True}), tmp_path, tmp_path / "devices")


def test_a_fresh_run_clears_what_another_run_left_and_a_resume_drops_the_lost_attempt(tmp_path):
    devices = tmp_path / "devices"
    store = DeviceStateStore(devices, 4, checkpoint_every=1, restore=True)
    for r in (1, 2, 3):
        store.save(r, r, b"x")
    save_checkpoint(tmp_path, Checkpoint(2, _arrays(0.0), {"cohorts": []}, [], to_dict(_cfg()), {DEVICE_STATE_SAVED: True}))
    assert start_or_resume(_cfg(resume=True), tmp_path, devices).round == 2
    assert store.rounds() == [2]  # round 3's file came from the interrupted attempt (round 1's was pruned)
    assert start_or_resume(_cfg(), tmp_path, devices) is None
    assert not devices.exists() and load_checkpoint(tmp_path) is None


def test_results_writer_continues_from_the_checkpointed_records(tmp_path):
    rounds = [_record(1), _record(2)]
    writer = ResultsWriter(tmp_path, {"seed": 0}, rounds=rounds)
    writer.add_round(_record(3))
    assert [r["round"] for r in json.loads((tmp_path / "results.json").read_text())["rounds"]] == [1, 2, 3]
    with pytest.raises(ValueError, match="strictly increase"):
        ResultsWriter(tmp_path, {}, rounds=[_record(2), _record(1)])


def _record(server_round):
    return {"round": server_round, "accuracy": 0.5, "global_accuracy": 0.4, "uplink_bytes": 10, "downlink_bytes": 20,
            "sim_time_s": 1.0, "wall_time_s": 0.1, "clients": [0], "failures": []}


# --------------------------------------------------------------------------- strategy state
def test_base_state_is_the_cohorts_drawn_so_far(tmp_path):
    strategy = FedAvg(**BASE)
    strategy.devices = {pid: None for pid in range(6)}
    drawn = [strategy.cohort(r) for r in (1, 2, 3)]
    restored = FedAvg(**BASE)
    restored.load_state_dict(_through_checkpoint(strategy.state_dict(), tmp_path))
    assert [restored._cohorts[r] for r in (1, 2, 3)] == drawn
    assert restored.state_dict() == strategy.state_dict()
    with pytest.raises(ValueError, match=r"FedAvg state lacks \['cohorts'\]"):
        restored.load_state_dict({})


def test_eclm_carries_nothing_beyond_the_base_between_rounds():
    catalog = ModuleCatalog(layer_of={"0.0": 0}, costs={"0.0": (1.0, 1.0, 1.0)}, shared_cost=(1.0, 1.0, 1.0))
    strategy = ECLM(catalog=catalog, layer_sizes=(1,), samples_per_device=10, epochs=1, round_budget_s=1.0,
                    size_cap=1.0, **BASE)
    strategy.importance = {0: {"0.0": 1.0}}  # rebuilt by every round's profiling
    assert strategy.state_dict() == {"cohorts": []}


@pytest.mark.parametrize("kind", [HeteroFL, FedRolex])
def test_heterofl_keeps_the_budget_fixed_at_its_first_round(kind, tmp_path):
    strategy = kind(**BASE)
    strategy.round_budget_s = 12.5  # what budget_s() fixed from the fleet at round 1
    restored = kind(**BASE)
    restored.load_state_dict(_through_checkpoint(strategy.state_dict(), tmp_path))
    assert restored.round_budget_s == 12.5 and restored.budget_s() == 12.5
    unset = kind(**BASE)
    unset.load_state_dict(_through_checkpoint(kind(**BASE).state_dict(), tmp_path))
    assert unset.round_budget_s is None


def test_online_tta_restores_served_devices_and_tallies(tmp_path):
    strategy = OnlineTTA(**BASE)
    strategy.served = {4, 1}
    strategy.online = {"fog": [3, 8], "snow": [5, 8]}
    restored = OnlineTTA(**BASE)
    restored.load_state_dict(_through_checkpoint(strategy.state_dict(), tmp_path))
    assert restored.served == {1, 4} and restored.online == {"fog": [3, 8], "snow": [5, 8]}
    assert restored.online_metrics()["online_accuracy"] == 0.5  # (3 + 5) / 16


def _cema(seed_foundation: int, edge_models: str = "shared") -> CEMA:
    torch.manual_seed(seed_foundation)
    foundation = build_model("cnn", num_classes=10, width=8)

    def edge():
        torch.manual_seed(0)
        return build_model("cnn", num_classes=10, width=4)

    preprocess = lambda p: torch.from_numpy(p.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)  # noqa: E731
    strategy = CEMA(foundation=foundation, edge_factory=edge, preprocess=preprocess, num_classes=10,
                    replay_capacity=300, edge_models=edge_models, **BASE)
    strategy.initial_state = edge().state_dict()  # what configure_train records from the run's arrays
    return strategy


def _edge_batch(strategy: CEMA, track, pixels: np.ndarray) -> tuple[int, int]:
    """One device's uploads as one edge batch on ``track``: the (cloud, replay-only) steps it made."""
    tally = RoundTally()
    strategy._edge_batch(track, pixels, np.full(len(pixels), UNKNOWN_LABEL), tally)
    return tally.cloud_steps, tally.replay_steps


@pytest.mark.parametrize("edge_models", ["shared", "per_device"])
def test_cema_continues_identically_after_a_checkpoint(tmp_path, edge_models):
    uploads = np.random.default_rng(0).integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
    key = SHARED if edge_models == "shared" else 4
    original = _cema(seed_foundation=1, edge_models=edge_models)
    original.served, original.online = {2, 5}, {"fog": [7, 16]}
    assert _edge_batch(original, original.track(key), uploads[:290]) == (9, 0)  # 290 in the history, 2 pending
    restored = _cema(seed_foundation=2, edge_models=edge_models)  # another foundation: the checkpoint brings it
    restored.load_state_dict(_through_checkpoint(original.state_dict(), tmp_path))
    track, again = original.tracks[key], restored.tracks[key]
    assert len(again.buffer) == 290 and again.pending.shape == (2, 3, 32, 32)
    assert restored.served == {2, 5} and restored.online == {"fog": [7, 16]}
    # 10 more fill no cloud batch: both replay 128 buffered samples drawn by their (restored) generators.
    assert _edge_batch(original, track, uploads[290:]) == _edge_batch(restored, again, uploads[290:]) == (0, 1)
    more = uploads[:30]
    assert _edge_batch(original, track, more) == _edge_batch(restored, again, more) == (1, 0)
    for name, value in track.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name
    for name, value in original.foundation.state_dict().items():
        assert torch.equal(value, restored.foundation.state_dict()[name]), name
    assert track.rng.bit_generator.state == again.rng.bit_generator.state


def test_replay_buffer_state_round_trips_and_checks_capacity():
    buffer = ReplayBuffer(capacity=3)
    buffer.add(torch.arange(8.0).reshape(4, 2))  # the oldest row is evicted
    copy = ReplayBuffer(capacity=3)
    copy.load_state_dict(buffer.state_dict())
    generator_a, generator_b = np.random.default_rng(1), np.random.default_rng(1)
    assert torch.equal(buffer.sample(3, generator_a), copy.sample(3, generator_b))
    empty = ReplayBuffer(capacity=3)
    empty.load_state_dict(ReplayBuffer(capacity=3).state_dict())
    assert len(empty) == 0
    with pytest.raises(ValueError, match="capacity 3"):
        ReplayBuffer(capacity=5).load_state_dict(buffer.state_dict())


# --------------------------------------------------------------------------- device state
def test_device_store_keeps_what_a_resume_can_need(tmp_path):
    store = DeviceStateStore(tmp_path, 7, checkpoint_every=3, restore=True)
    for r in (1, 2, 4, 5, 7):
        store.save(r, r * 10, bytes([r]))
        # After round 5 the newest checkpoint before it is round 3: keep round 2 (newest <= 3), 4 and 5.
        if r == 5:
            assert store.rounds() == [2, 4, 5]
    assert store.rounds() == [5, 7]  # after round 7: newest <= 6 is round 5
    assert store.load_before(7) == (50, bytes([5])) and store.load_before(8) == (70, bytes([7]))
    assert store.load_before(5) is None  # nothing earlier is kept any more
    assert DeviceStateStore(tmp_path, 7, checkpoint_every=3, restore=False).load_before(8) is None
    assert discard_after(tmp_path, 6) == 1 and store.rounds() == [5]
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        DeviceStateStore(tmp_path, 7, checkpoint_every=0, restore=True)


def test_device_state_dir_follows_the_run_folder():
    assert device_state_dir(_cfg(), Path("runs/a")) == Path("runs/a/devices")
    assert device_state_dir(_cfg(output_dir="out")) == Path("out/devices")
    assert device_state_dir(_cfg()) is None
    assert device_state_dir(_cfg(checkpoint_every=0), Path("runs/a")) is None


def _stream(index):
    rng = np.random.default_rng([5, index])
    pixels = rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
    return StreamTensors(x=x, y=torch.from_numpy(rng.integers(0, 10, size=16)), pixels=pixels, domain="fog", index=index)


def _device(options, store):
    return Device(
        partition_id=7, seed=0, budget=BUDGET, data=None, num_examples=lambda slot: 0,
        build_model=lambda: build_model("cnn", num_classes=10, width=4),
        train=TrainSettings(epochs=1, lr=1e-3, batch_size=8), flops_per_sample=1e6,
        load_factor=lambda r: 1.0, is_available=lambda r: True, slot_of_round=lambda r: 0,
        options=options, stream=_stream, state_store=store,
    )


def _message(server_round, arrays=None):
    content = RecordDict({"config": ConfigRecord({"round": server_round})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.parametrize(
    ("handler", "options"),
    [(TTAClient, {"method": "tent"}), (TTAClient, {"method": "cotta"}), (CEMAClient, {"warmup_samples": 16})],
)
def test_an_online_device_restarted_mid_run_answers_as_if_it_never_stopped(handler, options, tmp_path):
    torch.manual_seed(0)
    source = ArrayRecord(build_model("cnn", num_classes=10, width=4).state_dict())
    rounds = {1: source, 2: None, 4: None}  # the device sits out round 3

    def run(store, context, which):
        return [handler(_device(options, store)).handle("train", _message(r, rounds[r]), context) for r in which]

    steady_context = _context()
    steady = run(DeviceStateStore(tmp_path / "a", 7, 1, restore=False), steady_context, (1, 2, 4))
    run(DeviceStateStore(tmp_path / "b", 7, 1, restore=False), _context(), (1, 2))
    fresh = _context()  # the simulation restarted: context.state is empty
    resumed = run(DeviceStateStore(tmp_path / "b", 7, 1, restore=True), fresh, (4,))
    assert dict(resumed[0].content["metrics"]) | {"wall_time_s": 0} == dict(steady[2].content["metrics"]) | {"wall_time_s": 0}
    assert resumed[0].content["stream"]["index"] == steady[2].content["stream"]["index"] == 2
    assert fresh.state.config_records[STATE_KEY]["index"] == 3
    after_steady, after_resumed = OnlineClient.load_blob(steady_context)["model"], OnlineClient.load_blob(fresh)["model"]
    assert all(torch.equal(value, after_resumed[key]) for key, value in after_steady.items())
    # without a store the restarted device could not go on (no source model, no saved state)
    assert run(None, _context(), (4,))[0].has_error()


# --------------------------------------------------------------------------- a real interrupted run
SMALL = [
    "algorithm=fedavg",
    "fleet.devices=4",
    "fleet.per_round=2",
    "rounds=4",
    "checkpoint_every=1",
    "dataset.proxy_samples=300",
    "dataset.global_test_samples=200",
    "dataset.partition.size_min=20",
    "dataset.partition.size_max=40",
    "dataset.partition.test_size=10",
    "pretrain.epochs=2",
    "model.width=8",
]
#: Fields that measure the host, not the simulation.
HOST_TIMES = {"wall_time_s", "train_wall_time_s", "discovery_s"}
KILL_AFTER_ROUND = 2


def _command(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *SMALL, f"pretrain.cache_dir={cache}", f"hydra.run.dir={run_dir}",
            *extra]


def _start(run_dir: Path, cache: Path, log: Path) -> subprocess.Popen:
    # its own process group, so the kill reaches the run and the Ray processes it started, nothing else
    return subprocess.Popen(_command(run_dir, cache), cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _warm_pretrain_cache(cache: Path) -> None:
    """Pre-train once here: two fresh processes initialise the network from unseeded global RNG state."""
    from hydra import compose, initialize_config_dir

    from experiments.config import from_hydra
    from experiments.data import build_federated_data
    from experiments.pretrain.cache import pretrained_model
    from experiments.pretrain.networks import build_run_model

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = from_hydra(compose(config_name="config", overrides=["output_dir=null", *SMALL, f"pretrain.cache_dir={cache}"]))
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    model = build_run_model(cfg.model, data.num_classes, data.image_shape[0], seed=cfg.seed)
    pretrained_model(cfg, model, data)


def _without_host_times(results: dict) -> dict:
    rounds = [{k: v for k, v in r.items() if k not in HOST_TIMES} for r in results["rounds"]]
    summary = {k: v for k, v in results["summary"].items() if k not in HOST_TIMES}
    config = {k: v for k, v in results["config"].items() if k != "output_dir"}
    return {"status": results["status"], "rounds": rounds, "summary": summary, "config": config}


def test_a_killed_run_resumed_ends_with_the_numbers_of_an_uninterrupted_one(tmp_path):
    cache, steady_dir, killed_dir = tmp_path / "cache", tmp_path / "steady", tmp_path / "killed"
    _warm_pretrain_cache(cache)
    steady = _start(steady_dir, cache, tmp_path / "steady.log")
    killed = _start(killed_dir, cache, tmp_path / "killed.log")
    try:
        marker = checkpoint_folder(killed_dir) / f"round-{KILL_AFTER_ROUND:06d}"
        deadline = time.monotonic() + 400
        while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(killed.pid, signal.SIGKILL)  # as abrupt as a power cut: no clean-up code runs
        killed.wait(timeout=60)
        assert steady.wait(timeout=400) == 0, (tmp_path / "steady.log").read_text()[-3000:]
    finally:
        for proc in (steady, killed):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
    interrupted = json.loads((killed_dir / "results.json").read_text())
    assert interrupted["status"] == "running", (tmp_path / "killed.log").read_text()[-3000:]  # it really died
    assert load_checkpoint(killed_dir).round < 4

    # A resume with another configuration is refused before anything starts, and changes nothing.
    refused = subprocess.run(_command(killed_dir, cache, "resume=true", "seed=1"), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "seed: 0 -> 1" in refused.stderr
    assert json.loads((killed_dir / "results.json").read_text()) == interrupted

    resumed = subprocess.run(_command(killed_dir, cache, "resume=true"), cwd=ROOT, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first_resumed = load_checkpoint(killed_dir)
    assert first_resumed.round == 4
    a = _without_host_times(json.loads((steady_dir / "results.json").read_text()))
    b = _without_host_times(json.loads((killed_dir / "results.json").read_text()))
    assert a["status"] == b["status"] == "completed"
    assert [r["round"] for r in b["rounds"]] == [1, 2, 3, 4]
    assert a == b  # accuracies, bytes, cohorts, virtual times, failures: all of them
