"""Celery tasks of monitoring: thin wrappers around one service each. Names are a deployed API."""

from __future__ import annotations

from celery import shared_task

from monitoring import services


@shared_task(name="monitoring.sample_system_health", acks_late=True, ignore_result=True)
def sample_system_health() -> int:
    """Beat: sample the machine and this worker (its own RSS), prune, evaluate resource alerts."""
    return services.health_sample_take(role="worker").pk
