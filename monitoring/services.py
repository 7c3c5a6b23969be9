"""Write side of monitoring: audit records, alerts and per-round metrics (each also broadcast)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from fedsite.errors import NotFound
from fedsite.logs import log_event
from monitoring.events import event_broadcast_on_commit
from monitoring.health import HealthReading
from monitoring.models import Alert, AuditLog, Metric, SystemHealthSample

logger = logging.getLogger("monitoring")


def audit_record(
    *,
    actor: Any,
    action: str,
    obj: models.Model | None = None,
    object_type: str = "",
    object_id: str = "",
    details: dict[str, Any] | None = None,
) -> AuditLog:
    """Append one audit entry: ``actor`` is a user, an ``Agent`` or a free string such as ``system``."""
    from clients.models import Agent

    if isinstance(actor, Agent):
        actor_type, actor_name = AuditLog.ActorType.AGENT, actor.agent_id
    elif hasattr(actor, "get_username"):
        actor_type, actor_name = AuditLog.ActorType.USER, actor.get_username()
    else:
        text = str(actor or "system")
        actor_type = (
            AuditLog.ActorType.AGENT
            if text.startswith("agent:")
            else (
                AuditLog.ActorType.SYSTEM
                if text in ("system", "") or ":" in text
                else AuditLog.ActorType.USER
            )
        )
        actor_name = text
    if obj is not None:
        object_type = object_type or obj._meta.label_lower
        object_id = object_id or str(obj.pk)
    return AuditLog.objects.create(
        actor_type=actor_type,
        actor=actor_name[:150],
        action=action,
        object_type=object_type[:64],
        object_id=str(object_id)[:64],
        details=details or {},
    )


SEVERITY_RANK = {Alert.Severity.INFO: 0, Alert.Severity.WARNING: 1, Alert.Severity.CRITICAL: 2}


def alert_subject(*, training: Any = None, round_number: int | None = None) -> str:
    """The default subject: the training and round it is about, or ``system``."""
    if training is None:
        return "system" if round_number is None else f"system/round:{round_number}"
    subject = f"training:{training.pk}"
    return subject if round_number is None else f"{subject}/round:{round_number}"


def _alert_payload(alert: Alert, action: str) -> dict[str, Any]:
    return {
        "action": action,
        "alert": {
            "id": alert.pk,
            "kind": alert.kind,
            "severity": alert.severity,
            "message": alert.message,
            "round": alert.round_number,
            "subject": alert.subject,
            "count": alert.count,
            "created_at": alert.created_at.isoformat(),
            "last_seen_at": alert.last_seen_at.isoformat() if alert.last_seen_at else None,
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
            "resolution": alert.resolution,
            "acknowledged_at": alert.acknowledged_at.isoformat() if alert.acknowledged_at else None,
            "acknowledged_by": alert.acknowledged_by,
        },
    }


def _alert_broadcast(alert: Alert, action: str) -> None:
    """``alert`` event after commit: to the training's subscribers, or to every dashboard for a system
    alert (no training)."""
    event_broadcast_on_commit(
        training_id=alert.training_id, event="alert", payload=_alert_payload(alert, action)
    )


def alert_raise(
    *,
    kind: str,
    message: str,
    severity: str = Alert.Severity.WARNING,
    training: Any = None,
    round_number: int | None = None,
    details: dict[str, Any] | None = None,
    subject: str | None = None,
) -> Alert:
    """Raise an alert, or count a repeat of the open one of the same (kind, subject); broadcast either.

    A repeat updates ``count``, ``last_seen_at``, the message and details (the newest figures), and raises
    the severity if the new one is higher (an escalation is shown again: its acknowledgement is cleared).
    The row lock on the open alert and the partial unique constraint keep one open alert per pair even
    when two processes raise at once.
    """
    subject = subject if subject is not None else alert_subject(training=training, round_number=round_number)
    now = timezone.now()
    with transaction.atomic():
        alert = (
            Alert.objects.select_for_update()
            .filter(kind=kind, subject=subject, resolved_at__isnull=True)
            .first()
        )
        if alert is None:
            try:
                with transaction.atomic():
                    alert = Alert.objects.create(
                        training=training,
                        round_number=round_number,
                        kind=kind,
                        severity=severity,
                        message=message,
                        details=details or {},
                        subject=subject,
                        last_seen_at=now,
                    )
                action = "raised"
            except IntegrityError:  # another process raised it between our read and our insert
                alert = Alert.objects.select_for_update().get(
                    kind=kind, subject=subject, resolved_at__isnull=True
                )
                action = "updated"
        else:
            action = "updated"
        if action == "updated":
            alert.count += 1
            alert.last_seen_at = now
            alert.message = message
            alert.details = details or {}
            if SEVERITY_RANK.get(severity, 1) > SEVERITY_RANK.get(alert.severity, 1):
                alert.severity = severity
                alert.acknowledged_at, alert.acknowledged_by = None, ""
            alert.save(
                update_fields=[
                    "count",
                    "last_seen_at",
                    "message",
                    "details",
                    "severity",
                    "acknowledged_at",
                    "acknowledged_by",
                ]
            )
    log_event(
        logger,
        "alert" if action == "raised" else "alert_repeated",
        level=logging.WARNING,
        kind=kind,
        severity=alert.severity,
        subject=subject,
        count=alert.count,
        training_id=getattr(training, "pk", None),
        round=round_number,
        message=repr(message),
    )
    _alert_broadcast(alert, action)
    return alert


def alert_resolve(
    *,
    kind: str,
    training: Any = None,
    round_number: int | None = None,
    subject: str | None = None,
    resolution: str = "",
) -> int:
    """Mark open alerts of ``kind`` resolved: the condition ended by itself (``resolution`` says how).

    Matches ``subject`` when given, else the training (and round when given). Returns how many were
    resolved. Resolved alerts stay in the list (and stay unacknowledged until an operator acknowledges
    them), so a condition that healed by itself is still visible afterwards.
    """
    open_alerts = Alert.objects.filter(kind=kind, resolved_at__isnull=True)
    if subject is not None:
        open_alerts = open_alerts.filter(subject=subject)
    else:
        open_alerts = open_alerts.filter(training=training)
        if round_number is not None:
            open_alerts = open_alerts.filter(round_number=round_number)
    resolution = resolution or "The condition cleared."
    resolved = len(_alerts_resolve(open_alerts, lambda alert: resolution))
    if resolved:
        log_event(
            logger,
            "alert_resolved",
            kind=kind,
            subject=subject,
            training_id=getattr(training, "pk", None),
            round=round_number,
            resolution=repr(resolution),
        )
    return resolved


def alerts_resolve_subjects(*, kind: str, resolutions: Mapping[str, str]) -> set[str]:
    """:func:`alert_resolve` of many subjects at once (``{subject: resolution}``): one query for their
    open alerts of ``kind``. Returns the subjects that had one."""
    if not resolutions:
        return set()
    open_alerts = Alert.objects.filter(kind=kind, resolved_at__isnull=True, subject__in=list(resolutions))
    resolved = {alert.subject for alert in _alerts_resolve(open_alerts, lambda a: resolutions[a.subject])}
    for subject in sorted(resolved):
        log_event(logger, "alert_resolved", kind=kind, subject=subject, resolution=repr(resolutions[subject]))
    return resolved


def _alerts_resolve(open_alerts: Any, resolution_of: Any) -> list[Alert]:
    """Resolve each alert of ``open_alerts`` (locked) with ``resolution_of(alert)``, broadcast after commit;
    return them. No savepoint: inside a caller's transaction, an error here is the caller's to handle."""
    now = timezone.now()
    resolved: list[Alert] = []
    with transaction.atomic(savepoint=False):
        for alert in open_alerts.select_for_update():
            alert.resolved_at = now
            alert.resolution = resolution_of(alert)
            alert.save(update_fields=["resolved_at", "resolution"])
            _alert_broadcast(alert, "resolved")
            resolved.append(alert)
    return resolved


def metrics_record(
    *, training: Any, round_number: int, values: Mapping[str, float], round_completed: bool = True
) -> list[Metric]:
    """Store finite metric values for a round (idempotent: a retry overwrites) and broadcast them.

    Then evaluate the metric alerts (degradation, stalled convergence); with ``round_completed`` (the
    aggregation's call) the round's ``round_failed`` and ``too_few_agents`` alerts resolve themselves.
    """
    stored = [
        Metric(training=training, round_number=round_number, name=name, value=float(value))
        for name, value in values.items()
        if value is not None and math.isfinite(float(value))
    ]
    with transaction.atomic():
        # One statement for all of them; a retry overwrites the values.
        Metric.objects.bulk_create(
            stored,
            update_conflicts=True,
            unique_fields=["training", "round_number", "name"],
            update_fields=["value"],
        )
        if round_completed:
            alert_resolve(
                kind=Alert.Kind.ROUND_FAILED,
                training=training,
                round_number=round_number,
                resolution=f"Round {round_number} completed.",
            )
            alert_resolve(
                kind=Alert.Kind.TOO_FEW_AGENTS,
                training=training,
                round_number=round_number,
                resolution=f"Round {round_number} completed.",
            )
        metrics_evaluate(training=training, names={metric.name for metric in stored})
    for metric in stored:
        event_broadcast_on_commit(
            training_id=training.pk,
            event="metric_update",
            payload={
                "round": round_number,
                "metric": {"name": metric.name, "value": metric.value, "round": round_number},
            },
        )
    return stored


def alert_acknowledge(*, alert: Alert, actor: Any) -> bool:
    """Mark an alert acknowledged by ``actor`` (audited, broadcast). Returns False if it already was."""
    name = actor.get_username() if hasattr(actor, "get_username") else str(actor)
    with transaction.atomic():
        updated = Alert.objects.filter(pk=alert.pk, acknowledged_at__isnull=True).update(
            acknowledged_at=timezone.now(), acknowledged_by=name[:150]
        )
        if updated:
            alert.refresh_from_db()
            audit_record(
                actor=actor,
                action="alert.acknowledge",
                obj=alert,
                details={"kind": alert.kind, "subject": alert.subject},
            )
            _alert_broadcast(alert, "acknowledged")
    return bool(updated)


def alerts_acknowledge(*, alert_ids: list[int], actor: Any) -> dict[str, list[int]]:
    """Acknowledge several alerts at once; every id must exist (else nothing changes)."""
    with transaction.atomic():
        alerts = list(Alert.objects.filter(pk__in=alert_ids).order_by("pk"))
        missing = sorted(set(alert_ids) - {alert.pk for alert in alerts})
        if missing:
            raise NotFound(
                f"No alert with id {missing}: acknowledge existing alerts only.", code="alert_not_found"
            )
        acknowledged = [alert.pk for alert in alerts if alert_acknowledge(alert=alert, actor=actor)]
    already = [pk for pk in sorted(set(alert_ids)) if pk not in acknowledged]
    return {"acknowledged": acknowledged, "already_acknowledged": already}


def _metric_subject(training: Any, name: str) -> str:
    return f"training:{training.pk}/metric:{name}"


def metrics_evaluate(*, training: Any, names: Any = None) -> None:
    """Raise or resolve ``performance_degraded`` and ``convergence_stalled`` for a training's metrics.

    Runs on every ``metrics_record``: the series of each watched metric (``FEDSITE_ALERT_METRICS``) is
    read in round order and checked against the thresholds in settings.
    """
    from monitoring import analytics

    watched = [name for name in settings.FEDSITE_ALERT_METRICS if names is None or name in names]
    for name in watched:
        rows = list(
            Metric.objects.filter(training=training, name=name)
            .order_by("round_number")
            .values_list("round_number", "value")
        )
        if not rows:
            continue
        values = [value for _, value in rows]
        latest_round = rows[-1][0]
        subject = _metric_subject(training, name)
        window = settings.FEDSITE_ALERT_DEGRADATION_WINDOW
        drop = analytics.degradation(values, metric_name=name, window=window)
        threshold = settings.FEDSITE_ALERT_DEGRADATION_FRACTION
        if drop is not None and drop[0] > threshold:
            alert_raise(
                kind=Alert.Kind.PERFORMANCE_DEGRADED,
                severity=Alert.Severity.WARNING,
                training=training,
                round_number=latest_round,
                subject=subject,
                message=(
                    f"{name} fell to {values[-1]:.4g} in round {latest_round}, {drop[0]:.1%} worse than "
                    f"the best ({drop[1]:.4g}) of the last {window} rounds (threshold {threshold:.1%}, "
                    "FEDSITE_ALERT_DEGRADATION_FRACTION). Check the latest agents' updates and the learning "
                    "rate; a rollback to the best version is possible."
                ),
                details={
                    "metric": name,
                    "value": values[-1],
                    "best": drop[1],
                    "drop": drop[0],
                    "window": window,
                },
            )
        elif drop is not None:
            alert_resolve(
                kind=Alert.Kind.PERFORMANCE_DEGRADED,
                subject=subject,
                resolution=f"{name} is back within {threshold:.1%} of its best in round {latest_round}.",
            )
        rounds = settings.FEDSITE_ALERT_STALL_ROUNDS
        min_delta = settings.FEDSITE_ALERT_STALL_MIN_DELTA
        stall = analytics.stalled(values, metric_name=name, rounds=rounds, min_delta=min_delta)
        if stall:
            alert_raise(
                kind=Alert.Kind.CONVERGENCE_STALLED,
                severity=Alert.Severity.INFO,
                training=training,
                round_number=latest_round,
                subject=subject,
                message=(
                    f"{name} has not improved by more than {min_delta:.2%} over the last {rounds} rounds "
                    f"(up to round {latest_round}; FEDSITE_ALERT_STALL_ROUNDS, "
                    "FEDSITE_ALERT_STALL_MIN_DELTA). "
                    "The training may have converged: consider stopping it or changing its learning rate."
                ),
                details={"metric": name, "rounds": rounds, "min_delta": min_delta, "value": values[-1]},
            )
        elif stall is False:
            alert_resolve(
                kind=Alert.Kind.CONVERGENCE_STALLED,
                subject=subject,
                resolution=f"{name} improved again by round {latest_round}.",
            )


def health_sample_record(*, reading: HealthReading) -> SystemHealthSample:
    """Store one sample of the system-health time series."""
    return SystemHealthSample.objects.create(**reading.fields())


def health_samples_prune(*, now: Any = None) -> int:
    """Delete samples older than ``FEDSITE_HEALTH_RETENTION_HOURS`` and beyond the newest
    ``FEDSITE_HEALTH_MAX_SAMPLES``. Returns how many were deleted."""
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.FEDSITE_HEALTH_RETENTION_HOURS)
    deleted, _ = SystemHealthSample.objects.filter(created_at__lt=cutoff).delete()
    keep = settings.FEDSITE_HEALTH_MAX_SAMPLES
    boundary = SystemHealthSample.objects.order_by("-created_at", "-pk").values_list("created_at", "pk")[
        keep : keep + 1
    ]
    if boundary:
        created_at, pk = boundary[0]
        more, _ = SystemHealthSample.objects.filter(
            models.Q(created_at__lt=created_at) | models.Q(created_at=created_at, pk__lte=pk)
        ).delete()
        deleted += more
    return deleted


def _resource_checks() -> list[tuple[str, str, Any, float, str]]:
    """(subject, what, figure of a sample or None, threshold, comparison) per watched resource."""
    checks: list[tuple[str, str, Any, float, str]] = [
        ("cpu", "CPU use", lambda s: s.cpu_percent, settings.FEDSITE_ALERT_CPU_PERCENT, ">="),
        ("memory", "memory use", lambda s: s.memory_percent, settings.FEDSITE_ALERT_MEMORY_PERCENT, ">="),
        (
            "disk",
            "free disk of the blob store",
            lambda s: s.disk_free_percent,
            settings.FEDSITE_ALERT_DISK_FREE_PERCENT,
            "<",
        ),
    ]
    for queue in settings.FEDSITE_HEALTH_QUEUES:
        checks.append(
            (
                f"queue:{queue}",
                f"depth of the {queue} queue",
                lambda s, q=queue: s.queue_depths.get(q),
                float(settings.FEDSITE_ALERT_QUEUE_DEPTH),
                ">=",
            )
        )
    return checks


_SETTING_OF = {
    "cpu": "FEDSITE_ALERT_CPU_PERCENT",
    "memory": "FEDSITE_ALERT_MEMORY_PERCENT",
    "disk": "FEDSITE_ALERT_DISK_FREE_PERCENT",
}


def _is_over(value: float, threshold: float, comparison: str) -> bool:
    return value >= threshold if comparison == ">=" else value < threshold


def resources_evaluate(*, now: Any = None) -> dict[str, str]:
    """Raise ``resource_exhausted`` for a resource over its threshold in every sample of the last
    ``FEDSITE_ALERT_SUSTAINED_SECONDS``; resolve it when the newest sample is back under.

    Returns ``{subject: "raised" | "resolved" | "ok" | "pending"}`` (pending: over, not for long enough).
    """
    now = now or timezone.now()
    sustained = settings.FEDSITE_ALERT_SUSTAINED_SECONDS
    lookback = now - timedelta(seconds=sustained + 3 * settings.FEDSITE_HEALTH_SAMPLE_SECONDS)
    samples = list(SystemHealthSample.objects.filter(created_at__gte=lookback).order_by("-created_at", "-pk"))
    outcome: dict[str, str] = {}
    for subject, what, figure, threshold, comparison in _resource_checks():
        readings = [
            (sample, _is_over(figure(sample), threshold, comparison))
            for sample in samples
            if figure(sample) is not None
        ]
        if not readings:
            continue
        newest, newest_over = readings[0]
        if not newest_over:
            resolved = alert_resolve(
                kind=Alert.Kind.RESOURCE_EXHAUSTED,
                subject=subject,
                resolution=f"{what} is back at {figure(newest):.4g} (threshold {threshold:g}).",
            )
            outcome[subject] = "resolved" if resolved else "ok"
            continue
        oldest_over = newest
        for sample, flag in readings:
            if not flag:
                break
            oldest_over = sample
        duration = (newest.created_at - oldest_over.created_at).total_seconds()
        if duration < sustained:
            outcome[subject] = "pending"
            continue
        setting = _SETTING_OF.get(subject, "FEDSITE_ALERT_QUEUE_DEPTH")
        alert_raise(
            kind=Alert.Kind.RESOURCE_EXHAUSTED,
            severity=Alert.Severity.CRITICAL if subject == "disk" else Alert.Severity.WARNING,
            subject=subject,
            message=(
                f"{what} is {figure(newest):.4g} ({'below' if comparison == '<' else 'at or above'} the "
                f"threshold {threshold:g}, {setting}) for {duration:.0f} s on {newest.process}."
            ),
            details={
                "resource": subject,
                "value": figure(newest),
                "threshold": threshold,
                "sustained_seconds": duration,
                "sample_id": newest.pk,
            },
        )
        outcome[subject] = "raised"
    return outcome


def health_sample_take(*, role: str, cpu_interval: float | None = None) -> SystemHealthSample:
    """Measure, store, prune, then evaluate the resource alerts (the beat task's whole job)."""
    from monitoring.health import health_read

    sample = health_sample_record(reading=health_read(role=role, cpu_interval=cpu_interval))
    health_samples_prune()
    resources_evaluate()
    return sample


def agents_failures_evaluate(*, agents: Mapping[Any, str], training: Any = None) -> dict[Any, str]:
    """Raise, repeat or resolve the ``client_failures`` alert (subject ``agent:<agent_id>``) of each agent
    of ``agents`` (``{agent pk: agent_id}``), after tasks of ``training`` finished (the alert's WebSocket
    group).

    An agent's last ``FEDSITE_ALERT_CLIENT_FAILURE_WINDOW`` finished tasks (completed, failed, expired; by
    completion time) are counted once there are at least ``FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS``; a
    failed-or-expired share at or above ``FEDSITE_ALERT_CLIENT_FAILURE_RATE`` raises (a repeat counts), a
    share under it resolves. Every agent's last tasks are read in one query (a window per agent), the alerts
    to resolve in one more. Returns each agent's ``raised``, ``resolved`` or ``unchanged``.
    """
    from trainings.models import Task  # (trainings imports this module)

    statuses = [Task.Status.COMPLETED, Task.Status.FAILED, Task.Status.EXPIRED]
    recent: dict[Any, list[str]] = {pk: [] for pk in agents}
    rows = (
        Task.objects.filter(agent_id__in=list(agents), status__in=statuses)
        .annotate(
            place=models.Window(
                models.functions.RowNumber(),
                partition_by=[models.F("agent_id")],
                order_by=[models.F("completed_at").desc(), models.F("pk").desc()],
            )
        )
        .filter(place__lte=settings.FEDSITE_ALERT_CLIENT_FAILURE_WINDOW)
        .values_list("agent_id", "status")
    )
    for agent_pk, status in rows:
        recent[agent_pk].append(status)
    threshold = settings.FEDSITE_ALERT_CLIENT_FAILURE_RATE
    results = dict.fromkeys(agents, "unchanged")
    resolutions: dict[str, str] = {}
    for agent_pk, name in agents.items():
        last = recent[agent_pk]
        if len(last) < settings.FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS:
            continue
        failed = sum(s == Task.Status.FAILED for s in last)
        expired = sum(s == Task.Status.EXPIRED for s in last)
        rate = (failed + expired) / len(last)
        if rate < threshold:
            resolutions[f"agent:{name}"] = (
                f"Agent {name} now fails {rate:.0%} of its last {len(last)} tasks (under {threshold:.0%})."
            )
            continue
        alert_raise(
            kind=Alert.Kind.CLIENT_FAILURES,
            severity=Alert.Severity.WARNING,
            training=training,
            subject=f"agent:{name}",
            message=(
                f"Agent {name} failed or let expire {failed + expired} of its last {len(last)} tasks "
                f"({rate:.0%}, threshold {threshold:.0%}): {failed} failed, {expired} expired."
            ),
            details={
                "agent_id": name,
                "tasks": len(last),
                "failed": failed,
                "expired": expired,
                "rate": rate,
            },
        )
        results[agent_pk] = "raised"
    resolved = alerts_resolve_subjects(kind=Alert.Kind.CLIENT_FAILURES, resolutions=resolutions)
    for agent_pk, name in agents.items():
        if f"agent:{name}" in resolved:
            results[agent_pk] = "resolved"
    return results
