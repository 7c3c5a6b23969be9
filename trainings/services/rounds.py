"""Rounds: opening one, and settling it (keep waiting, close, re-open or fail).

Invariants:

- A round's status changes only through ``trainings.state.transition_round`` on a row locked by the
  caller; ``_round_settle`` runs inside the caller's transaction with the round locked, and its common
  case (tasks still open before the deadline) is one query that loads no rows.
- A synchronous round opens only with at least ``min_clients`` eligible agents (else it waits, with one
  ``too_few_agents`` alert); a private round is never topped up with other agents and never opened when
  its event would overspend the budget (the training ends with ``budget_exhausted`` instead).
- A round that closes records its aggregation intent in the same transaction (``trainings.outbox``), so
  the aggregation is relayed after commit or, failing that, by the beat check.
- A round that gets too few updates re-opens with other agents up to ``round_attempts`` attempts, then
  fails the training; every expired task counts against its agent's reliability.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import Count
from django.utils import timezone

from clients.models import Agent
from clients.services import agent_record_outcome
from fedsite.logs import log_event
from monitoring.events import event_broadcast_on_commit
from monitoring.models import Alert
from monitoring.services import alert_raise
from privacy.models import PrivacyBudget
from privacy.services import budget_allows, budget_next_event
from trainings.configuration import TrainingConfiguration
from trainings.models import Round, Task, Training
from trainings.outbox import (
    aggregation_intent_record,
    aggregation_relay,
    aggregations_recover,
)
from trainings.services.tasks import _issue_tasks, _select_agents
from trainings.services.trainings import (
    _broadcast_training_finished,
    _cancel_open_training_tasks,
    _configuration,
    is_asynchronous,
)
from trainings.state import (
    PLAIN,
    lock_round,
    lock_training,
    transition_round,
    transition_task,
    transition_training,
)

logger = logging.getLogger("trainings")

TS, RS, KS = Training.Status, Round.Status, Task.Status


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


def _round_try_select(round_: Round, training: Training) -> bool:
    """WAITING -> COLLECTING if at least the minimum of agents is eligible; else alert once and wait."""
    config = _configuration(training)
    if config.secure_aggregation is not None:  # the secagg protocol's phases (trainings/services/secagg.py)
        from trainings.services.secagg import secagg_round_try_open

        return secagg_round_try_open(round_, training, config)
    budget = PrivacyBudget.objects.filter(training=training).first()
    if budget is not None:
        return _round_open_private(round_, training, config, budget)
    agents = _select_agents(round_, training, config, config.max_clients)
    if len(agents) < config.min_clients:
        _alert_too_few_agents_once(
            round_,
            training,
            f"Round {round_.number} needs {config.min_clients} agents but only {len(agents)} are "
            "eligible (active and recently seen); it will start as soon as enough agents poll.",
            details={"eligible": len(agents), "required": config.min_clients},
        )
        return False
    transition_round(round_, RS.COLLECTING)
    _issue_tasks(round_, training, config, agents)
    event_broadcast_on_commit(
        training_id=training.pk, event="round_opened", payload={"round": round_.number, "agents": len(agents)}
    )
    return True


def _alert_too_few_agents_once(
    round_: Round, training: Training, message: str, *, details: dict[str, Any] | None = None
) -> None:
    """The ``too_few_agents`` warning of a round that waits for agents: raised once per round (the rounds
    sweep retries the opening every few seconds, and each retry would otherwise count a repeat)."""
    if Alert.objects.filter(
        training=training, round_number=round_.number, kind=Alert.Kind.TOO_FEW_AGENTS
    ).exists():
        return
    alert_raise(
        kind=Alert.Kind.TOO_FEW_AGENTS,
        severity=Alert.Severity.WARNING,
        training=training,
        round_number=round_.number,
        message=message,
        details=details,
    )


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
        _alert_too_few_agents_once(
            round_, training, f"Round {round_.number} waits: no agent is eligible (active and recently seen)."
        )
        return False
    event, q = budget_next_event(budget, eligible=len(eligible))
    allowed, epsilon = budget_allows(budget, event)
    if not allowed:
        return _round_budget_exhausted(round_, training, budget, epsilon)
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


def _round_budget_exhausted(round_: Round, training: Training, budget: PrivacyBudget, epsilon: float) -> bool:
    """The round (waiting, locked) would overspend: cancel it and end the training ``budget_exhausted``."""
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


def _round_settle(round_: Round, *, now: Any = None) -> str:
    """Decide a collecting round (locked by the caller): keep waiting, close, re-open or fail."""
    from trainings.services.asynchronous import _asynchronous_round_settle  # (it imports this module)

    if round_.status != RS.COLLECTING:
        from trainings.services.secagg import ROUND_STATES, secagg_round_settle

        return secagg_round_settle(round_, now=now) if round_.status in ROUND_STATES else "not_collecting"
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
        agent_record_outcome(agent_id=task.agent_id, outcome="expired", training=training)
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
        return _round_fail_training(round_, training, message)
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


def _round_fail_training(round_: Round, training: Training, message: str, *, protocol: str = PLAIN) -> str:
    """The round's last attempt failed: fail it and the training, with a critical alert."""
    transition_round(round_, RS.FAILED, error=message, protocol=protocol)
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
        # A fresh Poisson sample of every eligible agent, those who just declined or expired included: the
        # re-draw must not depend on who answered (privacy/tests/test_sampling.py checks its rate).
        from clients.selectors import agents_eligible

        selected = [agent for agent in agents_eligible().order_by("agent_id") if rng.random() < q]
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
    from trainings.services.asynchronous import _expire_asynchronous_tasks  # (it imports this module)

    summary = {"opened": rounds_try_open_waiting()}
    now = timezone.now()
    summary["expired_async_tasks"] = _expire_asynchronous_tasks(now)
    summary.update(aggregations_recover(now=now))
    from trainings.services.secagg import secagg_rounds_check_deadlines

    summary.update(secagg_rounds_check_deadlines(now))
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


def _enqueue_aggregation(round_id: int) -> None:
    aggregation_relay(round_id=round_id)  # never raises; the outbox row is retried by the beat check
