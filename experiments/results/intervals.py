"""Means with confidence intervals over seeds, paired differences, and verdicts read from them.

A comparison over a handful of seeds is reported as the mean and a two-sided Student-t
interval of the mean, ``mean +- t_{1-a/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
deviation (``ddof=1``). A difference between two methods is taken per seed first (paired:
both ran on the same seed's data, devices and pre-trained model), then summarised the same way.
A target counts as met only when the whole interval clears it, as missed only when the whole
interval falls short, and as undecided otherwise (or when there is a single seed: no interval).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

#: Two-sided confidence level of every interval the project reports.
CONFIDENCE = 0.95
#: How the interval is computed, for table captions.
METHOD_CAPTION = "mean and two-sided 95 % Student-t interval over seeds (n seeds, ddof=1)"
MET, MISSED, UNDECIDED = "met", "missed", "undecided"


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its confidence interval ``[low, high]`` (NaN when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (NaN when there is no interval)."""
        return (self.high - self.low) / 2

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """``"87.7 ± 1.2"`` (mean and half-width, times ``scale``); the mean alone when n < 2."""
        if self.n == 0:
            return "-"
        mean = f"{scale * self.mean:.{digits}f}"
        if math.isnan(self.half_width):
            return mean
        return f"{mean} ± {scale * self.half_width:.{digits}f}"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` and its two-sided Student-t confidence interval.

    Parameters
    ----------
    values
        One number per seed; NaN entries (a failed run) are dropped.
    confidence
        Two-sided level, e.g. 0.95.

    Returns
    -------
    Interval
        ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)``, ``s`` with ``ddof=1``; ``low`` and
        ``high`` are NaN for fewer than two values, and everything is NaN for none.
    """
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(kept)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(kept) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The interval of ``a - b`` taken seed by seed (paired); seeds missing in either are dropped.

    Raises
    ------
    ValueError
        When the two sequences do not hold one value per seed each (different lengths).
    """
    if len(a) != len(b):
        raise ValueError(f"paired values need one per seed on both sides, got {len(a)} and {len(b)}")
    return mean_interval([x - y for x, y in zip(a, b, strict=True)], confidence)


def paired_ratio(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The interval of ``a / b`` taken seed by seed; seeds where ``b`` is 0 are dropped."""
    if len(a) != len(b):
        raise ValueError(f"paired values need one per seed on both sides, got {len(a)} and {len(b)}")
    return mean_interval([x / y if y else math.nan for x, y in zip(a, b, strict=True)], confidence)


def verdict(interval: Interval, target: float, at_least: bool = True) -> str:
    """``met`` when the whole interval clears ``target``, ``missed`` when it falls wholly short.

    Parameters
    ----------
    interval
        The measured quantity.
    target
        The bound it is judged against (inclusive).
    at_least
        True: the target is ``value >= target``; False: ``value <= target``.

    Returns
    -------
    str
        :data:`MET`, :data:`MISSED` or :data:`UNDECIDED` (also for fewer than two seeds).
    """
    if interval.n < 2 or math.isnan(interval.low):
        return UNDECIDED
    low, high = (interval.low, interval.high) if at_least else (-interval.high, -interval.low)
    bound = target if at_least else -target
    if low >= bound:
        return MET
    if high < bound:
        return MISSED
    return UNDECIDED
