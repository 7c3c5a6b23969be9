"""Small factories for tests of the admin, the dashboard, the collectors and the consumer.

Trainings and agents are made through their services (as in production); rows only the coordinator
writes (rounds, metrics, alerts) are created directly, as test data.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.utils import timezone

from clients.models import Agent
from clients.services import agent_create
from monitoring.models import Alert, Metric
from trainings.configuration import TrainingConfiguration
from trainings.models import Round, Training
from trainings.services import training_create, training_create_and_start


def configuration(name: str = "t", **overrides: Any) -> TrainingConfiguration:
    return TrainingConfiguration.from_dict(
        {"name": name, "model_type": "logreg", "input_dim": 4, "num_classes": 3, **overrides}
    )


def make_training(name: str = "t", *, start: bool = False, **overrides: Any) -> Training:
    """A pending training (version 0 written), or a running one with round 1 waiting for agents."""
    if start:
        return training_create_and_start(configuration=configuration(name, **overrides))
    return training_create(configuration=configuration(name, **overrides))


def make_agent(agent_id: str, *, seen_seconds_ago: float | None = None, status: str | None = None) -> Agent:
    agent, _ = agent_create(agent_id=agent_id)
    fields: dict[str, Any] = {}
    if seen_seconds_ago is not None:
        fields["last_seen_at"] = timezone.now() - timedelta(seconds=seen_seconds_ago)
    if status is not None:
        fields["status"] = status
    if fields:
        Agent.objects.filter(pk=agent.pk).update(**fields)
        agent.refresh_from_db()
    return agent


def make_round(
    training: Training, number: int, status: str, metrics: dict[str, float] | None = None
) -> Round:
    round_ = Round.objects.create(
        training=training,
        number=number,
        status=status,
        base_version=training.current_version,
        metrics=metrics or {},
    )
    for name, value in (metrics or {}).items():
        Metric.objects.create(training=training, round_number=number, name=name, value=value)
    return round_


def make_alert(
    training: Training | None = None,
    *,
    severity: str = Alert.Severity.WARNING,
    message: str = "something happened",
    acknowledged: bool = False,
) -> Alert:
    return Alert.objects.create(
        training=training,
        kind=Alert.Kind.SYSTEM,
        severity=severity,
        message=message,
        acknowledged_at=timezone.now() if acknowledged else None,
        acknowledged_by="someone" if acknowledged else "",
        subject=f"test:{uuid.uuid4().hex}",  # distinct alerts, not repeats of one (kind, subject)
    )
