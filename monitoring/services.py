"""Write side of monitoring: audit records, alerts and per-round metrics (each also broadcast)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from django.db import models, transaction
from django.utils import timezone

from fedsite.logs import log_event
from monitoring.events import event_broadcast_on_commit
from monitoring.models import Alert, AuditLog, Metric

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


def alert_raise(
    *,
    kind: str,
    message: str,
    severity: str = Alert.Severity.WARNING,
    training: Any = None,
    round_number: int | None = None,
    details: dict[str, Any] | None = None,
) -> Alert:
    """Create an alert and push it to the training's subscribers after commit."""
    alert = Alert.objects.create(
        training=training,
        round_number=round_number,
        kind=kind,
        severity=severity,
        message=message,
        details=details or {},
    )
    log_event(
        logger,
        "alert",
        level=logging.WARNING,
        kind=kind,
        severity=severity,
        training_id=getattr(training, "pk", None),
        round=round_number,
        message=repr(message),
    )
    if training is not None:
        event_broadcast_on_commit(
            training_id=training.pk,
            event="alert",
            payload={
                "alert": {
                    "id": alert.pk,
                    "kind": kind,
                    "severity": severity,
                    "message": message,
                    "round": round_number,
                    "created_at": alert.created_at.isoformat(),
                }
            },
        )
    return alert


def alert_resolve(*, kind: str, training: Any, round_number: int | None = None) -> int:
    """Mark open alerts of ``kind`` for a training (and round) resolved: the condition ended by itself.

    Returns how many were resolved. Resolved alerts stay in the list (and stay unacknowledged until an
    operator acknowledges them), so a stall that healed by itself is still visible afterwards.
    """
    open_alerts = Alert.objects.filter(kind=kind, training=training, resolved_at__isnull=True)
    if round_number is not None:
        open_alerts = open_alerts.filter(round_number=round_number)
    resolved = open_alerts.update(resolved_at=timezone.now())
    if resolved:
        log_event(
            logger, "alert_resolved", kind=kind, training_id=getattr(training, "pk", None), round=round_number
        )
    return resolved


def metrics_record(*, training: Any, round_number: int, values: Mapping[str, float]) -> list[Metric]:
    """Store finite metric values for a round (idempotent: a retry overwrites) and broadcast them."""
    stored: list[Metric] = []
    with transaction.atomic():
        for name, value in values.items():
            if value is None or not math.isfinite(float(value)):
                continue
            metric, _ = Metric.objects.update_or_create(
                training=training, round_number=round_number, name=name, defaults={"value": float(value)}
            )
            stored.append(metric)
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
    """Mark an open alert acknowledged (audited). Returns False if it already was."""
    name = actor.get_username() if hasattr(actor, "get_username") else str(actor)
    updated = Alert.objects.filter(pk=alert.pk, acknowledged_at__isnull=True).update(
        acknowledged_at=timezone.now(), acknowledged_by=name[:150]
    )
    if updated:
        audit_record(actor=actor, action="alert.acknowledge", obj=alert)
    return bool(updated)
