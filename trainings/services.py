"""The coordinator: training lifecycle, round lifecycle, tasks, updates and aggregation.

See DESIGN.md section 3. Every status change goes through ``trainings.state``; every piece of Celery
work is enqueued with ``transaction.on_commit`` so a worker never sees uncommitted rows; aggregation is
idempotent under retry (versions are unique per number, blobs are content-addressed, and the round's
status is re-checked under a lock before anything is written).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from datetime import timedelta
from typing import Any

import numpy as np
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Q
from django.utils import timezone

from clients.models import Agent
from clients.services import agent_record_outcome
from fedsite.errors import Conflict, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from fedsite.logs import log_event
from fedsite.parsers import json_check, json_parse, text_check
from flcore.dp.central import wrap_central_dp
from flcore.errors import FlcoreError, SerdeError
from flcore.models import ModelSpec, build_model
from flcore.parameters import ParameterSpec, from_bytes, iter_file_tensors, l2_norm, load_file
from flcore.strategies import Strategy
from monitoring.events import event_broadcast_on_commit
from monitoring.models import Alert
from monitoring.services import alert_raise, audit_record, metrics_record
from privacy.models import PrivacyBudget
from privacy.services import budget_allows, budget_create, budget_next_event, ledger_record
from trainings.configuration import TrainingConfiguration
from trainings.models import ClientUpdate, Round, Task, Training
from trainings.outbox import (
    aggregation_intent_complete,
    aggregation_intent_record,
    aggregation_relay,
    aggregations_recover,
)
from trainings.state import lock_round, lock_training, transition_round, transition_task, transition_training
from versioning.blobs import (
    BlobTooLarge,
    Readable,
    SpooledBlob,
    blob_local_path,
    blob_read,
    blob_save_spooled,
    blob_spool,
)
from versioning.models import ModelVersion
from versioning.services import (
    rollback_policy_check,
    version_create,
    version_read_parameters,
    version_read_state,
)

logger = logging.getLogger("trainings")

TS, RS, KS = Training.Status, Round.Status, Task.Status
MAX_METRICS = 64
MAX_FAIL_REASON_CHARS = 1000
ASYNCHRONOUS_ALGORITHMS = frozenset({"fedbuff", "fedasync"})
ADVISORY_LOCK_TRAINING_START = 7_401_001


# ---------------------------------------------------------------------------------------------------
# Trainings
# ---------------------------------------------------------------------------------------------------
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
        for round_ in Round.objects.select_for_update().filter(
            training=training, status__in=[RS.WAITING, RS.COLLECTING]
        ):
            transition_round(round_, RS.CANCELLED, error=reason)
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


# ---------------------------------------------------------------------------------------------------
# Rounds: opening, selection, deadlines
# ---------------------------------------------------------------------------------------------------
def _configuration(training: Training) -> TrainingConfiguration:
    return TrainingConfiguration.from_dict(training.config)


def is_asynchronous(training: Training) -> bool:
    """Asynchronous trainings (FedBuff, FedAsync) hand out tasks on demand; a round is one server step."""
    return training.algorithm in ASYNCHRONOUS_ALGORITHMS


def _round_open_next(training: Training) -> Round:
    """Create round ``current_round + 1`` on the current version and start it.

    Synchronous: select agents and issue their tasks (or wait for agents). Asynchronous: the round just
    starts collecting; agents get tasks whenever they poll (``_issue_asynchronous_task``).
    """
    number = training.current_round + 1
    round_ = Round.objects.create(training=training, number=number, base_version=training.current_version)
    training.current_round = number
    training.save(update_fields=["current_round"])
    if is_asynchronous(training):
        transition_round(round_, RS.COLLECTING)
    else:
        _round_try_select(round_, training)
    return round_


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

    Deterministic for a given (seed, round, attempt) and candidate set; weighted by reliability when the
    training asks for it.
    """
    tasked = dict(
        Task.objects.filter(round=round_)
        .values("agent_id")
        .annotate(good=Count("id", filter=Q(status__in=[KS.PENDING, KS.DELIVERED, KS.COMPLETED])))
        .values_list("agent_id", "good")
    )
    from trainings.selectors import agents_selectable  # (selectors imports this module)

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
            weights = np.array([a.reliability for a in pool], dtype=np.float64)
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


def _round_try_select(round_: Round, training: Training) -> bool:
    """WAITING -> COLLECTING if at least the minimum of agents is eligible; else alert once and wait."""
    config = _configuration(training)
    budget = PrivacyBudget.objects.filter(training=training).first()
    if budget is not None:
        return _round_open_private(round_, training, config, budget)
    agents = _select_agents(round_, training, config, config.max_clients)
    if len(agents) < config.min_clients:
        if not Alert.objects.filter(
            training=training, round_number=round_.number, kind=Alert.Kind.TOO_FEW_AGENTS
        ).exists():
            alert_raise(
                kind=Alert.Kind.TOO_FEW_AGENTS,
                severity=Alert.Severity.WARNING,
                training=training,
                round_number=round_.number,
                message=(
                    f"Round {round_.number} needs {config.min_clients} agents but only {len(agents)} are "
                    "eligible (active and recently seen); it will start as soon as enough agents poll."
                ),
                details={"eligible": len(agents), "required": config.min_clients},
            )
        return False
    transition_round(round_, RS.COLLECTING)
    _issue_tasks(round_, training, config, agents)
    event_broadcast_on_commit(
        training_id=training.pk, event="round_opened", payload={"round": round_.number, "agents": len(agents)}
    )
    return True


def _round_open_private(
    round_: Round, training: Training, config: TrainingConfiguration, budget: PrivacyBudget
) -> bool:
    """Open a round of a differentially private training: never one that would overspend the budget.

    The next round's event (Poisson sampling at q = expected / eligible agents) is composed with the
    ledger hypothetically; if epsilon at the budget's delta would exceed the budget the training ends with
    ``budget_exhausted``. Otherwise every eligible agent is selected independently with probability q
    (a cryptographically seeded draw), as the accountant assumes. An empty sample is still a release
    (closed at once). The round is never topped up with other agents, since that would change the sampling
    the accounting describes (``_private_round_declined`` says what happens when every sampled agent
    declines).
    """
    from trainings.selectors import agents_selectable  # (selectors imports this module)

    eligible = list(agents_selectable().order_by("agent_id"))
    if not eligible:
        if not Alert.objects.filter(
            training=training, round_number=round_.number, kind=Alert.Kind.TOO_FEW_AGENTS
        ).exists():
            alert_raise(
                kind=Alert.Kind.TOO_FEW_AGENTS,
                training=training,
                round_number=round_.number,
                message=f"Round {round_.number} waits: no agent is eligible (active and recently seen).",
            )
        return False
    event, q = budget_next_event(budget, eligible=len(eligible))
    allowed, epsilon = budget_allows(budget, event)
    if not allowed:
        reason = (
            f"privacy budget exhausted: round {round_.number} would take epsilon to {epsilon:.4f}, "
            f"over the budget {budget.epsilon} (delta {budget.delta}); spent {budget.spent_epsilon:.4f}"
        )
        transition_round(round_, RS.CANCELLED, error=reason)
        locked = lock_training(training.pk)
        transition_training(locked, TS.BUDGET_EXHAUSTED, reason=reason)
        _cancel_open_training_tasks(locked)
        alert_raise(
            kind=Alert.Kind.PRIVACY_BUDGET,
            severity=Alert.Severity.CRITICAL,
            training=training,
            round_number=round_.number,
            message=f"Training stopped: {reason}.",
            details={
                "spent_epsilon": budget.spent_epsilon,
                "next_epsilon": epsilon,
                "budget_epsilon": budget.epsilon,
            },
        )
        _broadcast_training_finished(locked)
        log_event(
            logger,
            "budget_exhausted",
            training_id=training.pk,
            round=round_.number,
            spent=f"{budget.spent_epsilon:.4f}",
            next=f"{epsilon:.4f}",
        )
        return False
    rng = np.random.default_rng(secrets.randbits(128))
    selected = [agent for agent in eligible if rng.random() < q]
    round_.metrics = {"privacy_sampling_probability": q, "privacy_eligible_agents": float(len(eligible))}
    round_.save(update_fields=["metrics"])
    transition_round(round_, RS.COLLECTING)
    _issue_tasks(round_, training, config, selected)
    event_broadcast_on_commit(
        training_id=training.pk,
        event="round_opened",
        payload={"round": round_.number, "agents": len(selected)},
    )
    if not selected:  # an empty Poisson sample still releases (noise only); close it now
        _round_settle(round_)
    return True


def rounds_try_open_waiting() -> int:
    """Give every waiting round another chance to find agents. Returns how many opened."""
    opened = 0
    for round_id in Round.objects.filter(status=RS.WAITING, training__status=TS.RUNNING).values_list(
        "pk", flat=True
    ):
        with transaction.atomic():
            round_ = lock_round(round_id)
            if round_.status == RS.WAITING and round_.training.status == TS.RUNNING:
                opened += int(_round_try_select(round_, round_.training))
    return opened


def rounds_try_open_waiting_if_any() -> int:
    """Cheap check on every poll: only does work when some running training waits for agents."""
    if not Round.objects.filter(status=RS.WAITING, training__status=TS.RUNNING).exists():
        return 0
    return rounds_try_open_waiting()


def _cancel_open_training_tasks(training: Training) -> None:
    open_tasks = Task.objects.select_for_update().filter(round__training=training, status__in=list(Task.OPEN))
    for task in open_tasks:
        transition_task(task, KS.CANCELLED)


def _round_settle(round_: Round, *, now: Any = None) -> str:
    """Decide a collecting round (locked by the caller): keep waiting, close, re-open or fail."""
    if round_.status != RS.COLLECTING:
        return "not_collecting"
    if is_asynchronous(round_.training):
        return _asynchronous_round_settle(round_)
    now = now or timezone.now()
    past_deadline = round_.deadline is not None and round_.deadline <= now
    if not past_deadline and Task.objects.filter(round=round_, status__in=list(Task.OPEN)).exists():
        return "waiting"  # the common case on every upload: one cheap query, no rows loaded
    training = round_.training
    config = _configuration(training)
    tasks = list(Task.objects.select_for_update().filter(round=round_))
    completed = sum(1 for t in tasks if t.status == KS.COMPLETED)
    open_tasks = [t for t in tasks if t.status in Task.OPEN]
    if open_tasks and not past_deadline:
        return "waiting"
    for task in open_tasks:
        transition_task(task, KS.EXPIRED, reason="deadline passed")
        agent_record_outcome(agent_id=task.agent_id, outcome="expired")
    if open_tasks:
        _alert_if_agents_dropping(round_, training, tasks, open_tasks)
    private = PrivacyBudget.objects.filter(training=training).exists()
    if private and completed == 0 and any(t.attempt == round_.attempt for t in tasks):
        return _private_round_declined(round_, training, config, tasks)
    if completed >= config.min_clients or private:
        if completed == 0:  # an empty Poisson sample: still a release, accounted like any other
            _alert_round_empty(round_, training)
        transition_round(round_, RS.AGGREGATING)
        aggregation_intent_record(round_)
        log_event(logger, "round_closed", training_id=training.pk, round=round_.number, updates=completed)
        return "closed"
    # Too few updates: re-open with other agents, or give up after the configured attempts.
    if round_.attempt >= config.round_attempts:
        message = (
            f"Round {round_.number} got {completed} of the {config.min_clients} updates it needs after "
            f"{round_.attempt} attempts; the training has failed. "
            "Enrol or start more agents and start a new training."
        )
        transition_round(round_, RS.FAILED, error=message)
        alert_raise(
            kind=Alert.Kind.TRAINING_FAILED,
            severity=Alert.Severity.CRITICAL,
            training=training,
            round_number=round_.number,
            message=message,
        )
        locked = lock_training(training.pk)
        transition_training(locked, TS.FAILED, reason=f"round {round_.number} failed")
        _broadcast_training_finished(locked)
        return "failed"
    missing = config.min_clients - completed
    agents = _select_agents(round_, training, config, config.max_clients - completed)
    alert_raise(
        kind=Alert.Kind.ROUND_FAILED,
        severity=Alert.Severity.WARNING,
        training=training,
        round_number=round_.number,
        message=(
            f"Round {round_.number} has {completed} of the {config.min_clients} updates it needs "
            f"({len(open_tasks)} agents missed the deadline); re-opened with {len(agents)} other agents."
        ),
        details={
            "completed": completed,
            "required": config.min_clients,
            "missing": missing,
            "expired": len(open_tasks),
            "attempt": round_.attempt,
        },
    )
    transition_round(round_, RS.COLLECTING)
    _issue_tasks(round_, training, config, agents)
    return "reopened"


def _alert_round_empty(round_: Round, training: Training) -> None:
    q = float(round_.metrics.get("privacy_sampling_probability", 1.0))
    alert_raise(
        kind=Alert.Kind.ROUND_EMPTY,
        severity=Alert.Severity.INFO,
        training=training,
        round_number=round_.number,
        message=(
            f"Round {round_.number}'s Poisson sample (q={q:.4g}) selected no agent; the round is released "
            "with no update (central DP: noise only) and recorded in the privacy ledger."
        ),
        details={"sampling_probability": q, "attempt": round_.attempt},
    )


def _private_round_declined(
    round_: Round, training: Training, config: TrainingConfiguration, tasks: list[Task]
) -> str:
    """Every agent sampled for a private round's attempt gave its task back or missed the deadline.

    Central DP: the round is released as drawn (noise only over the fixed denominator) and accounted at
    its q. Re-drawing until someone answers would make an agent that always answers far likelier than q
    to be in the released sample, which the amplification by sampling does not cover.
    Local DP (no amplification is claimed, q = 1 in the ledger): nothing was released, so the round is
    re-drawn at the same q, up to ``round_attempts`` attempts.
    Either way, after ``round_attempts`` such attempts (local) or consecutive rounds (central) the training
    fails with the agents' reasons: agents that cannot do what it asks must not spend its budget for ever.
    """
    declined = [t for t in tasks if t.attempt == round_.attempt]
    reasons = sorted({(t.failure_reason or f"task {t.status}")[:200] for t in declined})[:5]
    details = {"declined": len(declined), "attempt": round_.attempt, "reasons": reasons}
    central = PrivacyBudget.objects.filter(training=training, mode=PrivacyBudget.Mode.CENTRAL).exists()
    tries = _declined_round_streak(round_, config) if central else round_.attempt
    if tries >= config.round_attempts:
        scope = "consecutive rounds" if central else "attempts"
        message = (
            f"Round {round_.number}: all {len(declined)} sampled agents declined their tasks or missed the "
            f"deadline, in each of {tries} {scope}; the training has failed. Reasons: "
            f"{'; '.join(reasons)}. Run agents that can do what the training asks and start a new training."
        )
        transition_round(round_, RS.FAILED, error=message)
        alert_raise(
            kind=Alert.Kind.ROUND_DECLINED,
            severity=Alert.Severity.CRITICAL,
            training=training,
            round_number=round_.number,
            message=message,
            details=details,
        )
        locked = lock_training(training.pk)
        transition_training(locked, TS.FAILED, reason=f"round {round_.number}: every sampled agent declined")
        _broadcast_training_finished(locked)
        return "failed"
    what = "released with noise only, as drawn"
    selected: list[Agent] = []
    if not central:
        q = float(round_.metrics.get("privacy_sampling_probability", 1.0))
        rng = np.random.default_rng(secrets.randbits(128))
        from trainings.selectors import agents_selectable  # (selectors imports this module)

        selected = [agent for agent in agents_selectable().order_by("agent_id") if rng.random() < q]
        what = f"re-opened with a fresh sample of {len(selected)} agents"
    alert_raise(
        kind=Alert.Kind.ROUND_DECLINED,
        severity=Alert.Severity.WARNING,
        training=training,
        round_number=round_.number,
        message=(
            f"Round {round_.number}: all {len(declined)} sampled agents declined their tasks or missed the "
            f"deadline ({'; '.join(reasons)}); {what}."
        ),
        details=details,
    )
    if central:
        transition_round(round_, RS.AGGREGATING)
        round_id = round_.pk
        transaction.on_commit(lambda: _enqueue_aggregation(round_id))
        return "closed"
    transition_round(round_, RS.COLLECTING)
    _issue_tasks(round_, training, config, selected)
    if not selected:
        return _round_settle(round_)
    return "reopened"


def _declined_round_streak(round_: Round, config: TrainingConfiguration) -> int:
    """How many rounds in a row, ending with this one, had agents sampled and got no update."""
    previous = (
        Round.objects.filter(training_id=round_.training_id, number__lt=round_.number)
        .annotate(
            num_updates=Count("updates", distinct=True),
            num_tasks=Count("tasks", distinct=True),
        )
        .order_by("-number")
        .values_list("num_updates", "num_tasks")[: config.round_attempts]
    )
    streak = 1
    for num_updates, num_tasks in previous:
        if num_updates or not num_tasks:
            break
        streak += 1
    return streak


def rounds_check_deadlines() -> dict[str, int]:
    """Run by Celery beat: settle rounds past their deadline, retry rounds waiting for agents, and
    expire overdue tasks of asynchronous trainings."""
    summary = {"opened": rounds_try_open_waiting()}
    now = timezone.now()
    summary["expired_async_tasks"] = _expire_asynchronous_tasks(now)
    summary.update(aggregations_recover(now=now))
    due = Round.objects.filter(status=RS.COLLECTING, deadline__lte=now).values_list("pk", flat=True)
    for round_id in due:
        with transaction.atomic():
            outcome = _round_settle(lock_round(round_id), now=now)
        summary[outcome] = summary.get(outcome, 0) + 1
    return summary


def _alert_if_agents_dropping(
    round_: Round, training: Training, tasks: list[Task], expired: list[Task]
) -> None:
    """Alert when the agents that let their tasks expire are more than FEDSITE_DROPOUT_ALERT_FRACTION of
    this attempt's agents. They are not selected again until they poll or heartbeat
    (``trainings.selectors.agents_selectable``)."""
    issued = sum(1 for t in tasks if t.attempt == round_.attempt)
    fraction = len(expired) / max(issued, 1)
    threshold = settings.FEDSITE_DROPOUT_ALERT_FRACTION
    if fraction <= threshold:
        return
    names = sorted(
        Agent.objects.filter(pk__in=[t.agent_id for t in expired]).values_list("agent_id", flat=True)
    )
    alert_raise(
        kind=Alert.Kind.AGENTS_DROPPING,
        severity=Alert.Severity.WARNING,
        training=training,
        round_number=round_.number,
        message=(
            f"Round {round_.number} lost {len(expired)} of its {issued} agents ({fraction:.0%}, over the "
            f"{threshold:.0%} threshold): {', '.join(names)} let their tasks expire. They are not selected "
            "again until they poll or send a heartbeat; check that these agents are running."
        ),
        details={
            "agents": names,
            "expired": len(expired),
            "issued": issued,
            "fraction": fraction,
            "threshold": threshold,
            "attempt": round_.attempt,
        },
    )


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


def _enqueue_aggregation(round_id: int) -> None:
    aggregation_relay(round_id=round_id)  # never raises; the outbox row is retried by the beat check


# ---------------------------------------------------------------------------------------------------
# Tasks and updates (the agent side)
# ---------------------------------------------------------------------------------------------------
def task_next_for_agent(*, agent: Agent) -> Task | None:
    """The agent's oldest open task in a collecting round of a running training, marked delivered."""
    if agent.status != Agent.Status.ACTIVE:  # quarantined since its tasks were issued: hand out none
        return None
    now = timezone.now()
    task = (
        Task.objects.filter(agent=agent, status__in=list(Task.OPEN), deadline__gt=now)
        .filter(round__training__status=TS.RUNNING)
        .filter(
            Q(round__status=RS.COLLECTING) | Q(round__training__algorithm__in=list(ASYNCHRONOUS_ALGORITHMS))
        )
        .order_by("created_at")
        .first()
    )
    if task is None:
        task = _issue_asynchronous_task(agent)
    if task is None:
        return None
    if task.status == KS.PENDING:
        with transaction.atomic():
            locked = Task.objects.select_for_update().get(pk=task.pk)
            if locked.status == KS.PENDING:
                transition_task(locked, KS.DELIVERED)
            task = locked
    return Task.objects.select_related("round__training", "round__base_version", "base_version").get(
        pk=task.pk
    )


def _get_agent_task(agent: Agent, task_id: Any) -> Task:
    try:
        task = Task.objects.select_related("round__training", "agent").get(pk=task_id)
    except (Task.DoesNotExist, ValueError, TypeError, DjangoValidationError) as exc:
        raise NotFound(f"No task with id {task_id!r}.", code="task_not_found") from exc
    if task.agent_id != agent.pk:
        raise Forbidden("This task belongs to another agent.", code="not_your_task")
    return task


def _parse_update_meta(meta: Any) -> tuple[int, dict[str, float]]:
    if isinstance(meta, bytes | str):
        meta = json_parse(meta, field="meta")
    else:
        json_check(meta, field="meta")
    if not isinstance(meta, dict):
        raise ValidationFailed("meta must be a JSON object with num_examples and metrics.")
    num_examples = meta.get("num_examples")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or not 1 <= num_examples <= 10**9:
        raise ValidationFailed(
            f"num_examples must be an integer between 1 and 10^9. Found {num_examples!r}.",
            details={"num_examples": "Out of range or not an integer."},
        )
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ValidationFailed(f"metrics must be an object with at most {MAX_METRICS} numeric entries.")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > 64:
            raise ValidationFailed("metric names must be strings of at most 64 characters.")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValidationFailed(
                f"metric {key!r} must be a finite number. Found {value!r}.", details={"metrics": key}
            )
        clean[key] = float(value)
    return num_examples, clean


def update_max_bytes(training: Training) -> int:
    """Largest acceptable update body: the model's float32 size plus header room, capped by settings."""
    spec = ParameterSpec.from_json(training.parameter_spec)
    header_room = 1024 + 128 * len(spec.tensors)
    return min(spec.nbytes + header_room, settings.FEDSITE_MAX_UPDATE_BYTES)


def _update_too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The update is {size} bytes; this model's updates are at most {limit} bytes.",
        code="update_too_large",
        details={"max_update_bytes": limit},
    )


def update_submit(
    *, agent: Agent, task_id: Any, body: Readable, meta: Any, declared_bytes: int | None = None
) -> tuple[ClientUpdate, bool]:
    """Accept an agent's update for its task. Returns ``(update, created)``.

    ``body`` is read in chunks into a temporary file, hashed and counted in the same pass and cut off
    at the task's ``max_update_bytes`` (a ``declared_bytes`` above it is refused before anything is
    read); the safetensors are then validated from that file, which becomes the blob. Nothing is stored
    and no file is left behind unless the update is accepted. Idempotent: the same body again returns
    the stored update; a different body is a 409.
    """
    task = _get_agent_task(agent, task_id)
    training = task.round.training
    num_examples, metrics = _parse_update_meta(meta)
    limit = update_max_bytes(training)
    if declared_bytes is not None and declared_bytes > limit:
        raise _update_too_large(declared_bytes, limit)
    try:
        with blob_spool(body, max_bytes=limit) as spooled:
            return _update_accept(agent, task, spooled, num_examples, metrics, limit)
    except BlobTooLarge as exc:
        raise _update_too_large(f"more than {limit}", limit) from exc


def _update_accept(
    agent: Agent, task: Task, spooled: SpooledBlob, num_examples: int, metrics: dict[str, float], limit: int
) -> tuple[ClientUpdate, bool]:
    training = task.round.training
    sha256 = spooled.sha256
    existing = ClientUpdate.objects.filter(task=task).first()
    if existing is not None:
        return _idempotent_update(existing, sha256, num_examples), False
    asynchronous = is_asynchronous(training)
    round_closed = task.round.status != RS.COLLECTING and not asynchronous
    if task.status not in Task.OPEN or round_closed or task.deadline <= timezone.now():
        raise Conflict(
            f"Task {task.pk} is closed (task {task.status}, round {task.round.status}); "
            "drop it and poll again.",
            code="task_closed",
        )
    spec = ParameterSpec.from_json(training.parameter_spec)
    try:
        parameters = load_file(spooled.path, spec=spec, max_bytes=limit)
    except SerdeError as exc:
        raise ValidationFailed(str(exc), code=f"bad_update_{exc.code}") from exc
    norm = l2_norm(parameters)
    del parameters
    if not math.isfinite(norm):
        raise ValidationFailed(
            "The update's norm overflows float64; send a smaller update.", code="bad_update_non_finite"
        )
    blob_name = blob_save_spooled(spooled)
    try:
        with transaction.atomic():
            round_ = _collecting_round_for(task, asynchronous)
            locked = Task.objects.select_for_update().get(pk=task.pk)
            existing = ClientUpdate.objects.filter(task=locked).first()
            if existing is not None:
                return _idempotent_update(existing, sha256, num_examples), False
            if locked.status not in Task.OPEN or round_.status != RS.COLLECTING:
                raise Conflict(
                    f"Task {task.pk} closed while the update was being checked; poll again.",
                    code="task_closed",
                )
            update = ClientUpdate.objects.create(
                task=locked,
                round=round_,
                agent=agent,
                blob_name=blob_name,
                blob_sha256=sha256,
                size_bytes=spooled.size,
                num_examples=num_examples,
                metrics=metrics,
                update_norm=norm,
            )
            transition_task(locked, KS.COMPLETED)
            agent_record_outcome(agent_id=agent.pk, outcome="completed")
            _round_settle(round_)
    except IntegrityError:
        existing = ClientUpdate.objects.get(task=task)
        return _idempotent_update(existing, sha256, num_examples), False
    log_event(
        logger,
        "update_accepted",
        training_id=training.pk,
        round=task.round.number,
        agent_id=agent.agent_id,
        num_examples=num_examples,
        norm=f"{norm:.4g}",
    )
    return update, True


def _collecting_round_for(task: Task, asynchronous: bool) -> Round:
    """The round an update joins, locked: the task's own round, or for asynchronous trainings the one
    collecting now (a task may outlive the round it was issued in)."""
    if not asynchronous:
        return lock_round(task.round_id)
    round_ = (
        Round.objects.select_for_update()
        .select_related("training")
        .filter(training_id=task.round.training_id, status=RS.COLLECTING)
        .order_by("-number")
        .first()
    )
    if round_ is None:
        raise Conflict("The training is not collecting updates any more; poll again.", code="task_closed")
    return round_


def _idempotent_update(existing: ClientUpdate, sha256: str, num_examples: int) -> ClientUpdate:
    if existing.blob_sha256 == sha256 and existing.num_examples == num_examples:
        return existing
    raise Conflict(
        "An update with different content was already accepted for this task; updates cannot be replaced.",
        code="update_conflict",
        details={"accepted_sha256": existing.blob_sha256},
    )


def task_fail(*, agent: Agent, task_id: Any, reason: Any) -> Task:
    """The agent gives its task back; the round may re-open sooner."""
    if not isinstance(reason, str) or not reason.strip():
        raise ValidationFailed("reason must be a non-empty string.", details={"reason": "Required."})
    reason = text_check(reason.strip(), field="reason")
    if len(reason) > MAX_FAIL_REASON_CHARS:
        raise ValidationFailed(
            f"reason must be at most {MAX_FAIL_REASON_CHARS} characters. Found {len(reason)}; shorten it.",
            details={"reason": f"At most {MAX_FAIL_REASON_CHARS} characters."},
        )
    task = _get_agent_task(agent, task_id)
    with transaction.atomic():
        round_ = lock_round(task.round_id)
        locked = Task.objects.select_for_update().get(pk=task.pk)
        if locked.status not in Task.OPEN:
            raise Conflict(f"Task {task.pk} is already {locked.status}.", code="task_closed")
        transition_task(locked, KS.FAILED, reason=reason)
        agent_record_outcome(agent_id=agent.pk, outcome="failed")
        _round_settle(round_)
    log_event(
        logger,
        "task_failed",
        training_id=round_.training_id,
        round=round_.number,
        agent_id=agent.agent_id,
        reason=repr(reason[:200]),
    )
    return locked


def agent_may_download(*, agent: Agent, version: ModelVersion) -> bool:
    """An agent may download versions of trainings it has (or had) a task in."""
    return Task.objects.filter(agent=agent, round__training_id=version.training_id).exists()


# ---------------------------------------------------------------------------------------------------
# Aggregation (runs in a Celery worker, queue ``aggregation``)
# ---------------------------------------------------------------------------------------------------
def round_aggregate(*, round_id: int) -> str:
    """Aggregate a closed round into a new version, record metrics, then finish or open the next round.

    Streaming rules and small models are combined here; rules that need all updates at once on large
    models are split into coordinate chunks combined by parallel Celery tasks (``trainings.chunked``),
    whose join calls :func:`round_finish`.
    """
    started = time.time()
    round_ = Round.objects.select_related("training", "base_version").filter(pk=round_id).first()
    if round_ is None or round_.status != RS.AGGREGATING:
        return "skipped"
    training = round_.training
    config = _configuration(training)
    strategy = config.strategy()
    spec = ParameterSpec.from_json(training.parameter_spec)
    if strategy.asynchronous:
        previous = Round.objects.filter(training=training, number=round_.number - 1).first()
        if previous is not None and previous.status == RS.AGGREGATING:
            return "deferred"  # the previous step finishes first; it enqueues this one when done
        # an asynchronous step applies to whatever version is newest now, not the one the round opened on
        current_id = Training.objects.values_list("current_version", flat=True).get(pk=training.pk)
        parent = ModelVersion.objects.get(pk=current_id)
        updates = list(
            ClientUpdate.objects.filter(round=round_)
            .select_related("agent", "task__base_version", "round__base_version")
            .order_by("created_at", "pk")
        )
        new_parameters, new_state, delta, combination_metrics = _asynchronous_step(
            strategy, spec, parent, updates
        )
        return _round_commit(
            round_id,
            parent=parent,
            updates=updates,
            new_parameters=new_parameters,
            new_state=new_state,
            delta=delta,
            combination_metrics=combination_metrics,
            started=started,
        )
    updates = round_updates(round_)
    budget = PrivacyBudget.objects.filter(training=training, mode=PrivacyBudget.Mode.CENTRAL).first()
    if budget is not None:
        new_parameters, new_state, delta, combination_metrics = _central_dp_step(
            strategy, budget, spec, round_.base_version, updates
        )
        return _round_commit(
            round_id,
            parent=round_.base_version,
            updates=updates,
            new_parameters=new_parameters,
            new_state=new_state,
            delta=delta,
            combination_metrics=combination_metrics,
            started=started,
        )
    if not updates and budget is None and PrivacyBudget.objects.filter(training=training).exists():
        # Local DP, empty Poisson sample: no agent released anything, so the version repeats its parent
        # (no server-optimizer step on a zero delta); _round_commit still records the round's event.
        return _round_commit(
            round_id,
            parent=round_.base_version,
            updates=[],
            new_parameters=version_read_parameters(round_.base_version),
            new_state=version_read_state(round_.base_version, strategy),
            delta=spec.zeros(),
            combination_metrics={"num_updates": 0.0},
            started=started,
        )
    if not strategy.streaming and _use_chunked_aggregation(spec, len(updates)):
        from trainings.chunked import dispatch_chunked_aggregation

        dispatch_chunked_aggregation(round_id=round_id, started=started)
        return "dispatched"
    delta, combination_metrics = _combine_updates(strategy, spec, updates)
    return round_finish(
        round_id=round_id, delta=delta, combination_metrics=combination_metrics, started=started
    )


def _central_dp_step(
    strategy: Strategy,
    budget: PrivacyBudget,
    spec: ParameterSpec,
    parent: ModelVersion,
    updates: list[ClientUpdate],
) -> tuple[Any, Any, Any, dict[str, float]]:
    """Client-level central DP (McMahan et al. 2018): clip every stored delta to C, sum them unweighted,
    add N(0, (zC)^2) to the sum, divide by the expected number of agents, then the inner rule's step.

    Only the noised mean ever leaves this function; the noise comes from a generator seeded by the OS's
    cryptographic source, never from the training's seed.
    """
    dp = wrap_central_dp(
        strategy,
        noise_multiplier=budget.noise_multiplier,
        clip_norm=budget.clip_norm,
        expected_clients_per_round=float(budget.expected_clients_per_round),
        adaptive_clipping=budget.adaptive_clipping,
        target_quantile=budget.target_quantile,
        clip_learning_rate=budget.clip_learning_rate,
    )
    state = version_read_state(parent, dp)
    round_dp = dp.for_state(state)
    rng = np.random.default_rng(secrets.randbits(128))
    accumulator = round_dp.accumulator(spec)
    unclipped = 0
    for update in updates:
        scale = round_dp.update_scale(update.update_norm)
        unclipped += round_dp.unclipped_indicator(update.update_norm)
        path = blob_local_path(update.blob_name)
        if path is not None:
            accumulator.add_file(path, 1.0, scale=scale, verified=True)
        else:
            accumulator.add(_update_views(update, spec), 1.0, scale=scale)
    summed = accumulator.sum() if updates else spec.zeros()
    delta = round_dp.noised_mean(summed, len(updates), rng)
    base = version_read_parameters(parent)
    new_parameters, new_state = round_dp.apply(base, delta, state)
    new_state, _ = round_dp.adapt_clip_norm(new_state, unclipped, len(updates), rng)
    # Only DP-safe figures: the exact count of clipped updates is not noised, so it is not published.
    metrics = round_dp.round_metrics(len(updates))
    return new_parameters, new_state, delta, metrics


def _use_chunked_aggregation(spec: ParameterSpec, num_updates: int) -> bool:
    """Split across workers when the updates of a round exceed the configured size (and a worker pool
    exists: eager Celery runs everything in one process anyway)."""
    return num_updates * spec.nbytes > settings.FEDSITE_CHUNKED_AGGREGATION_BYTES


def round_updates(round_: Round) -> list[ClientUpdate]:
    """A synchronous round's updates in a fixed order (by agent id), with their agents."""
    return list(ClientUpdate.objects.filter(round=round_).select_related("agent").order_by("agent__agent_id"))


def round_finish(*, round_id: int, delta: Any, combination_metrics: dict[str, float], started: float) -> str:
    """Apply the server optimizer step to a synchronous round's combined delta and commit the version."""
    round_ = Round.objects.select_related("training", "base_version").get(pk=round_id)
    if round_.status != RS.AGGREGATING:
        return "skipped"
    strategy = _configuration(round_.training).strategy()
    parent = round_.base_version
    updates = round_updates(round_)
    base = version_read_parameters(parent)
    state = version_read_state(parent, strategy)
    new_parameters, new_state = strategy.apply(base, delta, state)
    return _round_commit(
        round_id,
        parent=parent,
        updates=updates,
        new_parameters=new_parameters,
        new_state=new_state,
        delta=delta,
        combination_metrics=combination_metrics,
        started=started,
    )


def _round_commit(
    round_id: int,
    *,
    parent: ModelVersion,
    updates: list[ClientUpdate],
    new_parameters: Any,
    new_state: Any,
    delta: Any,
    combination_metrics: dict[str, float],
    started: float,
) -> str:
    """Write the new version, metrics and events; then finish the training or open the next round."""
    round_ = Round.objects.select_related("training").get(pk=round_id)
    training = round_.training
    config = _configuration(training)
    asynchronous = is_asynchronous(training)
    if not all(np.isfinite(t).all() for t in new_parameters.values()):
        raise FlcoreError("the aggregated model has non-finite values")
    metrics = _round_metrics(updates, delta_norm=l2_norm(delta))
    metrics.update({f"strategy_{key}": value for key, value in combination_metrics.items()})
    metrics.update(_central_evaluation(config, training, new_parameters))
    metrics["aggregation_seconds"] = time.time() - started

    with transaction.atomic():
        round_ = lock_round(round_id)
        if round_.status != RS.AGGREGATING:
            return "skipped"
        training = lock_training(round_.training_id)
        budget = PrivacyBudget.objects.select_for_update().filter(training=training).first()
        if budget is not None:
            q = float(round_.metrics.get("privacy_sampling_probability", 1.0))
            entry = ledger_record(budget=budget, round_number=round_.number, sampling_probability=q)
            metrics["privacy_sampling_probability"] = q
            metrics["privacy_epsilon_spent"] = entry.epsilon_after
        version = version_create(
            training=training,
            number=round_.number,
            parameters=new_parameters,
            origin=ModelVersion.Origin.AGGREGATION,
            parent=parent,
            metrics=metrics,
            state=new_state.to_bytes(),
        )
        if round_.opened_at is not None:
            metrics["round_seconds"] = (timezone.now() - round_.opened_at).total_seconds()
        round_.metrics = metrics
        round_.save(update_fields=["metrics"])
        transition_round(round_, RS.COMPLETED)
        aggregation_intent_complete(round_)
        metrics_record(training=training, round_number=round_.number, values=metrics)
        training.current_version = version
        accuracy = metrics.get("accuracy", metrics.get("federated_accuracy"))
        if accuracy is not None and (training.best_accuracy is None or accuracy > training.best_accuracy):
            training.best_accuracy = accuracy
        training.save(update_fields=["current_version", "best_accuracy"])
        event_broadcast_on_commit(
            training_id=training.pk,
            event="round_completed",
            payload={"round": round_.number, "version": version.number, "metrics": metrics},
        )
        log_event(
            logger,
            "round_completed",
            training_id=training.pk,
            round=round_.number,
            updates=len(updates),
            accuracy=accuracy,
        )
        rollback_policy_check(training=training, round_number=round_.number)
        if asynchronous:
            for update in updates:
                ClientUpdate.objects.filter(pk=update.pk).update(staleness=update.staleness)
            next_number = round_.number + 1
            training_pk = training.pk
            transaction.on_commit(lambda: _enqueue_if_aggregating(training_pk, next_number))
        if training.status != TS.RUNNING:
            return "completed_after_stop"
        reason = ""
        if config.target_accuracy is not None and accuracy is not None and accuracy >= config.target_accuracy:
            reason = f"reached target accuracy {config.target_accuracy} (accuracy {accuracy:.4f})"
        elif round_.number >= config.max_rounds:
            reason = f"reached max_rounds {config.max_rounds}"
        if reason:
            transition_training(training, TS.COMPLETED, reason=reason)
            for open_round in Round.objects.select_for_update().filter(
                training=training, status__in=[RS.WAITING, RS.COLLECTING]
            ):
                transition_round(open_round, RS.CANCELLED, error=reason)
            _cancel_open_training_tasks(training)
            _broadcast_training_finished(training)
            log_event(logger, "training_completed", training_id=training.pk, reason=repr(reason))
            return "training_completed"
        if not asynchronous:  # an asynchronous training opened its next round when this one closed
            _round_open_next(training)
    return "next_round"


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


def _update_views(update: ClientUpdate, spec: ParameterSpec) -> Any:
    """The stored delta of an update: zero-copy memory-mapped views when the blob store is local."""
    path = blob_local_path(update.blob_name)
    if path is not None:
        return dict(iter_file_tensors(path))
    return from_bytes(blob_read(update.blob_name), spec=spec, max_bytes=update.size_bytes)


def _combine_updates(
    strategy: Strategy, spec: ParameterSpec, updates: list[ClientUpdate]
) -> tuple[Any, dict[str, float]]:
    """Combine a round's stored deltas into one pseudo-gradient with the training's strategy.

    Streaming rules read one update at a time into one accumulator (memory O(model)); rules that need
    all updates at once combine coordinate chunks of memory-mapped updates (memory O(n x chunk)).
    """
    strategy.check_num_updates(len(updates))
    if strategy.streaming:
        accumulator = strategy.accumulator(spec)
        clipped = 0
        for update in updates:
            weight = strategy.update_weight(update.num_examples, update.update_norm)
            scale = strategy.update_scale(update.update_norm)
            clipped += int(scale < 1.0)
            path = blob_local_path(update.blob_name)
            if path is not None:
                accumulator.add_file(path, weight, scale=scale, verified=True)  # validated at upload
            else:
                accumulator.add(_update_views(update, spec), weight, scale=scale)
        metrics = {"num_updates": float(len(updates))}
        if strategy.needs_norms:
            metrics["num_clipped"] = float(clipped)
        return accumulator.result(), metrics
    deltas = [_update_views(update, spec) for update in updates]
    return strategy.combine(deltas, [update.num_examples for update in updates])


def _round_metrics(updates: list[ClientUpdate], *, delta_norm: float) -> dict[str, float]:
    """Weighted means of what agents reported (federated evaluation of the round's base version)."""
    metrics: dict[str, float] = {
        "num_agents_reporting": float(len(updates)),
        "num_examples": float(sum(u.num_examples for u in updates)),
        "update_norm_mean": float(np.mean([u.update_norm for u in updates])) if updates else 0.0,
        "global_update_norm": delta_norm,
    }
    eval_weight = sum(u.metrics.get("eval_num_examples", 0.0) for u in updates)
    if eval_weight > 0:
        for key, target in (("eval_accuracy", "federated_accuracy"), ("eval_loss", "federated_loss")):
            pairs = [
                (u.metrics[key], u.metrics.get("eval_num_examples", 0.0)) for u in updates if key in u.metrics
            ]
            weight = sum(w for _, w in pairs)
            if weight > 0:
                metrics[target] = sum(v * w for v, w in pairs) / weight
    train_weight = sum(u.num_examples for u in updates if "train_loss" in u.metrics)
    if train_weight:
        metrics["train_loss"] = (
            sum(u.metrics["train_loss"] * u.num_examples for u in updates if "train_loss" in u.metrics)
            / train_weight
        )
    return metrics


def _central_evaluation(
    config: TrainingConfiguration, training: Training, parameters: Any
) -> dict[str, float]:
    """Server-side evaluation on a public test split, when the training names one."""
    if not config.evaluation_dataset:
        return {}
    from trainings.evaluation import evaluate_on_dataset

    loss, accuracy = evaluate_on_dataset(training.model_spec, parameters, config.evaluation_dataset)
    return {"loss": loss, "accuracy": accuracy}


def round_mark_aggregation_failed(*, round_id: int, error: str) -> None:
    """After the last retry: fail the round and the training, with a critical alert."""
    with transaction.atomic():
        round_ = lock_round(round_id)
        if round_.status != RS.AGGREGATING:
            return
        transition_round(round_, RS.FAILED, error=error[:2000])
        aggregation_intent_complete(round_)
        alert_raise(
            kind=Alert.Kind.AGGREGATION_FAILED,
            severity=Alert.Severity.CRITICAL,
            training=round_.training,
            round_number=round_.number,
            message=f"Aggregation of round {round_.number} failed: {error[:500]}",
        )
        training = lock_training(round_.training_id)
        if training.status == TS.RUNNING:
            transition_training(training, TS.FAILED, reason=f"aggregation of round {round_.number} failed")
            _broadcast_training_finished(training)
