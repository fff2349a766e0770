"""Plots of round records: one run's accuracy curves, and the figure/axis helpers reports share.

matplotlib (Agg backend) is imported lazily inside the functions, so importing this module, or
:mod:`experiments.results.writer` which uses it, stays fast and never loads matplotlib. The
backend is chosen in code, not through ``MPLBACKEND``, so a user's own plotting in the same
process (a notebook) keeps its backend. matplotlib's notice while it builds its font cache on
a fresh machine is dropped before the first import (:func:`quiet_font_cache_notice`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.results.progress import format_bytes
from experiments.results.summary import finite_or_none

ACCURACY_PLOT_FILENAME = "accuracy_per_round.png"
BYTES_PLOT_FILENAME = "accuracy_vs_bytes.png"
PLOT_FIGSIZE_IN = (6.0, 4.0)  # one panel, readable in a README at 100 dpi
PLOT_DPI = 100
#: The logger and text of matplotlib's one-off "Matplotlib is building the font cache; this may
#: take a moment." (a WARNING from a timer thread, matplotlib/font_manager.py FontManager).
FONT_CACHE_LOGGER = "matplotlib.font_manager"
FONT_CACHE_NOTICE = "building the font cache"


class _DropFontCacheNotice(logging.Filter):
    """Drops the font-cache notice only; the logger's other warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return FONT_CACHE_NOTICE not in record.getMessage()


def quiet_font_cache_notice() -> None:
    """Keep matplotlib's font-cache notice out of the terminal (once per process, before importing it).

    A filter on its logger rather than a raised level: the notice is a WARNING, and the
    logger's other warnings (a missing font family) still say something worth reading.
    """
    font_logger = logging.getLogger(FONT_CACHE_LOGGER)
    if not any(isinstance(existing, _DropFontCacheNotice) for existing in font_logger.filters):
        font_logger.addFilter(_DropFontCacheNotice())


def new_figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = PLOT_FIGSIZE_IN):
    """A matplotlib Figure on the Agg backend (no display, no pyplot global state).

    Returns
    -------
    tuple
        ``(figure, axes)`` as from ``Figure.subplots``.
    """
    quiet_font_cache_notice()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=PLOT_DPI)
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def integer_axis_locator():
    """A tick locator that puts ticks on whole numbers only (round axes)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def bytes_axis_formatter():
    """A tick formatter that prints byte counts with :func:`format_bytes`."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _position: format_bytes(max(value, 0.0)))


def cumulative_bytes(rounds: Sequence[Mapping[str, Any]]) -> list[float]:
    """Uplink + downlink bytes summed up to and including each round (null counts as 0)."""
    total, running = [], 0.0
    for record in rounds:
        for key in ("uplink_bytes", "downlink_bytes"):
            running += finite_or_none(record.get(key)) or 0.0
        total.append(running)
    return total


def _accuracy_series(rounds: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """``key`` per round with null as NaN (matplotlib draws a gap)."""
    values = [finite_or_none(record.get(key)) for record in rounds]
    return [math.nan if value is None else value for value in values]


def plot_run(rounds: Sequence[Mapping[str, Any]], run_dir: str | Path) -> list[Path]:
    """Write ``accuracy_per_round.png`` and ``accuracy_vs_bytes.png`` into ``run_dir``.

    Parameters
    ----------
    rounds
        Round records (device ``accuracy``, the pre-trained model's ``pretrained_accuracy`` on
        the same devices when recorded, and cloud ``global_accuracy`` are drawn).
    run_dir
        Destination folder.

    Returns
    -------
    list of Path
        The two PNG files.
    """
    run_dir = Path(run_dir)
    numbers = [record["round"] for record in rounds]
    x_by_plot = {ACCURACY_PLOT_FILENAME: numbers, BYTES_PLOT_FILENAME: cumulative_bytes(rounds)}
    written = []
    for filename, xs in x_by_plot.items():
        figure, axes = new_figure()
        axis = axes[0][0]
        for key, label in (("accuracy", "device accuracy (after adaptation)"),
                           ("pretrained_accuracy", "same devices, pre-trained model (before)"),
                           ("global_accuracy", "global accuracy")):
            if key == "pretrained_accuracy" and not any(r.get(key) is not None for r in rounds):
                continue  # methods scored on stream batches record no "before"
            axis.plot(xs, _accuracy_series(rounds, key), marker="o", markersize=3, label=label)
        if filename == BYTES_PLOT_FILENAME:
            axis.xaxis.set_major_formatter(bytes_axis_formatter())
            axis.set_xlabel("cumulative bytes (uplink + downlink)")
        else:
            axis.xaxis.set_major_locator(integer_axis_locator())
            axis.set_xlabel("round")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(run_dir / filename)
        written.append(run_dir / filename)
    return written
