"""The automatic rollback policy: its configuration and the decision it takes after each round.

Pure functions (no ORM), so the rules are easy to test and to read:

- A round is *degraded* when its metric is worse than the best value seen so far by more than
  ``performance_threshold`` of that best value (relative): ``value < best * (1 - t)`` for a metric that
  should grow, ``value > best * (1 + t)`` for a loss-like metric (its name contains ``loss``), with
  ``|best|`` in place of ``best`` so negative values behave.
- After ``consecutive_degradations`` degraded rounds in a row (counted afresh after every rollback) the
  training rolls back: to the best version (``rollback_to_best``) or to the last version before the
  degraded streak.
- At most ``max_rollbacks`` automatic rollbacks; the next trigger stops the training instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "metric": "accuracy",
    "performance_threshold": 0.05,
    "consecutive_degradations": 3,
    "rollback_to_best": True,
    "max_rollbacks": 3,
}


@dataclass(frozen=True)
class RollbackConfig:
    """The seed's ``RollbackConfig``; ``to_dict`` is what a training's ``rollback`` field stores."""

    enabled: bool = False
    performance_threshold: float = 0.05
    consecutive_degradations: int = 3
    rollback_to_best: bool = True
    metric: str = "accuracy"
    max_rollbacks: int = 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rollback_parse(value: Any) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Validate a training's ``rollback`` field; return ``(settings or None, errors by field)``."""
    if value is None:
        return None, {}
    if isinstance(value, RollbackConfig):
        value = value.to_dict()
    if not isinstance(value, dict):
        return None, {"rollback": f"Must be a JSON object such as {DEFAULTS}, or null. Found {value!r}."}
    errors: dict[str, str] = {}
    unknown = sorted(set(value) - set(DEFAULTS))
    for key in unknown:
        errors[f"rollback.{key}"] = f"Unknown field. Known fields: {sorted(DEFAULTS)}."
    settings = {**DEFAULTS, **{k: v for k, v in value.items() if k in DEFAULTS}}
    for key in ("enabled", "rollback_to_best"):
        if not isinstance(settings[key], bool):
            errors[f"rollback.{key}"] = f"Must be true or false. Found {settings[key]!r}."
    metric = settings["metric"]
    if not isinstance(metric, str) or not 1 <= len(metric) <= 64:
        errors["rollback.metric"] = (
            f"Must be the name of a round metric such as 'accuracy' or 'federated_loss'. Found {metric!r}."
        )
    threshold = settings["performance_threshold"]
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not math.isfinite(threshold)
        or not 0 <= threshold < 1
    ):
        errors["rollback.performance_threshold"] = (
            f"Must be a relative degradation at least 0 and below 1 (0.05 is 5%). Found {threshold!r}."
        )
    else:
        settings["performance_threshold"] = float(threshold)
    for key, minimum in (("consecutive_degradations", 1), ("max_rollbacks", 0)):
        number = settings[key]
        if isinstance(number, bool) or not isinstance(number, int) or not minimum <= number <= 1000:
            errors[f"rollback.{key}"] = f"Must be an integer from {minimum} to 1000. Found {number!r}."
    return (None if errors else settings), errors


def lower_is_better(metric: str) -> bool:
    """Loss-like metrics (their name contains ``loss``) degrade by growing."""
    return "loss" in metric.lower()


def is_degraded(value: float, best: float, *, threshold: float, metric: str) -> bool:
    """Worse than ``best`` by more than ``threshold`` of ``|best|`` (see the module docstring)."""
    margin = threshold * abs(best)
    if lower_is_better(metric):
        return value > best + margin
    return value < best - margin


def best_of(values: list[float], metric: str) -> float:
    return min(values) if lower_is_better(metric) else max(values)
