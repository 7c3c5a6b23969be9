"""The seed's monitoring API, ``FederatedMonitor``, as a thin layer over monitoring's services and selectors.

It keeps the seed's shape: ``initialize`` and ``record_training_metric`` are awaitable;
``get_training_progress``, ``get_system_health`` and ``get_alerts`` are plain calls::

    from monitoring.monitor import FederatedMonitor, MetricType, TrainingMetric

    monitor = FederatedMonitor()
    await monitor.initialize()
    await monitor.record_training_metric(
        TrainingMetric(training_id=training_id, round_number=1, metric_type=MetricType.ACCURACY,
                       value=0.87, timestamp=datetime.utcnow())
    )
    health = monitor.get_system_health()
    print(f"System health: {health['health_status']}")

Invariants: no logic lives here. A recorded metric goes through ``monitoring.services.metrics_record``
(so it is broadcast and evaluated for alerts exactly like an aggregation's); the ORM is never touched on
an event loop's thread (the same helpers as ``trainings.coordinator``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fedsite.errors import NotFound, ValidationFailed
from trainings.coordinator import _call_sync, _run_in_thread

__all__ = ["FederatedMonitor", "MetricType", "TrainingMetric"]


class MetricType(enum.StrEnum):
    """Metric names as stored (``Metric.name``); losses improve downwards, the rest upwards."""

    ACCURACY = "accuracy"
    LOSS = "loss"
    FEDERATED_ACCURACY = "federated_accuracy"
    FEDERATED_LOSS = "federated_loss"
    PRECISION = "precision"
    RECALL = "recall"
    F1_SCORE = "f1_score"


@dataclass(frozen=True)
class TrainingMetric:
    """One value of one metric for one round of a training (the seed's ``TrainingMetric``).

    ``timestamp`` is informational: the stored row carries the time it was recorded.
    """

    training_id: str
    round_number: int
    metric_type: MetricType | str
    value: float
    timestamp: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def validated(self) -> tuple[str, int, str, float]:
        errors: dict[str, str] = {}
        if (
            isinstance(self.round_number, bool)
            or not isinstance(self.round_number, int)
            or self.round_number < 0
        ):
            errors["round_number"] = f"round_number must be an integer >= 0. Found {self.round_number!r}."
        name = self.metric_type.value if isinstance(self.metric_type, MetricType) else self.metric_type
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            errors["metric_type"] = (
                f"metric_type must be a MetricType or a name of 1-64 characters. Found {name!r}."
            )
        try:
            value = float(self.value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            errors["value"] = f"value must be a finite number. Found {self.value!r}."
        if errors:
            raise ValidationFailed(" ".join(errors.values()), details=errors)
        return str(self.training_id), self.round_number, name, value


def _training(training_id: str) -> Any:
    from trainings.selectors import training_get

    training = training_get(training_id)
    if training is None:
        raise NotFound(f"No training with id {training_id!r}.", code="training_not_found")
    return training


class FederatedMonitor:
    """Record metrics and read progress, system health and alerts from Python (the seed's monitor)."""

    def __init__(self) -> None:
        self.initialized = False

    async def initialize(self) -> None:
        """Check that the database answers (and is migrated). Safe to call more than once."""
        await _run_in_thread(self._check_database)
        self.initialized = True

    @staticmethod
    def _check_database() -> None:
        from monitoring.models import Metric

        Metric.objects.exists()

    async def record_training_metric(self, metric: TrainingMetric) -> None:
        """Store (or overwrite) one metric value of a round; raises ``ValidationFailed``/``NotFound``."""
        training_id, round_number, name, value = metric.validated()
        await _run_in_thread(
            self._record, training_id=training_id, round_number=round_number, name=name, value=value
        )

    @staticmethod
    def _record(*, training_id: str, round_number: int, name: str, value: float) -> None:
        from monitoring.services import metrics_record

        metrics_record(
            training=_training(training_id),
            round_number=round_number,
            values={name: value},
            round_completed=False,
        )

    def get_training_progress(
        self, training_id: str, metric: MetricType | str | None = None
    ) -> dict[str, Any]:
        """Rounds, every metric's series and ``convergence`` (improving, plateau, diverging, converged)."""
        from monitoring.selectors import training_progress

        name = metric.value if isinstance(metric, MetricType) else metric
        return _call_sync(lambda: training_progress(training=_training(training_id), metric=name))

    def get_system_health(self) -> dict[str, Any]:
        """The ``/api/system/health`` document, measured now (``health_status`` as in the seed)."""
        from monitoring.health import health_read
        from monitoring.selectors import system_health

        return _call_sync(lambda: system_health(reading=health_read(role="web")))

    def get_alerts(
        self, training_id: str | None = None, severity: str | None = None, *, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Alerts, newest first, as in ``GET /api/alerts`` (optionally of one training and one severity)."""
        from monitoring.api.views import AlertSerializer
        from monitoring.models import Alert
        from monitoring.selectors import alerts_query

        if severity is not None and severity not in Alert.Severity.values:
            raise ValidationFailed(f"severity must be one of {Alert.Severity.values}. Found {severity!r}.")

        def read() -> list[dict[str, Any]]:
            if training_id is not None:
                _training(training_id)
            alerts = alerts_query(training_id=training_id, severity=severity)[:limit]
            return [dict(row) for row in AlertSerializer(alerts, many=True).data]

        return _call_sync(read)
