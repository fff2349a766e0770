"""HeteroFL and FedRolex against their official code: sub-model extraction, combine with
``label_split``, the label-masked loss, FedRolex's rolling window (fixtures written by
``make_heterofl.py`` and ``make_fedrolex.py``)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.training import accuracy
from models.width.submodel import SubModelUpdate, channel_window, covering_average, extract, sub_shapes
from models.width.training import LabelMasked, mask_logits, masked_cross_entropy
from strategies.heterofl import FedRolex
from tests.golden.fixture import Fixture, check, exact, load, max_abs_diff

#: Below this the label-split fixtures could not tell a covering average that ignores the labels.
DISCRIMINATES = 1e-3
#: The official ``Accuracy`` is a float32 percentage (``correct_k * (100.0 / batch_size)``).
PERCENT_TOLERANCE = 1e-5


def global_state(fixture: Fixture) -> dict[str, np.ndarray]:
    """The fixture's full model before the round, in state-dict order (split by its keys and shapes)."""
    shapes = {str(key): tuple(int(n) for n in row[:rank])
              for key, row, rank in zip(fixture["keys"], fixture["shapes"], fixture["ranks"])}
    return unflatten(fixture["global"], shapes)


def flat(state: dict[str, np.ndarray]) -> np.ndarray:
    """Tensors flattened and concatenated in state-dict order (the fixtures' layout)."""
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in state.values()])


def unflatten(values: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Split a flat fixture array into tensors of ``shapes`` (AssertionError if the sizes differ)."""
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    assert sum(sizes) == values.size, f"{values.size} values for sub-model shapes totalling {sum(sizes)}"
    parts = np.split(values, np.cumsum(sizes)[:-1])
    return {key: part.reshape(shape) for (key, shape), part in zip(shapes.items(), parts)}


def client_updates(fixture: Fixture, offset: int, *, split: bool) -> list[SubModelUpdate]:
    """The fixture's trained sub-models as updates (with their label sets when ``split``)."""
    state = global_state(fixture)
    shapes = {key: value.shape for key, value in state.items()}
    updates = []
    for m, rate in enumerate(fixture["rates"]):
        arrays = unflatten(fixture[f"trained/{m}"], sub_shapes(shapes, float(rate)))
        classes = tuple(int(c) for c in fixture[f"classes/{m}"]) if split else None
        updates.append(SubModelUpdate(arrays, float(rate), offset, classes=classes))
    return updates


# --------------------------------------------------------------------------- HeteroFL
def test_extract_is_the_official_distribute():
    fixture = load("heterofl_combine")
    state = global_state(fixture)
    for m, rate in enumerate(fixture["rates"]):
        exact(fixture, flat(extract(state, float(rate))), f"sent/{m}", f"distribute: prefix sub-model at rate {rate:g}")


def test_combine_averages_classifier_rows_over_the_clients_holding_the_label():
    fixture = load("heterofl_combine")
    merged = covering_average(global_state(fixture), client_updates(fixture, 0, split=True))
    check(fixture, flat(merged), "merged", "combine: 4 clients (rates 1..1/8), label_split on the classifier")
    ignoring = covering_average(global_state(fixture), client_updates(fixture, 0, split=False))
    assert max_abs_diff(flat(ignoring), fixture["merged"]) > DISCRIMINATES


def test_masked_loss_gradient_and_local_accuracy_are_the_official_ones():
    fixture = load("heterofl_masked_loss")
    for case in (0, 1):
        logits = torch.from_numpy(fixture[f"case{case}/logits"]).requires_grad_(True)
        labels = torch.from_numpy(fixture[f"case{case}/labels"])
        classes = tuple(int(c) for c in fixture[f"case{case}/classes"])
        exact(fixture, mask_logits(logits, classes).detach(), f"case{case}/score", f"masked logits, label set {classes}")
        loss = masked_cross_entropy(logits, labels, classes)
        loss.backward()
        check(fixture, loss.detach(), f"case{case}/loss", f"masked cross-entropy, label set {classes}")
        check(fixture, logits.grad, f"case{case}/grad_logits", f"its gradient w.r.t. the logits, label set {classes}")
        scored = 100.0 * accuracy(LabelMasked(nn.Identity(), classes), logits.detach(), labels)
        check(fixture, scored, f"case{case}/accuracy_percent",
              f"local test accuracy (%) of masked scores, label set {classes}", tolerance=PERCENT_TOLERANCE)
        unmasked = masked_cross_entropy(logits.detach(), labels, None)
        assert abs(float(unmasked) - float(fixture[f"case{case}/loss"])) > DISCRIMINATES


# --------------------------------------------------------------------------- FedRolex
def test_fedrolex_window_is_the_official_rolling_extraction():
    fixture = load("fedrolex_window")
    rolls = [project_roll(int(rounds)) for rounds in fixture["rounds"]]
    for name in sorted(k for k in fixture.arrays if k.startswith("window/")):
        _, width, rate = name.split("/")
        windows = np.stack([channel_window(int(width), float(rate), roll) for roll in rolls])
        exact(fixture, windows, name, f"rolling window, {width} channels at rate {rate}, official round counter 0..8")


def project_roll(official_rounds: int) -> int:
    """The project's window roll in the round the official server counts as ``official_rounds`` (from 0)."""
    return FedRolex(per_round=1, seed=0, expected_devices=1).window_offset(official_rounds + 1)


def test_fedrolex_extract_is_the_official_distribute():
    fixture = load("fedrolex_combine")
    state, rounds = global_state(fixture), int(fixture["round"])
    for m, rate in enumerate(fixture["rates"]):
        exact(fixture, flat(extract(state, float(rate), project_roll(rounds))), f"sent/{m}",
              f"distribute: rolled sub-model at rate {rate:g}, official round counter {rounds}")


def test_fedrolex_combine_where_its_update_counts_do_not_reweight():
    """The official combine weights BN and classifier entries by running update counts that also
    grow within a round (a stated deviation, docs/CONFORMANCE.md). Where a single client covers
    such an entry, or the weight is ``K = 1`` (every conv weight), it is the covering average
    with label split, compared here; the other entries are taken from the reference."""
    fixture = load("fedrolex_combine")
    roll, expected = project_roll(int(fixture["round"])), fixture["merged"]
    plain = ~fixture["count_weighted"] | (fixture["coverage"] <= 1)
    merged = flat(covering_average(global_state(fixture), client_updates(fixture, roll, split=True)))
    check(fixture, np.where(plain, merged, expected), "merged",
          f"combine: conv weights, and BN/classifier entries one client covers ({int(plain.sum())} of {plain.size})")
    ignoring = flat(covering_average(global_state(fixture), client_updates(fixture, roll, split=False)))
    assert max_abs_diff(ignoring[plain], expected[plain]) > DISCRIMINATES
