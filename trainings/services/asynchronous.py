"""Asynchronous trainings (FedBuff, FedAsync): tasks on demand, and one server step per round.

A round of an asynchronous training is one server step, not a cohort: agents get a task whenever they
poll, from the newest version, and their updates join whichever round is collecting when they arrive.

Invariants:

- At most ``max_clients`` open tasks per training, and one per agent.
- A round closes once its buffer is full (FedBuff: ``buffer_size`` updates; FedAsync: 1) and the next
  one opens in the same transaction, so agents keep uploading while this one aggregates.
- Steps apply in round order: a round whose predecessor is still aggregating is deferred, and the
  predecessor enqueues it after commit (``_enqueue_if_aggregating``).
- An update's ``staleness`` is the number of versions published since the version its task started from.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import numpy as np
from django.db import transaction
from django.utils import timezone

from clients.models import Agent
from clients.services import agent_record_outcome
from fedsite.logs import log_event
from flcore.errors import FlcoreError
from flcore.parameters import ParameterSpec
from flcore.strategies import Strategy
from trainings.models import ClientUpdate, Round, Task, Training
from trainings.outbox import aggregation_intent_record
from trainings.services.rounds import _enqueue_aggregation, _round_open_next
from trainings.services.tasks import _task_config
from trainings.services.trainings import ASYNCHRONOUS_ALGORITHMS, _configuration
from trainings.services.updates import _update_views
from trainings.state import lock_training, transition_round, transition_task
from versioning.models import ModelVersion
from versioning.services import version_read_parameters, version_read_state

logger = logging.getLogger("trainings")

TS, RS, KS = Training.Status, Round.Status, Task.Status


def _expire_asynchronous_tasks(now: Any) -> int:
    overdue = Task.objects.filter(
        round__training__algorithm__in=list(ASYNCHRONOUS_ALGORITHMS),
        status__in=list(Task.OPEN),
        deadline__lte=now,
    ).values_list("pk", flat=True)
    expired = 0
    for task_id in overdue:
        with transaction.atomic():
            task = Task.objects.select_for_update().get(pk=task_id)
            if task.status in Task.OPEN:
                transition_task(task, KS.EXPIRED, reason="deadline passed")
                agent_record_outcome(agent_id=task.agent_id, outcome="expired")
                expired += 1
    return expired


def _asynchronous_round_settle(round_: Round) -> str:
    """Close an asynchronous round once its buffer is full (FedBuff: K updates; FedAsync: 1) and open
    the next one at once, so agents keep uploading while this one aggregates."""
    training = round_.training
    config = _configuration(training)
    strategy = config.strategy()
    buffer_size = int(getattr(strategy, "buffer_size", 1))
    if ClientUpdate.objects.filter(round=round_).count() < buffer_size:
        return "waiting"
    transition_round(round_, RS.AGGREGATING)
    aggregation_intent_record(round_)
    if round_.number < config.max_rounds:
        locked = lock_training(training.pk)
        if locked.status == TS.RUNNING:
            _round_open_next(locked)
    log_event(logger, "round_closed", training_id=training.pk, round=round_.number, updates=buffer_size)
    return "closed"


def _issue_asynchronous_task(agent: Agent) -> Task | None:
    """Give an idle agent a task in a running asynchronous training, from the newest version."""
    if agent.status != Agent.Status.ACTIVE:
        return None
    now = timezone.now()
    candidates = (
        Training.objects.filter(status=TS.RUNNING, algorithm__in=list(ASYNCHRONOUS_ALGORITHMS))
        .order_by("created_at")
        .values_list("pk", flat=True)
    )
    for training_id in candidates:
        with transaction.atomic():
            training = lock_training(training_id)
            if training.status != TS.RUNNING:
                continue
            config = _configuration(training)
            open_tasks = Task.objects.filter(
                round__training=training, status__in=list(Task.OPEN), deadline__gt=now
            )
            if open_tasks.filter(agent=agent).exists() or open_tasks.count() >= config.max_clients:
                continue
            round_ = Round.objects.filter(training=training).order_by("-number").first()
            if round_ is None or round_.status not in (RS.COLLECTING, RS.AGGREGATING):
                continue
            attempt = Task.objects.filter(round=round_, agent=agent).count() + 1
            issued = Task.objects.filter(round__training=training).count()
            task = Task.objects.create(
                round=round_,
                agent=agent,
                attempt=attempt,
                base_version=training.current_version,
                deadline=now + timedelta(seconds=config.round_timeout),
                config=_task_config(config, round_.number, issued),
                status=KS.DELIVERED,
                delivered_at=now,
            )
            log_event(
                logger,
                "async_task_issued",
                training_id=training.pk,
                round=round_.number,
                agent_id=agent.agent_id,
                base_version=training.current_version.number,
            )
            return task
    return None


def _enqueue_if_aggregating(training_id: Any, number: int) -> None:
    round_id = (
        Round.objects.filter(training_id=training_id, number=number, status=RS.AGGREGATING)
        .values_list("pk", flat=True)
        .first()
    )
    if round_id is not None:
        _enqueue_aggregation(round_id)


def _asynchronous_step(
    strategy: Strategy, spec: ParameterSpec, parent: ModelVersion, updates: list[ClientUpdate]
) -> tuple[Any, Any, Any, dict[str, float]]:
    """One server step of FedBuff (buffered, staleness-weighted deltas) or FedAsync (mixing each client
    model into the global one). Sets ``update.staleness`` (versions published since its base)."""
    from flcore.strategies.fedasync import FedAsync
    from flcore.strategies.fedbuff import FedBuff

    base = version_read_parameters(parent)
    state = version_read_state(parent, strategy)
    for update in updates:
        start = update.task.base_version or update.round.base_version
        update.staleness = max(0, parent.number - start.number)
    stalenesses = [float(u.staleness or 0) for u in updates]
    metrics = {
        "num_updates": float(len(updates)),
        "staleness_mean": float(np.mean(stalenesses)) if updates else 0.0,
        "staleness_max": float(max(stalenesses, default=0.0)),
    }
    if isinstance(strategy, FedBuff):
        buffer = strategy.buffer(spec)
        for update in updates:
            buffer.add(_update_views(update, spec), int(update.staleness or 0))
        delta = buffer.pseudo_gradient()
        new_parameters, new_state = strategy.apply(base, delta, state)
        return new_parameters, new_state, delta, metrics
    if isinstance(strategy, FedAsync):
        current = base
        for update in updates:
            start = update.task.base_version or update.round.base_version
            client_base = current if start.pk == parent.pk else version_read_parameters(start)
            current = strategy.mix(
                current, client_base, _update_views(update, spec), int(update.staleness or 0)
            )
        delta = {name: current[name] - base[name] for name in base}
        scalars = dict(state.scalars)
        scalars["step"] = int(scalars.get("step", 0)) + len(updates)
        return current, type(state)({}, scalars), delta, metrics
    raise FlcoreError(f"{strategy.algorithm.value} is not an asynchronous rule the coordinator knows.")
