"""Read side of monitoring: system health and alert queries."""

from __future__ import annotations

import time
from typing import Any

import psutil
from django.conf import settings
from django.db import connection
from django.db.models import QuerySet

from monitoring.models import Alert


def _check_database() -> dict[str, Any]:
    started = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {
            "status": "ok",
            "vendor": connection.vendor,
            "latency_ms": (time.perf_counter() - started) * 1000,
        }
    except Exception as exc:
        return {"status": "down", "vendor": connection.vendor, "error": str(exc)[:200]}


def _check_redis() -> dict[str, Any]:
    if settings.EMBEDDED:
        return {"status": "embedded", "detail": "no REDIS_URL: in-memory channel layer and eager Celery"}
    import redis

    started = time.perf_counter()
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        client.ping()
        return {"status": "ok", "latency_ms": (time.perf_counter() - started) * 1000}
    except Exception as exc:
        return {"status": "down", "error": str(exc)[:200]}


def _check_workers() -> dict[str, Any]:
    if settings.EMBEDDED:
        return {"status": "embedded", "workers": 0}
    from fedsite.celery import app

    try:
        replies = app.control.ping(timeout=1.0) or []
    except Exception as exc:
        return {"status": "down", "error": str(exc)[:200], "workers": 0}
    return {"status": "ok" if replies else "down", "workers": len(replies)}


def system_health(*, include_workers: bool = True) -> dict[str, Any]:
    """Components and resources; ``health_status`` is ``healthy``, ``degraded`` or ``unhealthy``."""
    components = {"database": _check_database(), "redis": _check_redis()}
    if include_workers:
        components["celery"] = _check_workers()
    memory = psutil.virtual_memory()
    resources = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "cpu_cores_configured": settings.FEDSITE_CPU_CORES,
        "memory_percent": memory.percent,
        "memory_available_bytes": memory.available,
        "load_average": list(psutil.getloadavg()),
    }
    states = [c["status"] for c in components.values()]
    if components["database"]["status"] != "ok":
        overall = "unhealthy"
    elif any(s == "down" for s in states):
        overall = "degraded"
    else:
        overall = "healthy"
    return {
        "health_status": overall,
        "components": components,
        "resources": resources,
        "embedded": settings.EMBEDDED,
    }


def alerts_query(
    *, training_id: str | None = None, severity: str | None = None, unacknowledged: bool = False
) -> QuerySet[Alert]:
    queryset = Alert.objects.all()
    if training_id:
        queryset = queryset.filter(training_id=training_id)
    if severity:
        queryset = queryset.filter(severity=severity)
    if unacknowledged:
        queryset = queryset.filter(acknowledged_at__isnull=True)
    return queryset
