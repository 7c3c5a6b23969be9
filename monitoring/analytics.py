"""Trends of a training's metric series: convergence status, degradation from the best, stalls.

Pure functions over plain lists of floats, ordered by round. A series is first oriented so that higher
is better (a loss is negated), so every rule below reads the same way for accuracies and losses.

Invariants: relative figures are scaled by the magnitude of the best (or median) value, floored at
``1e-12`` so an all-zero series never divides by zero; fewer points than a rule needs yields
``insufficient_data`` / ``None`` rather than a guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

IMPROVING, PLATEAU, DIVERGING, CONVERGED, INSUFFICIENT = (
    "improving",
    "plateau",
    "diverging",
    "converged",
    "insufficient_data",
)
_FLOOR = 1e-12


def higher_is_better(metric_name: str) -> bool:
    """Losses (any name containing ``loss``) improve downwards; accuracies and the rest upwards."""
    return "loss" not in metric_name.lower()


def oriented(values: Sequence[float], metric_name: str) -> list[float]:
    return [float(v) if higher_is_better(metric_name) else -float(v) for v in values]


def convergence_status(values: Sequence[float], *, metric_name: str, window: int, tolerance: float) -> str:
    """Classify the last ``window`` values by their least-squares trend.

    The trend's change over the window, relative to the median magnitude, above ``tolerance`` is
    ``improving`` and below ``-tolerance`` is ``diverging`` (a non-finite value is diverging too); a flat
    trend is ``converged`` when the values also stay within ``tolerance`` of each other, else ``plateau``
    (they move, but not forwards).
    """
    if any(not math.isfinite(float(v)) for v in values[-window:]):
        return DIVERGING
    series = np.asarray(oriented(values, metric_name)[-window:], dtype=np.float64)
    if series.size < 3:
        return INSUFFICIENT
    scale = max(float(np.median(np.abs(series))), _FLOOR)
    slope = float(np.polyfit(np.arange(series.size, dtype=np.float64), series, 1)[0])
    trend = slope * (series.size - 1) / scale
    if trend > tolerance:
        return IMPROVING
    if trend < -tolerance:
        return DIVERGING
    spread = float(series.max() - series.min()) / scale
    return CONVERGED if spread <= tolerance else PLATEAU


def degradation(values: Sequence[float], *, metric_name: str, window: int) -> tuple[float, float] | None:
    """``(relative drop, best)`` of the latest value below the best of the last ``window`` values.

    The drop is ``(best - latest) / |best|`` on the oriented series (0 when the latest is the best);
    ``best`` is returned in the metric's own sign. ``None`` with fewer than two values.
    """
    series = oriented(values, metric_name)[-window:]
    if len(series) < 2:
        return None
    best = max(series)
    drop = (best - series[-1]) / max(abs(best), _FLOOR)
    return drop, best if higher_is_better(metric_name) else -best


def stalled(values: Sequence[float], *, metric_name: str, rounds: int, min_delta: float) -> bool | None:
    """True if the best of the last ``rounds`` values is not better than the best before them by more
    than ``min_delta`` (relative). ``None`` until there are more than ``rounds`` values."""
    series = oriented(values, metric_name)
    if len(series) <= rounds:
        return None
    before, recent = max(series[:-rounds]), max(series[-rounds:])
    return (recent - before) / max(abs(before), _FLOOR) <= min_delta


MAD_TO_SIGMA = 1.4826
"""``1 / Phi^-1(3/4)``: the MAD of a normal sample times this estimates its standard deviation."""
MEAN_AD_TO_SIGMA = 1.2533
"""``sqrt(pi / 2)``: the mean absolute deviation of a normal sample times this estimates its sigma."""


def robust_z_scores(values: Sequence[float], *, min_scale: float = 0.0) -> list[float]:
    """Robust z-scores ``(x - median) / max(1.4826 * MAD, min_scale)`` (the modified z-score of Iglewicz
    and Hoaglin 1993, with an optional floor on the spread).

    When more than half the values are equal the MAD is 0; the mean absolute deviation from the median
    times ``sqrt(pi/2)`` is used instead (the usual fallback), so a lone outlier among identical values
    still scores high. ``min_scale`` keeps a round whose values agree very closely from turning tiny
    differences into large scores. When the spread is 0 and there is no floor every score is 0.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return []
    median = float(np.median(x))
    deviations = np.abs(x - median)
    scale = MAD_TO_SIGMA * float(np.median(deviations))
    if scale <= _FLOOR * max(1.0, abs(median)):
        scale = MEAN_AD_TO_SIGMA * float(np.mean(deviations))
    scale = max(scale, float(min_scale))
    if scale <= _FLOOR * max(1.0, abs(median)):
        return [0.0] * int(x.size)
    return [float(v) for v in (x - median) / scale]
