"""Progress of one long phase of a run: pre-training epochs, an algorithm's cloud training, rendering.

A phase is a piece of work of ``total`` steps (or of unknown length, ``total=None``)::

    with phase("pre-training cnn", total=10, unit="epoch") as step:
        for epoch in range(10):
            ...
            step(loss=0.41)  # or hand step.epoch to a training loop's on_epoch callback

On a terminal it draws a rich progress bar (description, bar, M/N, elapsed, ETA, the last
metrics) whose finished line stays on screen. Without one (CI, logs, pytest), or when
``TERM`` names a terminal that cannot redraw a line, or with ``EDGECLOUD_PROGRESS=plain``,
it prints plain lines to stderr: one when the phase starts, then at most one every
:data:`PLAIN_EVERY_S` seconds, and one when it ends, each with M/N, the elapsed time, the
ETA (elapsed / M x (N - M)) and the last metrics. A phase opened inside another one on a
terminal adds its own bar under the outer one.

The display never stops the work: a display error is logged at DEBUG and the phase goes on
without a display; an error of the work itself ends the display and propagates.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from experiments.results.progress import format_duration

logger = logging.getLogger(__name__)

#: Least seconds between two plain progress lines of a phase (assumption: a line every 10 s shows
#: a run is alive without flooding a CI log). Lines come only when a step finishes, so a phase
#: of 10 epochs prints at most 12 lines (start, 10 steps, end), a fast one just two.
PLAIN_EVERY_S = 10.0
#: Environment variable that forces plain lines on a terminal when set to :data:`PLAIN_VALUE`.
PLAIN_ENV = "EDGECLOUD_PROGRESS"
PLAIN_VALUE = "plain"
#: ``TERM`` values of terminals that cannot redraw a line (rich's own list of dumb terminals).
DUMB_TERMS = ("dumb", "unknown")
#: Redraws of the bar per second (assumption: the elapsed seconds tick visibly; fewer wake-ups
#: than rich's default 10 leave the shared cores to the training).
REFRESH_PER_S = 2
#: Significant digits of a metric on a progress line (``loss 0.4123``).
METRIC_DIGITS = 4

#: The bar drawing now (at most one): a nested phase adds its task to it, since rich allows one
#: live display per console; the phase that started it stops it.
_ACTIVE: list[Progress] = []


def plain_output_forced() -> bool:
    """Whether the environment asks for plain lines even on a terminal (``TERM=dumb``, ``EDGECLOUD_PROGRESS=plain``)."""
    return os.environ.get(PLAIN_ENV, "").lower() == PLAIN_VALUE or os.environ.get("TERM", "") in DUMB_TERMS


class Step:
    """What a phase yields: call it once per finished step, with the step's metrics.

    Attributes
    ----------
    done : int
        Steps finished so far.
    total : int or None
        Steps of the phase (None: unknown).
    metrics : dict
        The metrics passed with the last call that passed any.
    """

    def __init__(self, display, total: int | None) -> None:
        self.done = 0
        self.total = total
        self.metrics: dict[str, float] = {}
        self._display = display

    def __call__(self, advance: int = 1, **metrics: float) -> None:
        """Count ``advance`` more finished steps and remember ``metrics`` (e.g. ``loss=0.41``)."""
        self.done += advance
        if metrics:
            self.metrics = dict(metrics)
        self._show("update")

    def epoch(self, index: int, loss: float) -> None:
        """An ``on_epoch(index, loss)`` callback of the training loops: one step with its mean loss.

        Epochs arrive in order, one call each, so the count advances by one; ``index`` is
        the loop's own epoch number and is not needed.
        """
        self(loss=loss)

    def close(self, failed: bool) -> None:
        """End the display: the last line stays; ``failed`` marks a phase its work aborted."""
        self._show("close", failed)
        self._display = None

    def _show(self, method: str, *args) -> None:
        """Call the display's ``method``; on any display error drop the display, never raise."""
        display = self._display
        if display is None:
            return
        try:
            getattr(display, method)(self, *args)
        except Exception:  # a broken display (closed stream, terminal gone) must not stop the work
            logger.debug("progress display of a phase failed; going on without it", exc_info=True)
            self._display = None
            try:
                display.abandon()
            except Exception:
                logger.debug("progress display could not be stopped", exc_info=True)


@contextmanager
def phase(
    description: str,
    total: int | None = None,
    unit: str = "step",
    *,
    clock: Callable[[], float] = time.monotonic,
    console: Console | None = None,
) -> Iterator[Step]:
    """Show the progress of the work inside the block (module docstring).

    Parameters
    ----------
    description : str
        What the phase does, e.g. ``"pre-training cnn"``.
    total : int or None
        Steps the phase will take; None when unknown (no ETA).
    unit : str
        What a step is, singular (``"epoch"``); an ``s`` makes the plural.
    clock : callable
        Seconds of a monotonic clock; tests pass a fake one.
    console : rich.console.Console or None
        Draw the bar on this console whatever the terminal is (tests pass one writing to a
        string); None decides by ``sys.stderr`` and the environment.

    Yields
    ------
    Step
        Call it once per finished step.
    """
    step = Step(_open_display(description, total, unit, clock, console), total)
    failed = True
    try:
        yield step
        failed = False
    finally:
        step.close(failed)


def _open_display(description: str, total: int | None, unit: str, clock, console: Console | None):
    """A rich bar when drawing is wanted and works, else plain lines; None if even those fail."""
    try:
        if console is not None or _ACTIVE or (_stderr_is_terminal() and not plain_output_forced()):
            return _RichDisplay(description, total, unit, clock, console)
    except Exception:
        logger.debug("progress bar unavailable; printing plain lines", exc_info=True)
    try:
        return _PlainDisplay(description, total, unit, clock)
    except Exception:
        logger.debug("plain progress lines unavailable", exc_info=True)
        return None


def _stderr_is_terminal() -> bool:
    """``sys.stderr.isatty()``, False when stderr was replaced by something that cannot say."""
    try:
        return sys.stderr.isatty()
    except Exception:  # a replaced or closed stderr
        return False


def _plural(count: int | None, unit: str) -> str:
    return unit if count == 1 else f"{unit}s"


def eta_text(elapsed: float, done: int, total: int | None) -> str:
    """``elapsed / done x (total - done)`` as a duration; ``?`` before the first step or without a total."""
    if total is None or done <= 0:
        return "?"
    return format_duration(elapsed / done * max(total - done, 0))


def metrics_text(metrics: Mapping[str, float]) -> str:
    """``loss 0.4123  acc 0.9``: numbers to :data:`METRIC_DIGITS` significant digits."""
    return "  ".join(
        f"{name} {value:.{METRIC_DIGITS}g}" if isinstance(value, (int, float)) else f"{name} {value}"
        for name, value in metrics.items()
    )


class _PlainDisplay:
    """Plain lines on stderr: the start, at most one every :data:`PLAIN_EVERY_S` seconds, the end."""

    def __init__(self, description: str, total: int | None, unit: str, clock) -> None:
        self.description, self.total, self.unit, self.clock = description, total, unit, clock
        self.started = self.last_line = clock()
        size = "started" if total is None else f"{total} {_plural(total, unit)}"
        self._write(f"{description}: {size}")

    def update(self, step: Step) -> None:
        now = self.clock()
        if now - self.last_line >= PLAIN_EVERY_S and (self.total is None or step.done < self.total):
            self.last_line = now
            self._write(self._line(step, now))

    def close(self, step: Step, failed: bool) -> None:
        self._write(f"{self._line(step, self.clock())}  {'stopped' if failed else 'done'}")

    def abandon(self) -> None:
        """Nothing to stop: plain lines hold no resources."""

    def _line(self, step: Step, now: float) -> str:
        """``pre-training cnn: epoch 3/10  elapsed 12 s  ETA 28 s  loss 0.41`` (no M/N, no ETA without a total)."""
        elapsed = now - self.started
        parts = [f"elapsed {format_duration(elapsed)}"]
        if self.total is not None:
            parts = [f"{self.unit} {step.done}/{self.total}", *parts, f"ETA {eta_text(elapsed, step.done, self.total)}"]
        elif step.done:
            parts.insert(0, f"{step.done} {_plural(step.done, self.unit)}")
        if step.metrics:
            parts.append(metrics_text(step.metrics))
        return f"{self.description}: " + "  ".join(parts)

    @staticmethod
    def _write(line: str) -> None:
        print(line, file=sys.stderr, flush=True)  # looked up per line: pytest and rich may swap stderr


class _CountColumn(ProgressColumn):
    """``3/10 epochs``; nothing for a phase of unknown length."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text(f"{int(task.completed)}/{int(task.total)} {task.fields['units']}", style="progress.download")


class _EtaColumn(ProgressColumn):
    """``ETA 28 s``, the same estimate as the plain lines (rich's own needs two samples in a window)."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        eta = eta_text(task.elapsed or 0.0, int(task.completed), int(task.total))
        return Text(f"ETA {eta}", style="progress.remaining")


class _RichDisplay:
    """One task on a rich progress bar; the outermost phase owns the bar and stops it."""

    def __init__(self, description: str, total: int | None, unit: str, clock, console: Console | None) -> None:
        self.owner = not _ACTIVE
        if self.owner:
            progress = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(), _CountColumn(), TimeElapsedColumn(),
                _EtaColumn(), TextColumn("{task.fields[metrics]}", markup=False),
                console=console or Console(stderr=True), transient=False, get_time=clock,
                refresh_per_second=REFRESH_PER_S,
            )
            progress.start()
            _ACTIVE.append(progress)
        self.progress = _ACTIVE[0]  # nested: a task on the running bar
        self.task = self.progress.add_task(description, total=total, units=_plural(total, unit), metrics="")

    def update(self, step: Step) -> None:
        self.progress.update(self.task, completed=step.done, metrics=metrics_text(step.metrics))

    def close(self, step: Step, failed: bool) -> None:
        suffix = "  stopped" if failed else ""
        self.progress.update(self.task, completed=step.done, metrics=metrics_text(step.metrics) + suffix)
        self.progress.stop_task(self.task)
        self.abandon()

    def abandon(self) -> None:
        """Stop the bar if this phase owns it (the finished lines stay on screen)."""
        if self.owner and _ACTIVE and _ACTIVE[0] is self.progress:
            _ACTIVE.pop(0)
            self.progress.stop()
