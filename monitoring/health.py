"""Take one system-health sample: the machine, this process, the database, Redis, Celery and its queues.

Invariants: every figure is measured, not remembered. CPU is measured over a real interval (psutil's
``interval=None`` on a fresh process compares against the import time and reads 0 % under load); disk is
the free space of the file system that holds the blob store (``MEDIA_ROOT``); queue depths are ``LLEN`` of
the broker's Redis lists, one per Celery queue. Nothing here raises: a component that cannot be reached
is reported ``down`` with its error and a ``None`` figure.

``open_long_polls`` is a process-wide gauge: the agent long-poll view enters it for the whole wait, so
the web process that serves polls knows how many are open; a worker has none and reports ``None``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from django.conf import settings
from django.db import connection


class LongPollGauge:
    """Count of long-polls open in this process (thread-safe; polls run on the event loop and threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0

    @property
    def value(self) -> int:
        return self._open

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        with self._lock:
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1


#: The one gauge of this process, entered by ``trainings.api.agent_views.next_task_view``.
open_long_polls = LongPollGauge()


@dataclass(frozen=True)
class HealthReading:
    """One sample, as plain data (stored by ``monitoring.services.health_sample_record``)."""

    role: str
    process: str
    health_status: str
    cpu_percent: float
    cpu_per_core: list[float]
    cpu_interval_seconds: float
    memory_percent: float
    memory_available_bytes: int
    disk_free_bytes: int
    disk_total_bytes: int
    disk_free_percent: float
    network_bytes_sent: int
    network_bytes_received: int
    process_rss_bytes: int
    database_latency_ms: float | None
    redis_latency_ms: float | None
    workers_alive: int | None
    queue_depths: dict[str, int]
    open_long_polls: int | None
    components: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The stored fields (``components`` is only part of the live answer)."""
        data = asdict(self)
        data.pop("components")
        return data


def cpu_measure(interval: float) -> tuple[float, list[float]]:
    """System CPU percent (total and per core) over ``interval`` seconds, measured, not since import."""
    if interval <= 0:
        raise ValueError(f"The CPU sampling interval must be positive. Found {interval}.")
    psutil.cpu_percent(interval=None)
    psutil.cpu_percent(interval=None, percpu=True)
    time.sleep(interval)
    total = psutil.cpu_percent(interval=None)
    per_core = psutil.cpu_percent(interval=None, percpu=True)
    return float(total), [float(value) for value in per_core]


def blob_store_path() -> Path:
    """``MEDIA_ROOT``, or its nearest existing parent when the store has not been created yet."""
    path = Path(settings.MEDIA_ROOT).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_database() -> dict[str, Any]:
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


def _redis_client() -> Any:
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


def check_redis() -> dict[str, Any]:
    if settings.EMBEDDED:
        return {"status": "embedded", "detail": "no REDIS_URL: in-memory channel layer and eager Celery"}
    started = time.perf_counter()
    try:
        _redis_client().ping()
        return {"status": "ok", "latency_ms": (time.perf_counter() - started) * 1000}
    except Exception as exc:
        return {"status": "down", "error": str(exc)[:200]}


def check_workers() -> dict[str, Any]:
    if settings.EMBEDDED:
        return {"status": "embedded", "workers": 0}
    from fedsite.celery import app

    try:
        replies = app.control.ping(timeout=settings.FEDSITE_HEALTH_WORKER_PING_SECONDS) or []
    except Exception as exc:
        return {"status": "down", "error": str(exc)[:200], "workers": 0}
    names = sorted(name for reply in replies for name in reply)
    return {"status": "ok" if replies else "down", "workers": len(replies), "names": names}


def queue_depths() -> dict[str, int]:
    """Messages waiting per Celery queue: ``LLEN`` of the broker's list named like the queue."""
    if settings.EMBEDDED or not str(settings.CELERY_BROKER_URL).startswith(("redis://", "rediss://")):
        return {}
    import redis

    try:
        client = redis.Redis.from_url(settings.CELERY_BROKER_URL, socket_timeout=2, socket_connect_timeout=2)
        pipeline = client.pipeline(transaction=False)
        for queue in settings.FEDSITE_HEALTH_QUEUES:
            pipeline.llen(queue)
        return {
            queue: int(depth)
            for queue, depth in zip(settings.FEDSITE_HEALTH_QUEUES, pipeline.execute(), strict=True)
        }
    except Exception:  # Redis away: reported by check_redis; depths are unknown, not zero
        return {}


def overall_status(components: dict[str, dict[str, Any]]) -> str:
    """``healthy``, ``degraded`` (a component down) or ``unhealthy`` (the database down)."""
    if components["database"]["status"] != "ok":
        return "unhealthy"
    if any(component["status"] == "down" for component in components.values()):
        return "degraded"
    return "healthy"


def health_read(
    *, role: str, cpu_interval: float | None = None, include_workers: bool = True
) -> HealthReading:
    """Measure everything once (blocks ``cpu_interval`` seconds for the CPU figure)."""
    interval = settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS if cpu_interval is None else cpu_interval
    components: dict[str, dict[str, Any]] = {"database": check_database(), "redis": check_redis()}
    if include_workers:
        components["celery"] = check_workers()
    total, per_core = cpu_measure(interval)
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(blob_store_path()))
    network = psutil.net_io_counters()
    return HealthReading(
        role=role,
        process=f"{socket.gethostname()}:{os.getpid()}"[:200],
        health_status=overall_status(components),
        cpu_percent=total,
        cpu_per_core=per_core,
        cpu_interval_seconds=interval,
        memory_percent=float(memory.percent),
        memory_available_bytes=int(memory.available),
        disk_free_bytes=int(disk.free),
        disk_total_bytes=int(disk.total),
        disk_free_percent=100.0 * disk.free / disk.total if disk.total else 0.0,
        network_bytes_sent=int(network.bytes_sent) if network else 0,
        network_bytes_received=int(network.bytes_recv) if network else 0,
        process_rss_bytes=int(psutil.Process().memory_info().rss),
        database_latency_ms=components["database"].get("latency_ms"),
        redis_latency_ms=components["redis"].get("latency_ms"),
        workers_alive=components["celery"]["workers"] if include_workers else None,
        queue_depths=queue_depths(),
        open_long_polls=open_long_polls.value if role == "web" else None,
        components=components,
    )
