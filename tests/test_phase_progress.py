"""Progress of a long phase: plain lines without a terminal, a rich bar on one, the training loops' callbacks.

Plain-line times come from a fake clock, so the throttling and the ETA are worked out by hand
(ETA = elapsed / done x steps left). The training callbacks must see each epoch's loss and
leave the trained weights bit-identical to a run without them.
"""

import io
import logging
import re

import pytest
import torch
from rich.console import Console
from torch import nn

from experiments.config import from_dict
from experiments.data import build_federated_data
from experiments.pretrain.cache import pretrained_model
from experiments.pretrain.networks import build_run_model
from experiments.results import phase_progress as pp
from experiments.results.phase_progress import phase
from experiments.results.plots import FONT_CACHE_LOGGER, quiet_font_cache_notice
from models.catalog import build_model
from models.eclm.families import build_modular
from models.eclm.training import AbilitySettings, train_ability, train_end_to_end
from models.elastic.bank import build_bank
from models.elastic.pretrain import pretrain_master
from models.training import TrainSettings, train_epochs

torch.set_num_threads(1)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TerminalStderr(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class BrokenStderr:
    """A stderr whose every write fails (a closed pipe)."""

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        raise OSError("broken pipe")

    def flush(self) -> None:
        raise OSError("broken pipe")


@pytest.fixture(autouse=True)
def _no_forced_mode(monkeypatch):
    """Every test decides the display itself: no inherited switch, the module's own interval."""
    monkeypatch.delenv(pp.PLAIN_ENV, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(pp, "PLAIN_EVERY_S", 10.0)
    yield
    assert pp._ACTIVE == []  # no bar is left drawing after any test


def _lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


# --------------------------------------------------------------------------- plain lines
def test_plain_lines_start_throttle_and_end_with_the_eta_worked_by_hand(capsys):
    clock = FakeClock()
    with phase("pre-training cnn", total=5, unit="epoch", clock=clock) as step:
        for now, loss in ((3, 1.0), (10, 0.5), (15, 0.375), (21, 0.25), (24, 0.125)):
            clock.now = now
            step(loss=loss)
    assert _lines(capsys) == [
        "pre-training cnn: 5 epochs",
        # 3 s: under 10 s since the start line, nothing; 10 s: 10 / 2 x 3 = 15 s left
        "pre-training cnn: epoch 2/5  elapsed 10 s  ETA 15 s  loss 0.5",
        # 15 s: 5 s since the last line, nothing; 21 s: 21 / 4 x 1 = 5.25 s left
        "pre-training cnn: epoch 4/5  elapsed 21 s  ETA 5 s  loss 0.25",
        # the last step prints no throttled line; the end line always comes
        "pre-training cnn: epoch 5/5  elapsed 24 s  ETA 0 s  loss 0.125  done",
    ]


def test_a_phase_of_unknown_length_says_when_it_started_and_how_long_it_took(capsys):
    clock = FakeClock()
    with phase("rendering the proxy part", clock=clock):
        clock.now = 2.4
    assert _lines(capsys) == ["rendering the proxy part: started", "rendering the proxy part: elapsed 2 s  done"]


def test_before_the_first_step_the_eta_is_unknown_and_one_step_is_singular(capsys):
    clock = FakeClock()
    with phase("fine-tuning", total=1, unit="epoch", clock=clock):
        clock.now = 12.0
    assert _lines(capsys) == ["fine-tuning: 1 epoch", "fine-tuning: epoch 0/1  elapsed 12 s  ETA ?  done"]


def test_a_failing_body_ends_the_lines_as_stopped_and_its_error_propagates(capsys):
    clock = FakeClock()
    with pytest.raises(RuntimeError, match="out of memory"), phase("training", total=4, unit="epoch",
                                                                   clock=clock) as step:
        clock.now = 6.0
        step(loss=2.0)
        raise RuntimeError("out of memory")
    assert _lines(capsys)[-1] == "training: epoch 1/4  elapsed 6 s  ETA 18 s  loss 2  stopped"


def test_nested_plain_phases_each_print_their_own_lines(capsys):
    with phase("outer", total=1, unit="stage", clock=FakeClock()) as outer:
        with phase("inner", total=2, unit="epoch", clock=FakeClock()) as inner:
            inner()
            inner()
        outer()
    assert _lines(capsys) == [
        "outer: 1 stage",
        "inner: 2 epochs",
        "inner: epoch 2/2  elapsed 0 s  ETA 0 s  done",
        "outer: stage 1/1  elapsed 0 s  ETA 0 s  done",
    ]


def test_a_broken_stderr_never_stops_the_work(monkeypatch):
    monkeypatch.setattr("sys.stderr", BrokenStderr())
    with phase("training", total=3, unit="epoch", clock=FakeClock()) as step:
        for _ in range(3):
            step(loss=1.0)
    assert step.done == 3  # the steps were counted although nothing could be shown


@pytest.mark.parametrize("switch", [(pp.PLAIN_ENV, "plain"), ("TERM", "dumb")])
def test_the_environment_forces_plain_lines_on_a_terminal(monkeypatch, switch):
    stderr = TerminalStderr()
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setenv(*switch)
    with phase("training", total=2, unit="epoch", clock=FakeClock()) as step:
        assert pp._ACTIVE == []  # no bar
        step()
        step()
    assert stderr.getvalue().splitlines() == ["training: 2 epochs", "training: epoch 2/2  elapsed 0 s  ETA 0 s  done"]


# --------------------------------------------------------------------------- rich bar
def _console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=140, color_system=None)


def _drawn(console: Console) -> list[str]:
    """Every state the bar was drawn in, terminal control sequences removed."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console.file.getvalue())
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def test_a_terminal_gets_a_bar_not_plain_lines(monkeypatch):
    stderr = TerminalStderr()
    monkeypatch.setattr("sys.stderr", stderr)
    with phase("pre-training cnn", total=2, unit="epoch") as step:
        assert len(pp._ACTIVE) == 1
        step(loss=0.5)
        step(loss=0.25)
    text = stderr.getvalue()
    assert "pre-training cnn" in text and "2/2" in text and "pre-training cnn: 2 epochs" not in text


def test_the_bar_shows_the_description_m_of_n_the_eta_and_the_last_loss():
    console = _console()
    clock = FakeClock()
    with phase("pre-training cnn", total=4, unit="epoch", clock=clock, console=console) as step:
        for now, loss in ((5.0, 0.5), (10.0, 0.25), (15.0, 0.125)):
            clock.now = now
            step(loss=loss)
        pp._ACTIVE[0].refresh()
        now = _drawn(console)[-1]
        # 15 s for 3 epochs: 15 / 3 x 1 = 5 s left
        assert now.startswith("pre-training cnn ━") and "3/4 epochs 0:00:15 ETA 5 s loss 0.125" in now
        clock.now = 20.0
        step(loss=0.0625)
    assert _drawn(console)[-1].endswith("4/4 epochs 0:00:20 ETA 0 s loss 0.0625")


def test_a_bar_of_unknown_length_shows_no_count_and_no_eta():
    console = _console()
    clock = FakeClock()
    with phase("rendering the proxy part", console=console, clock=clock):
        clock.now = 3.0
    final = _drawn(console)[-1]
    assert final.startswith("rendering the proxy part ") and final.rstrip().endswith("0:00:03")
    assert "/" not in final and "ETA" not in final


def test_a_failing_body_stops_the_bar_and_its_error_propagates():
    console = _console()
    with pytest.raises(ValueError, match="bad batch"), phase("training", total=3, unit="epoch",
                                                             console=console) as step:
        step(loss=1.0)
        raise ValueError("bad batch")
    assert pp._ACTIVE == [] and "1/3" in console.file.getvalue() and "stopped" in console.file.getvalue()


def test_a_nested_phase_adds_its_bar_under_the_outer_one():
    console = _console()
    with phase("ECLM cloud training", total=2, unit="stage", console=console) as outer:
        with phase("ability-enhancing", total=3, unit="epoch") as inner:
            for _ in range(3):
                inner(loss=0.5)
        assert len(pp._ACTIVE) == 1  # the inner phase ended without stopping the outer bar
        outer()
        outer()
    drawn = console.file.getvalue()
    assert "ECLM cloud training" in drawn and "2/2 stages" in drawn and "ability-enhancing" in drawn
    assert "3/3 epochs" in drawn


# --------------------------------------------------------------------------- training callbacks
def _data(n=40, features=6, classes=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    second = b.state_dict()
    return all(torch.equal(value, second[key]) for key, value in a.state_dict().items())


def test_train_epochs_reports_each_epoch_loss_and_trains_the_same_weights():
    x, y = _data()
    settings = TrainSettings(epochs=3, lr=0.05, batch_size=16, optimizer="sgd")
    seen, watched, plain = [], _linear(), _linear()
    last = train_epochs(watched, x, y, settings, seed=4, on_epoch=lambda epoch, loss: seen.append((epoch, loss)))
    assert train_epochs(plain, x, y, settings, seed=4) == last and _same_weights(watched, plain)
    assert [epoch for epoch, _ in seen] == [0, 1, 2] and seen[-1][1] == last
    # with a constant rate the first k epochs of the 3-epoch run are a k-epoch run: epoch k-1's loss
    for k in (1, 2):
        shorter = TrainSettings(epochs=k, lr=0.05, batch_size=16, optimizer="sgd")
        assert train_epochs(_linear(), x, y, shorter, seed=4) == seen[k - 1][1]


def test_no_epochs_no_callback():
    x, y = _data()
    calls = []
    train_epochs(_linear(), x, y, TrainSettings(epochs=0, lr=0.1, batch_size=8), seed=0,
                 on_epoch=lambda *args: calls.append(args))
    assert calls == []


def test_step_epoch_is_an_on_epoch_callback_and_shows_the_last_loss(capsys):
    x, y = _data()
    settings = TrainSettings(epochs=2, lr=0.05, batch_size=16)
    with phase("pre-training mlp", total=2, unit="epoch", clock=FakeClock()) as step:
        last = train_epochs(_linear(), x, y, settings, seed=1, on_epoch=step.epoch)
    assert step.done == 2 and _lines(capsys)[-1] == (
        f"pre-training mlp: epoch 2/2  elapsed 0 s  ETA 0 s  loss {last:.4g}  done"
    )


def _modular():
    return build_modular("modular_mlp", num_classes=3, width=4, in_channels=1, modules_per_layer=4,
                         image_size=3, embed_dim=9, k=2, seed=0)


def test_eclm_cloud_training_reports_every_epoch_and_trains_the_same_weights():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 1, 3, 3, generator=g), torch.arange(30) % 3
    settings = TrainSettings(epochs=2, lr=0.01, batch_size=8)
    ability = AbilitySettings(epochs=2, kappa1=None, kappa2=2, kl_weight=1.0, load_balance=False)
    runs = []
    for callback in (True, False):
        seen, model = [], _modular()
        on_epoch = (lambda epoch, loss, seen=seen: seen.append((epoch, loss))) if callback else None
        ends = (train_end_to_end(model, x, y, settings, seed=5, on_epoch=on_epoch),
                train_ability(model, x, y, [(0,), (1,), (2,)], 3, settings, ability, seed=5, on_epoch=on_epoch))
        runs.append((seen, ends, model))
    (seen, ends, watched), (_, plain_ends, plain) = runs
    assert ends == plain_ends and _same_weights(watched, plain)
    assert [epoch for epoch, _ in seen] == [0, 1, 0, 1] and (seen[1][1], seen[3][1]) == ends


def test_elastic_master_pre_training_reports_every_epoch_and_trains_the_same_weights():
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g)
    runs = []
    for callback in (True, False):
        seen, master = [], build_model("fbs_resnet_cpu", num_classes=5, width=4, seed=0)
        on_epoch = (lambda epoch, loss, seen=seen: seen.append((epoch, loss))) if callback else None
        history = pretrain_master(master, build_bank(master, seed=0), x, y, epochs=2, lr=1e-2, batch_size=12,
                                  seed=0, on_epoch=on_epoch)
        runs.append((seen, history, master))
    (seen, history, watched), (_, plain_history, plain) = runs
    assert history == plain_history and _same_weights(watched, plain)
    assert seen == list(enumerate(history["total"]))


def test_a_cold_pre_training_shows_the_rendering_and_every_epoch_a_warm_one_nothing(tmp_path, capsys):
    cfg = from_dict({"dataset": {"proxy_samples": 64, "global_test_samples": 32}, "algorithm": {"name": "fedavg"},
                     "pretrain": {"epochs": 2, "cache_dir": str(tmp_path)}, "model": {"name": "cnn", "width": 4},
                     "fleet": {"devices": 4, "per_round": 2}})
    data = build_federated_data(cfg.dataset, cfg.scenario, cfg.fleet.devices, cfg.seed)
    pretrained_model(cfg, build_run_model(cfg.model, data.num_classes, 3), data)
    lines = _lines(capsys)
    assert lines[0] == "rendering the proxy part for the cloud: started"
    assert lines[1].startswith("rendering the proxy part for the cloud: elapsed ") and lines[1].endswith("  done")
    assert lines[2] == "pre-training cnn on 64 proxy samples: 2 epochs"
    assert lines[-1].startswith("pre-training cnn on 64 proxy samples: epoch 2/2  elapsed ")
    assert lines[-1].endswith("  done") and "  loss " in lines[-1]
    pretrained_model(cfg, build_run_model(cfg.model, data.num_classes, 3), data)
    assert _lines(capsys) == []  # loaded from the cache: no phase


# --------------------------------------------------------------------------- library noise
def test_the_font_cache_notice_is_dropped_and_other_matplotlib_warnings_pass():
    font_logger = logging.getLogger(FONT_CACHE_LOGGER)
    kept: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: kept.append(record.getMessage())
    font_logger.addHandler(handler)
    try:
        quiet_font_cache_notice()
        quiet_font_cache_notice()  # once per process, however often plots are drawn
        font_logger.warning("Matplotlib is building the font cache; this may take a moment.")
        font_logger.warning("findfont: Font family 'Nope' not found.")
        font_logger.error("font file unreadable")
    finally:
        font_logger.removeHandler(handler)
    assert kept == ["findfont: Font family 'Nope' not found.", "font file unreadable"]
    assert sum(type(f).__name__ == "_DropFontCacheNotice" for f in font_logger.filters) == 1
