"""Explicit state machines for trainings, rounds and tasks.

A status changes only through ``transition_*`` here: the row is re-read under ``select_for_update``
inside the caller's transaction and the move is checked against the table below. Later phases (secure
aggregation: key advertisement, share exchange, masked upload, unmasking) slot in as new states and
edges in ``ROUND_TRANSITIONS``; nothing else needs to change.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from fedsite.errors import Conflict
from trainings.models import Round, Task, Training

TS = Training.Status
RS = Round.Status
KS = Task.Status

TRAINING_TRANSITIONS: dict[str, frozenset[str]] = {
    TS.PENDING: frozenset({TS.RUNNING, TS.STOPPED, TS.FAILED}),
    TS.RUNNING: frozenset({TS.COMPLETED, TS.STOPPED, TS.FAILED, TS.BUDGET_EXHAUSTED}),
    TS.COMPLETED: frozenset(),
    TS.STOPPED: frozenset(),
    TS.FAILED: frozenset(),
    TS.BUDGET_EXHAUSTED: frozenset(),
}

ROUND_TRANSITIONS: dict[str, frozenset[str]] = {
    RS.WAITING: frozenset({RS.COLLECTING, RS.CANCELLED, RS.FAILED}),
    RS.COLLECTING: frozenset({RS.COLLECTING, RS.AGGREGATING, RS.FAILED, RS.CANCELLED}),
    RS.AGGREGATING: frozenset({RS.COMPLETED, RS.FAILED}),
    RS.COMPLETED: frozenset(),
    RS.FAILED: frozenset(),
    RS.CANCELLED: frozenset(),
}

TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    KS.PENDING: frozenset({KS.DELIVERED, KS.COMPLETED, KS.FAILED, KS.EXPIRED, KS.CANCELLED}),
    KS.DELIVERED: frozenset({KS.COMPLETED, KS.FAILED, KS.EXPIRED, KS.CANCELLED}),
    KS.COMPLETED: frozenset(),
    KS.FAILED: frozenset(),
    KS.EXPIRED: frozenset(),
    KS.CANCELLED: frozenset(),
}


class IllegalTransition(Conflict):
    default_code = "illegal_transition"


def _check(kind: str, table: dict[str, frozenset[str]], source: str, target: str, label: str) -> None:
    source, target = str(source), str(target)
    if target not in table.get(source, frozenset()):
        raise IllegalTransition(
            f"{label} cannot go from {source!r} to {target!r}; allowed from {source!r}: "
            f"{sorted(str(s) for s in table.get(source, frozenset())) or 'nothing (final state)'}.",
            details={"object": kind, "from": source, "to": target},
        )


def lock_training(training_id: object) -> Training:
    return Training.objects.select_for_update().get(pk=training_id)


def lock_round(round_id: int) -> Round:
    return Round.objects.select_for_update().select_related("training").get(pk=round_id)


def transition_training(training: Training, target: str, *, reason: str = "") -> Training:
    """Move a training (already locked by the caller) to ``target``."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("transition_training must run inside transaction.atomic()")
    _check("training", TRAINING_TRANSITIONS, training.status, target, f"Training {training.pk}")
    training.status = target
    fields = ["status"]
    now = timezone.now()
    if target == TS.RUNNING:
        training.started_at = now
        fields.append("started_at")
    if target in Training.TERMINAL:
        training.finished_at = now
        training.stop_reason = reason[:200]
        fields += ["finished_at", "stop_reason"]
    training.save(update_fields=fields)
    return training


def transition_round(round_: Round, target: str, *, error: str = "") -> Round:
    """Move a round (already locked by the caller) to ``target``."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("transition_round must run inside transaction.atomic()")
    _check("round", ROUND_TRANSITIONS, round_.status, target, f"Round {round_.number}")
    round_.status = target
    fields = ["status"]
    now = timezone.now()
    if target == RS.COLLECTING and round_.opened_at is None:
        round_.opened_at = now
        fields.append("opened_at")
    if target == RS.AGGREGATING:
        round_.closed_at = now
        fields.append("closed_at")
    if target in (RS.COMPLETED, RS.FAILED, RS.CANCELLED):
        round_.completed_at = now
        fields.append("completed_at")
        if round_.closed_at is None:
            round_.closed_at = now
            fields.append("closed_at")
    if error:
        round_.error = error
        fields.append("error")
    round_.save(update_fields=fields)
    return round_


def transition_task(task: Task, target: str, *, reason: str = "") -> Task:
    """Move a task (locked by the caller, or its round locked) to ``target``."""
    _check("task", TASK_TRANSITIONS, task.status, target, f"Task {task.pk}")
    task.status = target
    fields = ["status"]
    now = timezone.now()
    if target == KS.DELIVERED:
        task.delivered_at = now
        fields.append("delivered_at")
    if target in (KS.COMPLETED, KS.FAILED, KS.EXPIRED, KS.CANCELLED):
        task.completed_at = now
        fields.append("completed_at")
    if reason:
        task.failure_reason = reason[:2000]
        fields.append("failure_reason")
    task.save(update_fields=fields)
    return task
