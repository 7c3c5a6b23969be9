"""Trainings: create, start and stop one, and what every stage reads about it.

Invariants:

- A training's status changes only through ``trainings.state.transition_training`` on a row locked
  here (``_get_locked_training``) or by the caller; a start takes a Postgres advisory lock first, so two
  concurrent starts cannot both pass the ``max_concurrent_trainings`` count.
- ``training_create_and_start`` is one transaction: a refused start leaves no training behind.
- A training that ends (stopped here, completed or failed elsewhere) cancels every open round and task
  (``_cancel_open_training_tasks``) and broadcasts one ``training_completed`` event after commit
  (``_broadcast_training_finished``); the latest version stays the result.
- ``_configuration`` and ``is_asynchronous`` are the only readers of a training's stored configuration
  and kind that the other stages use.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection, transaction

from clients.models import Agent
from fedsite.errors import Conflict, NotFound
from fedsite.logs import log_event
from flcore.models import ModelSpec, build_model
from monitoring.events import event_broadcast_on_commit
from monitoring.services import audit_record
from privacy.services import budget_create
from trainings.configuration import TrainingConfiguration
from trainings.models import Round, Task, Training
from trainings.state import PLAIN, lock_training, transition_round, transition_task, transition_training
from versioning.models import ModelVersion
from versioning.services import version_create

logger = logging.getLogger("trainings")

TS, RS, KS = Training.Status, Round.Status, Task.Status
ASYNCHRONOUS_ALGORITHMS = frozenset({"fedbuff", "fedasync"})
ADVISORY_LOCK_TRAINING_START = 7_401_001


def training_create(*, configuration: TrainingConfiguration, created_by: Any = None) -> Training:
    """Create a training in ``pending`` with version 0 of its model, initialised from the seed."""
    # A dataclass built directly in Python skips from_dict; validate every path the same way.
    configuration = TrainingConfiguration.from_dict(configuration.to_dict())
    model_spec = ModelSpec.from_json(configuration.model_spec_json())
    model = build_model(model_spec)
    parameters = model.init(np.random.default_rng(configuration.seed))
    parameter_spec = model.parameter_spec()
    with transaction.atomic():
        training = Training.objects.create(
            name=configuration.name.strip(),
            algorithm=configuration.algorithm.value,
            config=configuration.to_dict(),
            model_spec=model_spec.to_json(),
            parameter_spec=parameter_spec.to_json(),
            created_by=created_by if getattr(created_by, "pk", None) else None,
        )
        version = version_create(
            training=training, number=0, parameters=parameters, origin=ModelVersion.Origin.INITIAL
        )
        training.current_version = version
        training.save(update_fields=["current_version"])
        if configuration.privacy:
            population = configuration.privacy.get("population") or max(
                Agent.objects.filter(status=Agent.Status.ACTIVE).count(), configuration.max_clients
            )
            budget_create(
                training=training,
                settings_=configuration.privacy,
                planned_rounds=configuration.max_rounds,
                expected_clients=configuration.max_clients,
                population=population,
            )
        audit_record(
            actor=created_by or "system",
            action="training.create",
            obj=training,
            details={"algorithm": training.algorithm},
        )
    log_event(logger, "training_created", training_id=training.pk, algorithm=training.algorithm)
    return training


def _acquire_start_lock() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [ADVISORY_LOCK_TRAINING_START])


def training_start(*, training_id: Any, actor: Any = None) -> Training:
    """Start a pending training and open its first round; refused (409) beyond the concurrency limit."""
    from trainings.services.rounds import _round_open_next  # (rounds imports this module)

    with transaction.atomic():
        _acquire_start_lock()
        training = _get_locked_training(training_id)
        if training.status != TS.PENDING:
            raise Conflict(
                f"Training {training.pk} is {training.status}; only a pending training can be started.",
                code="training_not_pending",
            )
        running = Training.objects.filter(status=TS.RUNNING).count()
        limit = settings.FEDSITE_MAX_CONCURRENT_TRAININGS
        if running >= limit:
            raise Conflict(
                f"{running} trainings are already running and max_concurrent_trainings is {limit}; "
                "stop one or wait for one to finish, or raise max_concurrent_trainings.",
                code="too_many_trainings",
                details={"running": running, "max_concurrent_trainings": limit},
            )
        transition_training(training, TS.RUNNING)
        audit_record(actor=actor or "system", action="training.start", obj=training)
        event_broadcast_on_commit(
            training_id=training.pk, event="training_started", payload={"status": TS.RUNNING}
        )
        _round_open_next(training)
    log_event(logger, "training_started", training_id=training.pk)
    return training


def training_create_and_start(*, configuration: TrainingConfiguration, created_by: Any = None) -> Training:
    """Create and start in one transaction: a refused start leaves no training behind."""
    with transaction.atomic():
        training = training_create(configuration=configuration, created_by=created_by)
        return training_start(training_id=training.pk, actor=created_by)


def training_stop(*, training_id: Any, actor: Any = None, reason: str = "stopped by operator") -> Training:
    """Stop a training: cancel its open round and tasks; the latest version stays the result."""
    with transaction.atomic():
        training = _get_locked_training(training_id)
        if training.is_terminal:
            raise Conflict(f"Training {training.pk} is already {training.status}.", code="training_finished")
        transition_training(training, TS.STOPPED, reason=reason)
        from trainings.services.secagg import ROUND_STATES as SECAGG_STATES
        from trainings.services.secagg import SECAGG

        for round_ in Round.objects.select_for_update().filter(
            training=training, status__in=[RS.WAITING, RS.COLLECTING, *SECAGG_STATES]
        ):
            protocol = SECAGG if round_.status in SECAGG_STATES else PLAIN
            transition_round(round_, RS.CANCELLED, error=reason, protocol=protocol)
        _cancel_open_training_tasks(training)
        audit_record(
            actor=actor or "system", action="training.stop", obj=training, details={"reason": reason}
        )
        _broadcast_training_finished(training)
    log_event(logger, "training_stopped", training_id=training.pk, reason=repr(reason))
    return training


def _get_locked_training(training_id: Any) -> Training:
    try:
        return lock_training(training_id)
    except (Training.DoesNotExist, ValueError, TypeError, DjangoValidationError) as exc:
        raise NotFound(f"No training with id {training_id!r}.", code="training_not_found") from exc


def _broadcast_training_finished(training: Training) -> None:
    version = training.current_version
    event_broadcast_on_commit(
        training_id=training.pk,
        event="training_completed",
        payload={
            "status": training.status,
            "reason": training.stop_reason,
            "rounds": training.current_round,
            "best_accuracy": training.best_accuracy,
            "version": version.number if version else None,
        },
    )


def _cancel_open_training_tasks(training: Training) -> None:
    open_tasks = Task.objects.select_for_update().filter(round__training=training, status__in=list(Task.OPEN))
    for task in open_tasks:
        transition_task(task, KS.CANCELLED)


def _configuration(training: Training) -> TrainingConfiguration:
    return TrainingConfiguration.from_dict(training.config)


def is_asynchronous(training: Training) -> bool:
    """Asynchronous trainings (FedBuff, FedAsync) hand out tasks on demand; a round is one server step."""
    return training.algorithm in ASYNCHRONOUS_ALGORITHMS
