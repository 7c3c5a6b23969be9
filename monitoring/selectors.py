"""Read side of monitoring: system health, alert queries, and an agent's tasks, updates and reliability."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import psutil
from django.conf import settings
from django.db.models import QuerySet
from django.db.models.functions import Coalesce
from django.utils import timezone

from monitoring.health import HealthReading
from monitoring.models import Alert, SystemHealthSample, UpdateStatistics


def health_sample_to_dict(sample: SystemHealthSample) -> dict[str, Any]:
    return {
        "id": sample.pk,
        "created_at": sample.created_at.isoformat(),
        "role": sample.role,
        "process": sample.process,
        "health_status": sample.health_status,
        "cpu_percent": sample.cpu_percent,
        "cpu_per_core": sample.cpu_per_core,
        "cpu_interval_seconds": sample.cpu_interval_seconds,
        "memory_percent": sample.memory_percent,
        "memory_available_bytes": sample.memory_available_bytes,
        "disk_free_bytes": sample.disk_free_bytes,
        "disk_total_bytes": sample.disk_total_bytes,
        "disk_free_percent": sample.disk_free_percent,
        "network_bytes_sent": sample.network_bytes_sent,
        "network_bytes_received": sample.network_bytes_received,
        "process_rss_bytes": sample.process_rss_bytes,
        "database_latency_ms": sample.database_latency_ms,
        "redis_latency_ms": sample.redis_latency_ms,
        "workers_alive": sample.workers_alive,
        "queue_depths": sample.queue_depths,
        "open_long_polls": sample.open_long_polls,
    }


def processes_latest() -> list[SystemHealthSample]:
    """The newest sample of each process seen within three sampling periods (its RSS, its long-polls)."""
    since = timezone.now() - timedelta(seconds=3 * settings.FEDSITE_HEALTH_SAMPLE_SECONDS)
    latest: dict[str, SystemHealthSample] = {}
    for sample in SystemHealthSample.objects.filter(created_at__gte=since).order_by("-created_at", "-pk"):
        latest.setdefault(sample.process, sample)
    return sorted(latest.values(), key=lambda sample: (sample.role, sample.process))


def system_health(*, reading: HealthReading) -> dict[str, Any]:
    """The ``/api/system/health`` document from a fresh reading (``health_status`` as in the seed)."""
    processes = processes_latest()
    return {
        "health_status": reading.health_status,
        "components": reading.components,
        "resources": {
            "cpu_percent": reading.cpu_percent,
            "cpu_per_core": reading.cpu_per_core,
            "cpu_interval_seconds": reading.cpu_interval_seconds,
            "cpu_count": psutil.cpu_count(),
            "cpu_cores_configured": settings.FEDSITE_CPU_CORES,
            "memory_percent": reading.memory_percent,
            "memory_available_bytes": reading.memory_available_bytes,
            "disk_free_bytes": reading.disk_free_bytes,
            "disk_total_bytes": reading.disk_total_bytes,
            "disk_free_percent": reading.disk_free_percent,
            "network_bytes_sent": reading.network_bytes_sent,
            "network_bytes_received": reading.network_bytes_received,
            "load_average": list(psutil.getloadavg()),
        },
        "database_latency_ms": reading.database_latency_ms,
        "redis_latency_ms": reading.redis_latency_ms,
        "workers_alive": reading.workers_alive,
        "queue_depths": reading.queue_depths,
        "open_long_polls": sum(sample.open_long_polls or 0 for sample in processes if sample.role == "web"),
        "processes": [
            {
                "role": sample.role,
                "process": sample.process,
                "rss_bytes": sample.process_rss_bytes,
                "open_long_polls": sample.open_long_polls,
                "sampled_at": sample.created_at.isoformat(),
            }
            for sample in processes
        ],
        "open_alerts": Alert.objects.filter(resolved_at__isnull=True, acknowledged_at__isnull=True).count(),
        "embedded": settings.EMBEDDED,
    }


def health_history(*, since: datetime | None, limit: int) -> list[SystemHealthSample]:
    """Samples from ``since`` on, oldest first, at most ``limit`` (the newest ones when more)."""
    queryset = SystemHealthSample.objects.all()
    if since is not None:
        queryset = queryset.filter(created_at__gte=since)
    return list(reversed(queryset.order_by("-created_at", "-pk")[:limit]))


def alerts_query(
    *,
    training_id: str | None = None,
    severity: str | None = None,
    unacknowledged: bool = False,
    open_only: bool = False,
) -> QuerySet[Alert]:
    queryset = Alert.objects.all()
    if training_id:
        queryset = queryset.filter(training_id=training_id)
    if severity:
        queryset = queryset.filter(severity=severity)
    if unacknowledged:
        queryset = queryset.filter(acknowledged_at__isnull=True)
    if open_only:
        queryset = queryset.filter(resolved_at__isnull=True)
    return queryset


PROGRESS_METRICS = ("accuracy", "federated_accuracy", "loss", "federated_loss")


def training_progress(*, training: Any, metric: str | None = None) -> dict[str, Any]:
    """Rounds done, every metric's series, and the convergence status of ``metric``.

    ``metric`` defaults to the first of accuracy, federated_accuracy, loss, federated_loss that the
    training has recorded. The status is :func:`monitoring.analytics.convergence_status` over the last
    ``FEDSITE_CONVERGENCE_WINDOW`` rounds.
    """
    from monitoring.models import Metric

    series: dict[str, list[dict[str, Any]]] = {}
    for name, round_number, value in (
        Metric.objects.filter(training=training)
        .order_by("name", "round_number")
        .values_list("name", "round_number", "value")
    ):
        series.setdefault(name, []).append({"round": round_number, "value": value})
    convergence = convergence_summary(series, metric)
    max_rounds = (training.config or {}).get("max_rounds")
    return {
        "training_id": str(training.pk),
        "name": training.name,
        "status": training.status,
        "current_round": training.current_round,
        "max_rounds": max_rounds,
        "progress": min(1.0, training.current_round / max_rounds) if max_rounds else None,
        "metrics": series,
        "convergence": convergence,
    }


def convergence_summary(series: dict[str, list[dict[str, Any]]], metric: str | None = None) -> dict[str, Any]:
    """The convergence status of ``metric`` (default: the first of :data:`PROGRESS_METRICS` in ``series``),
    :func:`monitoring.analytics.convergence_status` over the last ``FEDSITE_CONVERGENCE_WINDOW`` rounds."""
    from monitoring import analytics

    chosen = metric or next((name for name in PROGRESS_METRICS if name in series), None)
    values = [point["value"] for point in series.get(chosen or "", [])]
    window = settings.FEDSITE_CONVERGENCE_WINDOW
    if chosen is None or not values:
        status = analytics.INSUFFICIENT
        best = latest = None
    else:
        status = analytics.convergence_status(
            values, metric_name=chosen, window=window, tolerance=settings.FEDSITE_CONVERGENCE_TOLERANCE
        )
        latest = values[-1]
        best = max(values) if analytics.higher_is_better(chosen) else min(values)
    return {
        "metric": chosen,
        "status": status,
        "window": window,
        "tolerance": settings.FEDSITE_CONVERGENCE_TOLERANCE,
        "latest": latest,
        "best": best,
    }


def training_convergence(*, training: Any) -> dict[str, Any]:
    """:func:`convergence_summary` of a training from the stored metrics (only the progress metrics)."""
    from monitoring.models import Metric

    series: dict[str, list[dict[str, Any]]] = {}
    for name, round_number, value in (
        Metric.objects.filter(training=training, name__in=PROGRESS_METRICS)
        .order_by("name", "round_number")
        .values_list("name", "round_number", "value")
    ):
        series.setdefault(name, []).append({"round": round_number, "value": value})
    return convergence_summary(series)


FINISHED_TASKS = ("completed", "failed", "expired")


def agent_tasks_recent(*, agent: Any, limit: int) -> list[Any]:
    """The agent's newest tasks (any status), with their round and training."""
    from trainings.models import Task  # (trainings imports this app)

    return list(
        Task.objects.filter(agent=agent).select_related("round__training").order_by("-created_at")[:limit]
    )


def agent_updates_recent(*, agent: Any, limit: int) -> list[tuple[Any, UpdateStatistics | None]]:
    """The agent's newest uploaded updates, each with its statistics (None until the aggregation has
    analysed it)."""
    from trainings.models import ClientUpdate

    updates = (
        ClientUpdate.objects.filter(agent=agent)
        .select_related("round__training", "statistics")
        .order_by("-created_at")[:limit]
    )
    # a reverse one-to-one with no row raises (an AttributeError) on access; getattr's default catches it
    return [(update, getattr(update, "statistics", None)) for update in updates]


def agent_reliability_series(*, agent: Any, limit: int) -> list[dict[str, Any]]:
    """Reliability after each finished task, in the order they finished: ``(completed + 1) / (finished
    + 2)``, the Beta(1, 1) estimate of ``Agent.reliability``, over the agent's task rows. The first
    ``limit`` points are dropped when there are more (the counts still include them)."""
    from trainings.models import Task

    outcomes = (
        Task.objects.filter(agent=agent, status__in=FINISHED_TASKS)
        .annotate(finished_at=Coalesce("completed_at", "deadline"))
        .order_by("finished_at", "created_at")
        .values_list("status", "finished_at")
    )
    points = []
    completed = 0
    for index, (status, finished_at) in enumerate(outcomes, start=1):
        completed += status == Task.Status.COMPLETED
        points.append(
            {
                "task": index,
                "reliability": (completed + 1) / (index + 2),
                "status": status,
                "finished_at": finished_at.isoformat() if finished_at else None,
            }
        )
    return points[-limit:]


def health_card(*, reading: HealthReading) -> dict[str, Any]:
    """The home page's health card: components from ``reading`` (a quick one taken by the page, without
    the worker ping), and the CPU figure and Celery workers of the newest worker sample when the beat task
    took one within three sampling periods (measured over the full CPU interval, not during a page render,
    and with the workers it pinged); otherwise the quick reading's CPU and no worker count."""
    since = timezone.now() - timedelta(seconds=3 * settings.FEDSITE_HEALTH_SAMPLE_SECONDS)
    sample = (
        SystemHealthSample.objects.filter(role=SystemHealthSample.Role.WORKER, created_at__gte=since)
        .order_by("-created_at", "-pk")
        .first()
    )
    document = system_health(reading=reading)
    cpu = {
        "percent": reading.cpu_percent,
        "interval_seconds": reading.cpu_interval_seconds,
        "cores": document["resources"]["cpu_count"],
        "source": "this page",
        "sampled_at": None,
    }
    if sample is not None:
        cpu.update(
            percent=sample.cpu_percent,
            interval_seconds=sample.cpu_interval_seconds,
            source="worker sample",
            sampled_at=sample.created_at,
        )
    return {
        **document,
        "cpu": cpu,
        "workers": {
            "embedded": settings.EMBEDDED,
            "alive": sample.workers_alive if sample is not None else None,
            "sampled_at": sample.created_at if sample is not None else None,
            "window_seconds": 3 * settings.FEDSITE_HEALTH_SAMPLE_SECONDS,
        },
    }
