"""Alerts: one open alert per (kind, subject), self-resolution, acknowledgement, events, new kinds."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from monitoring.events import training_group
from monitoring.models import Alert, AuditLog, SystemHealthSample
from monitoring.services import alert_raise, alert_resolve, metrics_record
from monitoring.tasks import sample_system_health
from monitoring.tests.factories import make_training

pytestmark = pytest.mark.django_db

from django.conf import settings as django_settings  # noqa: E402

EMBEDDED = django_settings.EMBEDDED


@pytest.fixture
def fast_samples(settings: Any) -> Any:
    settings.FEDSITE_HEALTH_CPU_INTERVAL_SECONDS = 0.1
    settings.FEDSITE_ALERT_SUSTAINED_SECONDS = 0
    return settings


def _raise(training: Any, round_number: int, message: str = "m", severity: str = "warning") -> Alert:
    return alert_raise(
        kind=Alert.Kind.ROUND_FAILED,
        training=training,
        round_number=round_number,
        message=message,
        severity=severity,
    )


def test_a_repeat_updates_the_open_alert_instead_of_adding_one() -> None:
    training = make_training("dedup")
    first = _raise(training, 1, "first")
    again = _raise(training, 1, "second")
    other_round = _raise(training, 2)
    assert again.pk == first.pk and other_round.pk != first.pk
    first.refresh_from_db()
    assert first.count == 2 and first.message == "second"
    assert first.last_seen_at is not None and first.last_seen_at >= first.created_at
    assert Alert.objects.filter(kind=Alert.Kind.ROUND_FAILED).count() == 2


def test_an_escalation_raises_the_severity_and_asks_for_a_new_acknowledgement() -> None:
    training = make_training("escalate")
    alert = _raise(training, 1)
    Alert.objects.filter(pk=alert.pk).update(acknowledged_at=timezone.now(), acknowledged_by="x")
    _raise(training, 1, severity="info")  # lower: keeps warning and the acknowledgement
    alert.refresh_from_db()
    assert alert.severity == "warning" and alert.acknowledged_at is not None
    _raise(training, 1, severity="critical")
    alert.refresh_from_db()
    assert alert.severity == "critical" and alert.acknowledged_at is None and alert.count == 3


def test_after_resolution_the_condition_opens_a_new_alert() -> None:
    training = make_training("reopen")
    first = _raise(training, 1)
    assert (
        alert_resolve(kind=Alert.Kind.ROUND_FAILED, training=training, round_number=1, resolution="ok now")
        == 1
    )
    first.refresh_from_db()
    assert first.resolved_at is not None and first.resolution == "ok now"
    assert _raise(training, 1).pk != first.pk


def test_a_completed_round_resolves_its_round_failed_alert() -> None:
    training = make_training("resolve on completion")
    alert = _raise(training, 1)
    metrics_record(training=training, round_number=1, values={"accuracy": 0.5})
    alert.refresh_from_db()
    assert alert.resolved_at is not None and "Round 1 completed" in alert.resolution


def test_a_round_s_metrics_are_stored_in_one_statement_and_a_retry_overwrites_them() -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from monitoring.models import Metric

    training = make_training("metrics upsert")
    values = {"accuracy": 0.5, "loss": 1.25, "skipped": float("nan"), "also_skipped": None}
    for _retry in (False, True):
        with CaptureQueriesContext(connection) as context:
            stored = metrics_record(training=training, round_number=3, values=values)
        writes = [q["sql"] for q in context.captured_queries if 'INTO "monitoring_metric"' in q["sql"]]
        assert len(writes) == 1, writes
        assert sorted(m.name for m in stored) == ["accuracy", "loss"]
        values = {"accuracy": 0.75, "loss": 1.0}
    assert dict(Metric.objects.filter(training=training).values_list("name", "value")) == {
        "accuracy": 0.75,
        "loss": 1.0,
    }


async def _receive(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout=5)


def test_alert_events_on_raise_update_resolve_and_acknowledge(
    django_capture_on_commit_callbacks: Any, staff_client: Any
) -> None:
    training = make_training("events")
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(training_group(training.pk), channel)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            alert = _raise(training, 1)
            _raise(training, 1)
        with django_capture_on_commit_callbacks(execute=True):
            assert staff_client.post(f"/api/alerts/{alert.pk}/acknowledge").status_code == 200
        with django_capture_on_commit_callbacks(execute=True):
            alert_resolve(kind=Alert.Kind.ROUND_FAILED, training=training, round_number=1)
        received = [async_to_sync(_receive)(layer, channel) for _ in range(4)]
    finally:
        async_to_sync(layer.group_discard)(training_group(training.pk), channel)
    assert [m["event"] for m in received] == ["alert"] * 4
    assert [m["payload"]["action"] for m in received] == ["raised", "updated", "acknowledged", "resolved"]
    assert [m["payload"]["alert"]["count"] for m in received] == [1, 2, 2, 2]
    assert received[2]["payload"]["alert"]["acknowledged_by"] == "operator"
    assert received[3]["payload"]["alert"]["resolved_at"] is not None


# --- acknowledgement over REST -----------------------------------------------------------------------


def test_acknowledge_over_rest_records_who_and_when_and_audits(staff_client: Any) -> None:
    alert = _raise(make_training("ack"), 1)
    response = staff_client.post(f"/api/alerts/{alert.pk}/acknowledge")
    assert response.status_code == 200
    body = response.json()
    assert body["acknowledged_by"] == "operator" and body["acknowledged_at"]
    again = staff_client.post(f"/api/alerts/{alert.pk}/acknowledge").json()
    assert again["acknowledged_at"] == body["acknowledged_at"]  # idempotent
    audits = AuditLog.objects.filter(action="alert.acknowledge", object_id=str(alert.pk))
    assert [(a.actor_type, a.actor) for a in audits] == [("user", "operator")]


def test_acknowledge_unknown_alert_is_404_with_the_error_shape(staff_client: Any) -> None:
    response = staff_client.post("/api/alerts/999999/acknowledge")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "alert_not_found"


def test_acknowledge_needs_staff(client: Any, django_user_model: Any) -> None:
    alert = _raise(make_training("ack staff"), 1)
    client.force_login(django_user_model.objects.create_user("viewer", password="x-very-long-pass"))
    assert client.post(f"/api/alerts/{alert.pk}/acknowledge").status_code == 403
    assert (
        client.post(
            "/api/alerts/acknowledge", {"ids": [alert.pk]}, content_type="application/json"
        ).status_code
        == 403
    )
    alert.refresh_from_db()
    assert alert.acknowledged_at is None


def test_bulk_acknowledge(staff_client: Any) -> None:
    training = make_training("bulk")
    one, two, three = _raise(training, 1), _raise(training, 2), _raise(training, 3)
    staff_client.post(f"/api/alerts/{three.pk}/acknowledge")
    response = staff_client.post(
        "/api/alerts/acknowledge", {"ids": [one.pk, two.pk, three.pk]}, content_type="application/json"
    )
    assert response.status_code == 200
    assert response.json() == {"acknowledged": [one.pk, two.pk], "already_acknowledged": [three.pk]}
    assert not Alert.objects.filter(acknowledged_at__isnull=True).exists()
    assert AuditLog.objects.filter(action="alert.acknowledge").count() == 3


def test_bulk_acknowledge_with_an_unknown_id_changes_nothing(staff_client: Any) -> None:
    alert = _raise(make_training("bulk missing"), 1)
    response = staff_client.post(
        "/api/alerts/acknowledge", {"ids": [alert.pk, 999999]}, content_type="application/json"
    )
    assert response.status_code == 404 and "999999" in response.json()["error"]["message"]
    alert.refresh_from_db()
    assert alert.acknowledged_at is None


@pytest.mark.parametrize("body", [{}, {"ids": []}, {"ids": "1"}, {"ids": [1, "2"]}, {"ids": [True]}, [1, 2]])
def test_bulk_acknowledge_rejects_bad_bodies(staff_client: Any, body: Any) -> None:
    response = staff_client.post("/api/alerts/acknowledge", body, content_type="application/json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error" and "ids" in error["message"]


# --- resource exhaustion -------------------------------------------------------------------------------


def test_disk_below_its_threshold_raises_repeats_and_resolves(fast_samples: Any) -> None:
    fast_samples.FEDSITE_ALERT_DISK_FREE_PERCENT = 100.0  # any real disk has less than 100 % free
    sample_system_health()
    sample_system_health()
    alert = Alert.objects.get(kind=Alert.Kind.RESOURCE_EXHAUSTED, subject="disk")
    assert alert.count == 2 and alert.severity == "critical" and alert.resolved_at is None
    assert "FEDSITE_ALERT_DISK_FREE_PERCENT" in alert.message
    fast_samples.FEDSITE_ALERT_DISK_FREE_PERCENT = 0.0
    sample_system_health()
    alert.refresh_from_db()
    assert alert.resolved_at is not None and "back at" in alert.resolution


def test_a_resource_alert_needs_the_condition_for_the_sustained_period(fast_samples: Any) -> None:
    fast_samples.FEDSITE_ALERT_DISK_FREE_PERCENT = 100.0
    fast_samples.FEDSITE_ALERT_SUSTAINED_SECONDS = 600
    sample_system_health()
    # over, not for 10 min yet (only the disk: this shared machine's CPU may really be at 100 %)
    assert not Alert.objects.filter(kind=Alert.Kind.RESOURCE_EXHAUSTED, subject="disk").exists()
    first = SystemHealthSample.objects.get()
    SystemHealthSample.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(seconds=700))
    sample_system_health()
    assert Alert.objects.filter(kind=Alert.Kind.RESOURCE_EXHAUSTED, subject="disk").exists()


def test_a_sample_under_the_threshold_breaks_the_sustained_run(fast_samples: Any) -> None:
    fast_samples.FEDSITE_ALERT_DISK_FREE_PERCENT = 100.0
    fast_samples.FEDSITE_ALERT_SUSTAINED_SECONDS = 600
    sample_system_health()
    first = SystemHealthSample.objects.get()
    SystemHealthSample.objects.filter(pk=first.pk).update(created_at=timezone.now() - timedelta(seconds=700))
    SystemHealthSample.objects.filter(pk=first.pk).update(disk_free_percent=100.0)  # that one was fine
    sample_system_health()
    assert not Alert.objects.filter(kind=Alert.Kind.RESOURCE_EXHAUSTED, subject="disk").exists()


@pytest.mark.skipif(
    EMBEDDED, reason="the embedded mode has no broker queues and no worker processes (eager Celery)"
)
def test_a_deep_queue_raises_resource_exhausted(fast_samples: Any) -> None:
    queue = f"monitoring-test-{uuid.uuid4().hex}"
    fast_samples.FEDSITE_HEALTH_QUEUES = [queue]
    fast_samples.FEDSITE_ALERT_QUEUE_DEPTH = 3
    broker = redis.Redis.from_url(fast_samples.CELERY_BROKER_URL)
    broker.rpush(queue, "a", "b", "c")
    try:
        sample_system_health()
        alert = Alert.objects.get(kind=Alert.Kind.RESOURCE_EXHAUSTED, subject=f"queue:{queue}")
        assert alert.details["value"] == 3
        broker.lpop(queue)
        sample_system_health()
        alert.refresh_from_db()
        assert alert.resolved_at is not None
    finally:
        broker.delete(queue)


# --- metric alerts -----------------------------------------------------------------------------------------


def _series(training: Any, name: str, values: list[float], start: int = 1) -> None:
    for offset, value in enumerate(values):
        metrics_record(
            training=training, round_number=start + offset, values={name: value}, round_completed=False
        )


def test_a_degrading_metric_raises_performance_degraded_then_resolves(settings: Any) -> None:
    settings.FEDSITE_ALERT_DEGRADATION_FRACTION = 0.1
    settings.FEDSITE_ALERT_DEGRADATION_WINDOW = 5
    training = make_training("degrades")
    _series(training, "accuracy", [0.5, 0.7, 0.8, 0.75])  # 6 % below the best: under the threshold
    assert not Alert.objects.filter(kind=Alert.Kind.PERFORMANCE_DEGRADED).exists()
    _series(training, "accuracy", [0.6], start=5)  # 25 % below the best
    alert = Alert.objects.get(kind=Alert.Kind.PERFORMANCE_DEGRADED)
    assert alert.round_number == 5 and alert.details["best"] == 0.8
    assert alert.subject == f"training:{training.pk}/metric:accuracy"
    _series(training, "accuracy", [0.79], start=6)
    alert.refresh_from_db()
    assert alert.resolved_at is not None


def test_a_rising_loss_is_a_degradation(settings: Any) -> None:
    settings.FEDSITE_ALERT_DEGRADATION_FRACTION = 0.1
    training = make_training("loss rises")
    _series(training, "loss", [1.0, 0.8, 0.95])
    alert = Alert.objects.get(kind=Alert.Kind.PERFORMANCE_DEGRADED)
    assert alert.details["best"] == 0.8


def test_a_flat_metric_raises_convergence_stalled_then_resolves(settings: Any) -> None:
    settings.FEDSITE_ALERT_STALL_ROUNDS = 3
    settings.FEDSITE_ALERT_STALL_MIN_DELTA = 0.001
    training = make_training("stalls")
    _series(training, "accuracy", [0.5, 0.6, 0.6, 0.6])
    assert not Alert.objects.filter(kind=Alert.Kind.CONVERGENCE_STALLED).exists()  # rounds 2-4 improved
    _series(training, "accuracy", [0.6], start=5)
    alert = Alert.objects.get(kind=Alert.Kind.CONVERGENCE_STALLED)
    assert alert.severity == "info" and alert.round_number == 5
    _series(training, "accuracy", [0.6], start=6)
    alert.refresh_from_db()
    assert alert.count == 2
    _series(training, "accuracy", [0.7], start=7)
    alert.refresh_from_db()
    assert alert.resolved_at is not None and "improved" in alert.resolution


def test_unwatched_metrics_raise_nothing(settings: Any) -> None:
    settings.FEDSITE_ALERT_METRICS = ["accuracy"]
    training = make_training("unwatched")
    _series(training, "loss", [0.1, 5.0, 9.0])
    assert not Alert.objects.filter(kind=Alert.Kind.PERFORMANCE_DEGRADED).exists()
