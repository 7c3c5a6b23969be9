"""The seed's monitoring API (``FederatedMonitor``) against the real database, and the convergence rules."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest

from fedsite.errors import NotFound, ValidationFailed
from monitoring import analytics
from monitoring.models import Alert, Metric
from monitoring.monitor import FederatedMonitor, MetricType, TrainingMetric
from monitoring.services import alert_raise
from trainings.models import Training


@pytest.mark.django_db(transaction=True)
def test_the_seed_example_runs(make_training: Any, settings: Any) -> None:
    """The README's "Monitoring Training Progress" example, with a real training id."""
    settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS = 0.1
    training_id = str(make_training().pk)

    async def example() -> dict[str, Any]:
        # Initialize monitor
        monitor = FederatedMonitor()
        await monitor.initialize()

        # Record metrics
        metric = TrainingMetric(
            training_id=training_id,
            round_number=1,
            metric_type=MetricType.ACCURACY,
            value=0.87,
            timestamp=datetime.utcnow(),
        )

        await monitor.record_training_metric(metric)

        # Get system health
        health = monitor.get_system_health()
        print(f"System health: {health['health_status']}")
        return health

    health = asyncio.run(example())
    assert health["health_status"] in ("healthy", "degraded")
    assert Metric.objects.get(training_id=training_id, round_number=1, name="accuracy").value == 0.87


@pytest.mark.django_db(transaction=True)
def test_progress_reports_the_convergence_status(make_training: Any, settings: Any) -> None:
    settings.FEDSITE_CONVERGENCE_WINDOW = 4
    training_id = str(make_training(max_rounds=10).pk)
    monitor = FederatedMonitor()

    async def record(values: list[float], start: int, metric: MetricType = MetricType.ACCURACY) -> None:
        for offset, value in enumerate(values):
            await monitor.record_training_metric(TrainingMetric(training_id, start + offset, metric, value))

    asyncio.run(record([0.2, 0.4, 0.6], 1))
    progress = monitor.get_training_progress(training_id)
    assert progress["convergence"]["metric"] == "accuracy"
    assert progress["convergence"]["status"] == "improving"
    assert progress["convergence"]["best"] == progress["convergence"]["latest"] == 0.6
    assert [p["value"] for p in progress["metrics"]["accuracy"]] == [0.2, 0.4, 0.6]
    assert progress["max_rounds"] == 10
    asyncio.run(record([0.5, 0.3, 0.1], 4))
    assert monitor.get_training_progress(training_id)["convergence"]["status"] == "diverging"
    asyncio.run(record([2.0, 2.0, 2.0, 2.0], 1, MetricType.LOSS))
    loss = monitor.get_training_progress(training_id, metric=MetricType.LOSS)["convergence"]
    assert loss["status"] == "converged" and loss["metric"] == "loss"


@pytest.mark.django_db(transaction=True)
def test_get_alerts_by_training_and_severity(make_training: Any) -> None:
    training, other = make_training(), make_training(name="other")
    alert_raise(kind=Alert.Kind.SYSTEM, training=training, message="w", severity="warning")
    alert_raise(
        kind=Alert.Kind.ROUND_FAILED, training=training, round_number=1, message="c", severity="critical"
    )
    alert_raise(kind=Alert.Kind.SYSTEM, training=other, message="o", severity="critical")
    monitor = FederatedMonitor()
    mine = {a["message"] for a in monitor.get_alerts(str(training.pk))}
    assert {"w", "c"} <= mine and "o" not in mine  # (and the too_few_agents of its round 1: no agents)
    assert [a["message"] for a in monitor.get_alerts(str(training.pk), severity="critical")] == ["c"]
    with pytest.raises(ValidationFailed, match="severity"):
        monitor.get_alerts(str(training.pk), severity="apocalyptic")
    with pytest.raises(NotFound):
        monitor.get_alerts("not-a-training")


@pytest.mark.django_db(transaction=True)
def test_bad_metrics_are_refused_naming_the_field(make_training: Any) -> None:
    training_id = str(make_training().pk)
    monitor = FederatedMonitor()
    with pytest.raises(ValidationFailed, match="value must be a finite number"):
        asyncio.run(
            monitor.record_training_metric(TrainingMetric(training_id, 1, MetricType.LOSS, float("nan")))
        )
    with pytest.raises(ValidationFailed, match="round_number"):
        asyncio.run(monitor.record_training_metric(TrainingMetric(training_id, -1, MetricType.LOSS, 1.0)))
    with pytest.raises(NotFound):
        asyncio.run(monitor.record_training_metric(TrainingMetric("nope", 1, MetricType.LOSS, 1.0)))
    assert not Metric.objects.exists()
    assert Training.objects.count() == 1


@pytest.mark.parametrize(
    ("values", "name", "status"),
    [
        ([0.1, 0.2, 0.3, 0.4, 0.5], "accuracy", "improving"),
        ([0.5, 0.4, 0.3, 0.2, 0.1], "accuracy", "diverging"),
        ([0.5, 0.4, 0.3, 0.2, 0.1], "loss", "improving"),
        ([0.8, 0.8, 0.8, 0.8, 0.8], "accuracy", "converged"),
        ([0.8, 0.7, 0.8, 0.7, 0.8, 0.7, 0.8], "accuracy", "plateau"),
        ([0.3, 0.4, float("inf")], "loss", "diverging"),
        ([0.3, 0.4], "accuracy", "insufficient_data"),
    ],
)
def test_convergence_status(values: list[float], name: str, status: str) -> None:
    assert analytics.convergence_status(values, metric_name=name, window=5, tolerance=0.01) == status


def test_degradation_and_stall_rules() -> None:
    assert analytics.degradation([0.8, 0.6], metric_name="accuracy", window=5) == pytest.approx((0.25, 0.8))
    assert analytics.degradation([0.5, 1.0], metric_name="loss", window=5) == pytest.approx((1.0, 0.5))
    assert analytics.degradation([0.8], metric_name="accuracy", window=5) is None
    assert analytics.stalled([0.5, 0.6, 0.6], metric_name="accuracy", rounds=2, min_delta=0.01) is False
    assert analytics.stalled([0.5, 0.6, 0.6, 0.6], metric_name="accuracy", rounds=2, min_delta=0.01) is True
    assert analytics.stalled([0.6, 0.6], metric_name="accuracy", rounds=2, min_delta=0.01) is None
