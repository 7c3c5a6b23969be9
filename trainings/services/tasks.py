"""Tasks: which agents a round picks, the tasks it issues them, and handing a task to a polling agent.

Invariants:

- Selection is deterministic for a given (seed, round, attempt) and candidate set; agents with no task
  in the round yet come first, and an agent that already has a pending, delivered or completed task in
  the round is never picked again.
- Every task of one attempt shares the round's deadline and base version; its ``seed`` is derived from
  (training seed, round, index), never from global randomness.
- Agents are woken only after the tasks are committed (``transaction.on_commit``).
- An agent gets only its own tasks (``_get_agent_task``: 404 for an unknown id, 403 for another agent's),
  and no task at all while it is not active.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from clients.models import Agent
from fedsite.errors import Forbidden, NotFound
from fedsite.logs import log_event
from privacy.models import PrivacyBudget
from trainings.configuration import TrainingConfiguration
from trainings.models import Round, Task, Training
from trainings.services.trainings import ASYNCHRONOUS_ALGORITHMS
from trainings.state import deliver_task_if_pending, deliver_tasks_if_pending
from versioning.models import ModelVersion

logger = logging.getLogger("trainings")

TS, RS, KS = Training.Status, Round.Status, Task.Status


def _task_config(
    config: TrainingConfiguration, round_number: int, index: int, local_dp: dict[str, Any] | None = None
) -> dict[str, Any]:
    extra = {"local_dp": local_dp} if local_dp else {}
    return {
        **extra,
        "local_epochs": config.local_epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "proximal_mu": 0.0,
        "max_steps": None,
        **config.strategy().client_config(),
        "seed": int(np.random.default_rng([config.seed, round_number, index]).integers(2**31)),
    }


def _select_agents(
    round_: Round, training: Training, config: TrainingConfiguration, wanted: int
) -> list[Agent]:
    """Pick up to ``wanted`` eligible agents, preferring those with no task in this round yet.

    Deterministic for a given (seed, round, attempt) and candidate set; weighted by reliability and
    contribution when the training asks for it (``trainings.selectors.selection_weights``).
    """
    tasked = dict(
        Task.objects.filter(round=round_)
        .values("agent_id")
        .annotate(good=Count("id", filter=Q(status__in=[KS.PENDING, KS.DELIVERED, KS.COMPLETED])))
        .values_list("agent_id", "good")
    )
    from trainings.selectors import agents_selectable, selection_weights  # (selectors imports this module)

    candidates = [a for a in agents_selectable().order_by("agent_id") if tasked.get(a.pk, 0) == 0]
    fresh = [a for a in candidates if a.pk not in tasked]
    retried = [a for a in candidates if a.pk in tasked]
    rng = np.random.default_rng([config.seed, round_.number, round_.attempt])
    chosen: list[Agent] = []
    for pool in (fresh, retried):
        take = min(wanted - len(chosen), len(pool))
        if take <= 0:
            continue
        if config.selection == "reliability":
            weights = np.array(selection_weights(training=training, agents=pool), dtype=np.float64)
            picks = rng.choice(len(pool), size=take, replace=False, p=weights / weights.sum())
        else:
            picks = rng.choice(len(pool), size=take, replace=False)
        chosen.extend(pool[int(i)] for i in sorted(picks))
    return chosen


def _issue_tasks(
    round_: Round, training: Training, config: TrainingConfiguration, agents: list[Agent]
) -> None:
    deadline = timezone.now() + timedelta(seconds=config.round_timeout)
    local_dp = _local_dp_instructions(training)
    round_.attempt += 1
    round_.deadline = deadline
    round_.save(update_fields=["attempt", "deadline"])
    tasks = [
        Task(
            round=round_,
            agent=agent,
            attempt=round_.attempt,
            base_version=round_.base_version,
            deadline=deadline,
            config=_task_config(config, round_.number, 1000 * round_.attempt + i, local_dp),
        )
        for i, agent in enumerate(agents)
    ]
    Task.objects.bulk_create(tasks)
    agent_pks = [agent.pk for agent in agents]
    transaction.on_commit(lambda: _wake_agents(agent_pks))
    log_event(
        logger,
        "round_tasks_issued",
        training_id=training.pk,
        round=round_.number,
        attempt=round_.attempt,
        agents=len(agents),
    )


def _local_dp_instructions(training: Training) -> dict[str, Any] | None:
    """What an agent of a local-DP training must do before upload (clip, then add noise)."""
    budget = PrivacyBudget.objects.filter(training=training, mode=PrivacyBudget.Mode.LOCAL).first()
    if budget is None:
        return None
    return {
        "mechanism": budget.mechanism,
        "clip_norm": budget.clip_norm,
        "noise_multiplier": budget.noise_multiplier,
    }


def _wake_agents(agent_pks: list[Any]) -> None:
    from trainings.wakeup import wake_agents

    wake_agents(agent_pks)


def _deliverable(now: Any) -> Q:
    """Tasks a poll may hand out: deadline not passed, in a collecting (or secure-aggregation) round of a
    running training."""
    from trainings.services.secagg import ROUND_STATES as SECAGG_STATES

    return Q(
        deadline__gt=now,
        round__training__status=TS.RUNNING,
        round__status__in=[RS.COLLECTING, *SECAGG_STATES],
    )


def _asynchronous_training_running() -> bool:
    """Whether an asynchronous training runs: its tasks are issued on demand, to any agent that asks."""
    return Training.objects.filter(status=TS.RUNNING, algorithm__in=list(ASYNCHRONOUS_ALGORITHMS)).exists()


def task_next_for_agent(*, agent: Agent) -> Task | None:
    """The agent's oldest open task in a collecting round of a running training, marked delivered."""
    from trainings.services.asynchronous import _issue_asynchronous_task  # (it imports this module)

    if agent.status != Agent.Status.ACTIVE:  # quarantined since its tasks were issued: hand out none
        return None
    now = timezone.now()
    asynchronous = Q(
        deadline__gt=now,
        round__training__status=TS.RUNNING,
        round__training__algorithm__in=list(ASYNCHRONOUS_ALGORITHMS),
    )
    found = (
        Task.objects.filter(_deliverable(now) | asynchronous, agent=agent, status__in=list(Task.OPEN))
        .select_related(*PAYLOAD_RELATIONS)
        .order_by("created_at")
        .first()
    )
    task = found or _issue_asynchronous_task(agent)
    if task is None:
        return None
    if task.status == KS.PENDING and not deliver_task_if_pending(task):
        found = None  # changed by another request since it was read
    if found is None:  # an asynchronous task just issued, or one changed meanwhile: read it as it is now
        return Task.objects.select_related(*PAYLOAD_RELATIONS).get(pk=task.pk)
    return found


def tasks_next_for_agents(agents: Sequence[Agent]) -> list[Task | None]:
    """:func:`task_next_for_agent` of many agents at once (the long-polls that start or wake together), in
    order: each agent's oldest open task in a collecting round of a running training, marked delivered.

    Their open tasks are read in one query (with what the task JSON needs) and the pending ones marked
    delivered in one conditional ``UPDATE``; a task changed meanwhile by another request, and every agent
    while an asynchronous training runs (its tasks are issued on demand), go through
    :func:`task_next_for_agent` one by one.
    """
    active = [agent for agent in agents if agent.status == Agent.Status.ACTIVE]
    if not active:
        return [None] * len(agents)
    if _asynchronous_training_running():
        return [task_next_for_agent(agent=agent) for agent in agents]
    oldest: dict[Any, Task] = {}
    for task in (
        Task.objects.filter(
            _deliverable(timezone.now()), agent_id__in={a.pk for a in active}, status__in=list(Task.OPEN)
        )
        .select_related(*PAYLOAD_RELATIONS)
        .order_by("created_at")
    ):
        oldest.setdefault(task.agent_id, task)
    pending = [task for task in oldest.values() if task.status == KS.PENDING]
    moved = deliver_tasks_if_pending(pending)
    changed = {task.agent_id for task in pending if task.pk not in moved}
    found: list[Task | None] = []
    for agent in agents:
        if agent.status != Agent.Status.ACTIVE:
            found.append(None)
        elif agent.pk in changed:  # another request changed its task since it was read: as one poll does
            found.append(task_next_for_agent(agent=agent))
        else:
            found.append(oldest.get(agent.pk))
    return found


#: What the task's JSON needs (trainings.selectors.task_payload), read with the task in one query.
PAYLOAD_RELATIONS = ("round__training", "round__base_version", "base_version")


def tasks_agents_with_work(agent_keys: Collection[str]) -> set[str]:
    """Which of these waiting agents (``str`` of their pks) may have a task now: the shared re-check.

    One query for the undelivered tasks of collecting rounds (a few rows per open round, whatever the
    number of waiting agents), and one for running asynchronous trainings, whose tasks are issued on
    demand: while one runs, every waiting agent is named, since any of them may get a task when it asks.
    """
    waiting = set(agent_keys)
    if not waiting:
        return set()
    pending = {
        str(pk)
        for pk in Task.objects.filter(_deliverable(timezone.now()), status=KS.PENDING).values_list(
            "agent_id", flat=True
        )
    }
    if _asynchronous_training_running():
        return waiting
    return pending & waiting


def _get_agent_task(agent: Agent, task_id: Any) -> Task:
    try:
        task = Task.objects.select_related("round__training", "agent").get(pk=task_id)
    except (Task.DoesNotExist, ValueError, TypeError, DjangoValidationError) as exc:
        raise NotFound(f"No task with id {task_id!r}.", code="task_not_found") from exc
    if task.agent_id != agent.pk:
        raise Forbidden("This task belongs to another agent.", code="not_your_task")
    return task


def agent_download_task(*, agent: Agent, version: ModelVersion) -> Task | None:
    """The agent's newest task in the training of ``version``; None means it may not download it."""
    return (
        Task.objects.filter(agent=agent, round__training_id=version.training_id)
        .select_related("round")
        .order_by("-created_at")
        .first()
    )


def agent_download_record(*, agent: Agent, version: ModelVersion, task: Task) -> None:
    """Audit one model download served to an agent: one row naming the version, the task and its round."""
    from monitoring.services import audit_record

    audit_record(
        actor=agent,
        action="version.download",
        obj=version,
        details={"number": version.number, "task_id": str(task.pk), "round": task.round.number},
    )


def agent_may_download(*, agent: Agent, version: ModelVersion) -> bool:
    """An agent may download versions of trainings it has (or had) a task in."""
    return Task.objects.filter(agent=agent, round__training_id=version.training_id).exists()
