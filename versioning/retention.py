"""The per-training retention policy: its configuration and which versions keep their blobs.

Pure functions (no ORM), so the rule is easy to read and to check against a brute-force recomputation:

A version of a training keeps its blobs when any of these holds, and loses them (is *pruned*) otherwise:

- it is **protected**: pinned, the training's current version, the target of any rollback (pending,
  applied or superseded), or the base of a round or task still in progress (the caller decides this);
- it is among the **last** ``keep_last`` versions (the ``keep_last`` highest numbers, pruned ones included,
  so the set does not shift when older versions are pruned);
- ``keep_every`` is set and its number is a multiple of it (version 0 included);
- ``keep_best`` is on and its ``metric`` is the best any version of the training reached (ties are all
  kept; a metric whose name contains ``loss`` is best when lowest; versions without the metric are never
  best).

A training without a ``retention`` section keeps every version. Pruning never changes what is kept: the
inputs (numbers, metrics) of a version never change, so running the policy twice prunes nothing new.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from versioning.policy import best_of

DEFAULTS: dict[str, Any] = {
    "keep_last": 5,
    "keep_every": None,
    "keep_best": True,
    "metric": None,
    "update_blobs_hours": None,
}
MAX_COUNT = 1_000_000
MAX_UPDATE_HOURS = 10 * 365 * 24.0


@dataclass(frozen=True)
class VersionFacts:
    """What the policy needs of one version."""

    number: int
    metric: float | None = None
    protected: bool = False


def retention_parse(value: Any) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """Validate a training's ``retention`` field; return ``(settings or None, errors by field)``."""
    if value is None:
        return None, {}
    if not isinstance(value, dict):
        return None, {"retention": f"Must be a JSON object such as {DEFAULTS}, or null. Found {value!r}."}
    errors: dict[str, str] = {}
    for key in sorted(set(value) - set(DEFAULTS)):
        errors[f"retention.{key}"] = f"Unknown field. Known fields: {sorted(DEFAULTS)}."
    settings = {**DEFAULTS, **{k: v for k, v in value.items() if k in DEFAULTS}}
    keep_last = settings["keep_last"]
    if not _is_int(keep_last) or not 0 <= keep_last <= MAX_COUNT:
        errors["retention.keep_last"] = (
            f"Must be an integer from 0 to {MAX_COUNT} (how many of the newest versions keep their blobs). "
            f"Found {keep_last!r}."
        )
    keep_every = settings["keep_every"]
    if keep_every is not None and (not _is_int(keep_every) or not 1 <= keep_every <= MAX_COUNT):
        errors["retention.keep_every"] = (
            f"Must be null or an integer from 1 to {MAX_COUNT} (keep every Nth version). "
            f"Found {keep_every!r}."
        )
    if not isinstance(settings["keep_best"], bool):
        errors["retention.keep_best"] = f"Must be true or false. Found {settings['keep_best']!r}."
    metric = settings["metric"]
    if metric is not None and (not isinstance(metric, str) or not 1 <= len(metric) <= 64):
        errors["retention.metric"] = (
            "Must be null (the rollback policy's metric, else accuracy) or the name of a round metric such "
            f"as 'accuracy' or 'federated_loss'. Found {metric!r}."
        )
    hours = settings["update_blobs_hours"]
    if hours is not None:
        if (
            isinstance(hours, bool)
            or not isinstance(hours, int | float)
            or not math.isfinite(hours)
            or not 0 <= hours <= MAX_UPDATE_HOURS
        ):
            errors["retention.update_blobs_hours"] = (
                "Must be null (the server's FEDSITE_UPDATE_BLOB_RETENTION_HOURS) or a number of hours from 0 "
                f"to {MAX_UPDATE_HOURS:.0f} that client updates are kept after their round. Found {hours!r}."
            )
        else:
            settings["update_blobs_hours"] = float(hours)
    return (None if errors else settings), errors


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def retention_metric(config: dict[str, Any]) -> str:
    """The metric ``keep_best`` looks at: the retention's own, else the rollback policy's, else accuracy."""
    retention = config.get("retention") or {}
    rollback = config.get("rollback") or {}
    return str(retention.get("metric") or rollback.get("metric") or "accuracy")


def metric_value(metrics: dict[str, Any] | None, metric: str) -> float | None:
    value = (metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def versions_to_keep(
    versions: Iterable[VersionFacts], retention: dict[str, Any] | None, *, metric: str
) -> set[int]:
    """The numbers of the versions that keep their blobs under ``retention`` (see the module docstring)."""
    versions = list(versions)
    if retention is None:
        return {v.number for v in versions}
    keep = {v.number for v in versions if v.protected}
    numbers = sorted((v.number for v in versions), reverse=True)
    keep.update(numbers[: retention["keep_last"]])
    every = retention["keep_every"]
    if every:
        keep.update(n for n in numbers if n % every == 0)
    if retention["keep_best"]:
        values = [v.metric for v in versions if v.metric is not None]
        if values:
            best = best_of(values, metric)
            keep.update(v.number for v in versions if v.metric == best)
    return keep
