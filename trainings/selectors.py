"""Read-side queries and the JSON views of trainings, rounds and tasks."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Exists, OuterRef, QuerySet

from clients.models import Agent
from clients.selectors import agents_eligible
from monitoring.contributions import contribution_weights
from monitoring.models import Metric
from monitoring.selectors import training_convergence
from trainings.models import Round, Task, Training
from trainings.services import update_max_bytes


def agents_selectable() -> QuerySet[Agent]:
    """Agents a round may select: eligible (active, seen within FEDSITE_AGENT_TIMEOUT) and, if they let a
    task expire, seen again since (a poll or heartbeat after the expiry). A killed agent stays "recently
    seen" for the whole agent timeout; without this rule the next rounds would pick it and wait their full
    deadline for it."""
    expired_since_seen = Task.objects.filter(
        agent=OuterRef("pk"), status=Task.Status.EXPIRED, completed_at__gte=OuterRef("last_seen_at")
    )
    return agents_eligible().exclude(Exists(expired_since_seen))


def selection_weights(*, training: Training, agents: list[Agent]) -> list[float]:
    """Weights of selection ``"reliability"``: each agent's reliability times its contribution factor in
    this training (``monitoring.contributions.contribution_weights``; docs/monitoring.md section 5)."""
    factors = contribution_weights(training=training, agents=agents)
    return [agent.reliability * factors[agent.pk] for agent in agents]


def training_get(training_id: Any) -> Training | None:
    try:
        return Training.objects.select_related("current_version").filter(pk=training_id).first()
    except (ValueError, TypeError, DjangoValidationError):  # not a UUID
        return None


def task_payload(task: Task) -> dict[str, Any]:
    """The task JSON of the agent protocol (docs/agent-protocol.md)."""
    round_ = task.round
    training = round_.training
    version = task.base_version or round_.base_version
    payload = {
        "task_id": str(task.pk),
        "kind": task.kind,
        "training_id": str(training.pk),
        "round": round_.number,
        "deadline": task.deadline.isoformat(),
        "model": {
            "version_id": str(version.pk),
            "number": version.number,
            "sha256": version.blob_sha256,
            "url": f"/api/v1/agent/models/{version.pk}",
            "spec": training.model_spec,
            "parameters": training.parameter_spec,
        },
        "config": task.config,
        "upload_url": f"/api/v1/agent/tasks/{task.pk}/update",
        "max_update_bytes": update_max_bytes(training),
    }
    if task.kind != Task.Kind.FIT:  # a secure-aggregation phase: answered at its own endpoint
        from trainings.services.secagg import secagg_task_fields

        payload.update(secagg_task_fields(task))
    return payload


def training_metrics_series(training: Training) -> dict[str, list[dict[str, float]]]:
    """Metrics per name as ``[{"round": r, "value": v}, ...]`` in round order."""
    series: dict[str, list[dict[str, float]]] = {}
    for name, round_number, value in (
        Metric.objects.filter(training=training)
        .order_by("name", "round_number")
        .values_list("name", "round_number", "value")
    ):
        series.setdefault(name, []).append({"round": round_number, "value": value})
    return series


def training_status(training: Training) -> dict[str, Any]:
    """The status document of ``GET /api/training/{id}/status`` and ``manage.py training_status``."""
    current = training.rounds.order_by("-number").first()
    completed = training.rounds.filter(status=Round.Status.COMPLETED)
    completed_rounds = completed.count()
    last_completed = completed.order_by("-number").values_list("number", flat=True).first()
    latest_metrics: dict[str, float] = {}
    if last_completed is not None:
        latest_metrics = dict(
            Metric.objects.filter(training=training, round_number=last_completed).values_list("name", "value")
        )
    version = training.current_version
    round_info = None
    if current is not None:
        counts = {s: 0 for s in Task.Status.values}
        for status in current.tasks.values_list("status", flat=True):
            counts[status] += 1
        round_info = {
            "number": current.number,
            "status": current.status,
            "attempt": current.attempt,
            "deadline": current.deadline.isoformat() if current.deadline else None,
            "tasks": counts,
        }
    return {
        "training_id": str(training.pk),
        "name": training.name,
        "status": training.status,
        "algorithm": training.algorithm,
        "current_round": training.current_round,
        "completed_rounds": completed_rounds,
        "max_rounds": training.config.get("max_rounds"),
        "target_accuracy": training.config.get("target_accuracy"),
        "best_accuracy": training.best_accuracy,
        "latest_metrics": latest_metrics,
        "latest_metrics_round": last_completed,
        "round": round_info,
        "current_version": {"number": version.number, "sha256": version.blob_sha256, "id": str(version.pk)}
        if version
        else None,
        "stop_reason": training.stop_reason,
        "privacy": _privacy_summary(training),
        "convergence": training_convergence(training=training),
        "created_at": training.created_at.isoformat(),
        "started_at": training.started_at.isoformat() if training.started_at else None,
        "finished_at": training.finished_at.isoformat() if training.finished_at else None,
    }


def trainings_running() -> QuerySet[Training]:
    return Training.objects.filter(status=Training.Status.RUNNING)


def _privacy_summary(training: Training) -> dict[str, Any] | None:
    """Budget and spend (the full report with the ledger is ``GET /api/trainings/{id}/privacy``)."""
    from privacy.models import PrivacyBudget

    budget = PrivacyBudget.objects.filter(training=training).first()
    if budget is None:
        return None
    return {
        "mode": budget.mode,
        "epsilon": budget.epsilon,
        "delta": budget.delta,
        "spent_epsilon": budget.spent_epsilon,
        "remaining_epsilon": max(0.0, budget.epsilon - budget.spent_epsilon),
        "noise_multiplier": budget.noise_multiplier,
    }


def training_has_participant(*, training: Training, agent: Any) -> bool:
    """True if ``agent`` has (or had) a task in ``training``: what an agent may read about it."""
    return Task.objects.filter(agent=agent, round__training=training).exists()
