"""System health: the beat task exists, every sampled figure is measured and sane, the series is bounded."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import psutil
import pytest
import redis
from django.conf import settings
from django.db import connection
from django.utils import timezone

from monitoring.health import blob_store_path, cpu_measure, open_long_polls
from monitoring.models import SystemHealthSample
from monitoring.services import health_samples_prune
from monitoring.tasks import sample_system_health

pytestmark = pytest.mark.django_db

from django.conf import settings as django_settings  # noqa: E402

EMBEDDED = django_settings.EMBEDDED


def test_every_beat_entry_names_a_registered_celery_task() -> None:
    from fedsite.celery import app

    app.loader.import_default_modules()  # the workers' autodiscovery
    missing = {
        name: entry["task"]
        for name, entry in settings.CELERY_BEAT_SCHEDULE.items()
        if entry["task"] not in app.tasks
    }
    assert settings.CELERY_BEAT_SCHEDULE and not missing


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(1000))


def test_cpu_is_measured_over_a_real_interval_and_sees_a_busy_thread() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=_spin, args=(stop,), daemon=True)
    thread.start()
    try:
        total, per_core = cpu_measure(0.5)
    finally:
        stop.set()
        thread.join()
    assert len(per_core) == psutil.cpu_count()
    # one core kept busy by the spinning thread: the machine is at least 1/cores busy, never 0
    assert total >= 100 / psutil.cpu_count() * 0.5
    assert max(per_core) >= 50
    with pytest.raises(ValueError, match="must be positive"):
        cpu_measure(0)


@pytest.mark.skipif(
    EMBEDDED, reason="the embedded mode has no broker queues and no worker processes (eager Celery)"
)
def test_sample_task_stores_measured_figures(settings: Any) -> None:
    queue = f"monitoring-test-{uuid.uuid4().hex}"
    settings.FEDSITE_HEALTH_QUEUES = ["default", queue]
    settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS = 0.2
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.rpush(queue, "a", "b", "c")
    try:
        sample = SystemHealthSample.objects.get(pk=sample_system_health())
    finally:
        broker.delete(queue)
    disk = psutil.disk_usage(str(blob_store_path()))
    assert sample.role == "worker" and sample.process.endswith(f":{psutil.Process().pid}")
    assert sample.cpu_interval_seconds == 0.2
    assert 0 <= sample.cpu_percent <= 100 and len(sample.cpu_per_core) == psutil.cpu_count()
    assert sample.disk_total_bytes == disk.total
    assert abs(sample.disk_free_bytes - disk.free) < 256 * 1024 * 1024  # other sessions write meanwhile
    assert 0 < sample.memory_percent <= 100 and sample.memory_available_bytes > 0
    assert sample.network_bytes_sent > 0 and sample.network_bytes_received > 0
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < sample.process_rss_bytes < 2 * rss
    assert sample.database_latency_ms is not None and sample.database_latency_ms > 0
    assert sample.redis_latency_ms is not None and sample.redis_latency_ms > 0
    assert set(sample.queue_depths) == {"default", queue} and sample.queue_depths[queue] == 3
    assert sample.open_long_polls is None  # a worker serves no polls
    assert sample.health_status in ("healthy", "degraded")


def test_disk_free_is_that_of_the_blob_store(settings: Any, tmp_path: Any) -> None:
    import shutil

    settings.MEDIA_ROOT = str(tmp_path / "not" / "created" / "yet")
    settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS = 0.1
    sample = SystemHealthSample.objects.get(pk=sample_system_health())
    usage = shutil.disk_usage(tmp_path)
    assert sample.disk_total_bytes == usage.total
    assert abs(sample.disk_free_bytes - usage.free) < 256 * 1024 * 1024


def _sample(age: timedelta, **overrides: Any) -> SystemHealthSample:
    fields: dict[str, Any] = {
        "role": "worker",
        "process": "test:1",
        "health_status": "healthy",
        "cpu_percent": 10.0,
        "cpu_per_core": [10.0],
        "cpu_interval_seconds": 1.0,
        "memory_percent": 10.0,
        "memory_available_bytes": 1,
        "disk_free_bytes": 50,
        "disk_total_bytes": 100,
        "disk_free_percent": 50.0,
        "network_bytes_sent": 1,
        "network_bytes_received": 1,
        "process_rss_bytes": 1,
        **overrides,
    }
    sample = SystemHealthSample.objects.create(**fields)
    SystemHealthSample.objects.filter(pk=sample.pk).update(created_at=timezone.now() - age)
    sample.refresh_from_db()
    return sample


def test_retention_drops_old_samples_and_keeps_at_most_the_maximum(settings: Any) -> None:
    settings.FEDSITE_HEALTH_RETENTION_HOURS = 1
    settings.FEDSITE_HEALTH_MAX_SAMPLES = 3
    old = _sample(timedelta(hours=2))
    recent = [_sample(timedelta(minutes=minutes)) for minutes in (50, 40, 30, 20, 10)]
    deleted = health_samples_prune()
    kept = set(SystemHealthSample.objects.values_list("pk", flat=True))
    assert deleted == 3
    assert old.pk not in kept
    assert kept == {sample.pk for sample in recent[-3:]}  # the newest three


def test_sample_task_prunes(settings: Any) -> None:
    settings.FEDSITE_HEALTH_RETENTION_HOURS = 1
    settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS = 0.1
    old = _sample(timedelta(hours=3))
    sample_system_health()
    assert not SystemHealthSample.objects.filter(pk=old.pk).exists()


@pytest.mark.skipif(
    EMBEDDED, reason="the embedded mode has no broker queues and no worker processes (eager Celery)"
)
def test_system_health_now_records_the_web_process(staff_client: Any, settings: Any) -> None:
    settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS = 0.1
    body = staff_client.get("/api/system/health").json()
    assert body["health_status"] in ("healthy", "degraded")
    assert body["components"]["database"]["status"] == "ok"
    assert body["resources"]["cpu_interval_seconds"] == 0.1
    assert set(body["queue_depths"]) == set(settings.FEDSITE_HEALTH_QUEUES)
    web = SystemHealthSample.objects.get(role="web")
    assert [p["process"] for p in body["processes"]] == [web.process]
    assert body["processes"][0]["rss_bytes"] == web.process_rss_bytes > 0
    assert web.open_long_polls == 0 == body["open_long_polls"]


def test_system_health_needs_staff(client: Any) -> None:
    assert client.get("/api/system/health").status_code in (401, 403)
    assert client.get("/api/system/health/history").status_code in (401, 403)


def test_history_since(staff_client: Any) -> None:
    old, new = _sample(timedelta(hours=2)), _sample(timedelta(minutes=5))
    since = (timezone.now() - timedelta(hours=1)).isoformat()
    body = staff_client.get("/api/system/health/history", {"since": since}).json()
    assert [s["id"] for s in body["samples"]] == [new.pk]
    everything = staff_client.get("/api/system/health/history").json()["samples"]
    assert [s["id"] for s in everything] == [old.pk, new.pk]  # oldest first
    assert set(everything[0]) >= {"cpu_percent", "cpu_per_core", "disk_free_bytes", "queue_depths"}


@pytest.mark.parametrize(
    ("query", "field"),
    [({"since": "yesterday"}, "since"), ({"limit": "0"}, "limit"), ({"limit": "x"}, "limit")],
)
def test_history_rejects_bad_parameters(staff_client: Any, query: dict[str, str], field: str) -> None:
    response = staff_client.get("/api/system/health/history", query)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error" and field in error["message"]


@pytest.mark.django_db(transaction=True)
def test_open_long_polls_are_counted_while_they_wait(client: Any, make_agent: Any, settings: Any) -> None:
    settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS = 0.1
    _, token = make_agent()
    results: list[int] = []

    def poll() -> None:
        try:
            response = client.get("/api/v1/agent/tasks/next?wait=3", HTTP_AUTHORIZATION=f"Bearer {token}")
            results.append(response.status_code)
        finally:
            connection.close()

    thread = threading.Thread(target=poll)
    thread.start()
    for _ in range(200):
        if open_long_polls.value == 1:
            break
        time.sleep(0.01)
    seen = open_long_polls.value
    from monitoring.health import health_read

    reading = health_read(role="web", include_workers=False)
    thread.join()
    assert seen == 1 and reading.open_long_polls == 1
    assert results == [204]
    assert open_long_polls.value == 0


def test_prometheus_exports_the_newest_sample(staff_client: Any) -> None:
    _sample(timedelta(minutes=1), cpu_percent=12.5, queue_depths={"aggregation": 4}, process="w:9")
    text = staff_client.get("/metrics").content.decode()
    assert 'fedsite_system_cpu_percent{core="total"} 12.5' in text
    assert 'fedsite_queue_depth{queue="aggregation"} 4.0' in text
    assert 'fedsite_process_rss_bytes{process="w:9",role="worker"} 1.0' in text
    assert "fedsite_open_long_polls 0.0" in text


@pytest.mark.skipif(
    EMBEDDED, reason="the embedded mode has no broker queues and no worker processes (eager Celery)"
)
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_runs_the_beat_task_and_reports_its_own_process(settings: Any) -> None:
    """A ``celery worker`` process (solo pool: the task runs in the process we started) stores its RSS."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from django.db import close_old_connections

    queue = f"monitoring-test-{uuid.uuid4().hex}"
    db = connection.settings_dict
    host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER'] or 'postgres'}@{host}/{db['NAME']}",
        "FEDSITE_MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "FEDSITE_HEALTH_CPU_INTERVAL_SECONDS": "0.2",
        "FEDSITE_HEALTH_WORKER_PING_SECONDS": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    celery = Path(sys.executable).parent / "celery"
    args = [str(celery), "-A", "fedsite", "worker", "-Q", queue, "--pool", "solo", "-l", "warning"]
    args += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{queue}@%h"]
    worker = subprocess.Popen(
        args,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        sample_system_health.apply_async(queue=queue)
        sample = None
        for _ in range(600):
            close_old_connections()
            sample = SystemHealthSample.objects.filter(role="worker").first()
            if sample is not None or worker.poll() is not None:
                break
            time.sleep(0.1)
        assert sample is not None, "the worker stored no sample"
        assert sample.process.endswith(f":{worker.pid}")  # its own process, not this test's
        rss = psutil.Process(worker.pid).memory_info().rss
        assert 0.5 * rss < sample.process_rss_bytes < 2 * rss
        assert sample.cpu_interval_seconds == 0.2
    finally:
        worker.terminate()
        try:
            output = worker.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            worker.kill()
            output = worker.communicate()[0]
        redis.Redis.from_url(settings.CELERY_BROKER_URL).delete(queue)
    assert b"Traceback" not in output, output.decode()[-2000:]
