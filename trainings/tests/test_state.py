"""State machines: legal moves pass, illegal ones raise and change nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from trainings import services
from trainings.models import Round, Task, Training
from trainings.state import (
    ROUND_TRANSITIONS,
    IllegalTransition,
    lock_round,
    lock_training,
    transition_round,
    transition_training,
)


@pytest.mark.django_db
def test_illegal_training_transition_is_refused(make_training: Any) -> None:
    training = make_training(start=False)
    with pytest.raises(IllegalTransition, match="from 'pending' to 'completed'"), transaction.atomic():
        transition_training(lock_training(training.pk), Training.Status.COMPLETED)
    training.refresh_from_db()
    assert training.status == Training.Status.PENDING


@pytest.mark.django_db(transaction=True)
def test_transition_outside_a_transaction_is_a_programming_error(make_training: Any) -> None:
    training = make_training(start=False)
    with pytest.raises(RuntimeError):
        transition_training(training, Training.Status.RUNNING)


@pytest.mark.django_db
def test_every_round_state_outside_the_table_is_refused(make_agent: Any, make_training: Any) -> None:
    make_agent(), make_agent()
    training = make_training()
    round_ = training.rounds.get()
    assert round_.status == Round.Status.COLLECTING
    for target in Round.Status.values:
        if target in ROUND_TRANSITIONS[Round.Status.COLLECTING]:
            continue
        with pytest.raises(IllegalTransition), transaction.atomic():
            transition_round(lock_round(round_.pk), target)
    round_.refresh_from_db()
    assert round_.status == Round.Status.COLLECTING


@pytest.mark.django_db
def test_stop_cancels_round_and_open_tasks_and_second_stop_conflicts(
    make_agent: Any, make_training: Any
) -> None:
    make_agent(), make_agent()
    training = make_training()
    services.training_stop(training_id=training.pk, actor="tester")
    training.refresh_from_db()
    assert training.status == Training.Status.STOPPED
    assert training.rounds.get().status == Round.Status.CANCELLED
    assert not Task.objects.filter(round__training=training, status__in=list(Task.OPEN)).exists()
    from fedsite.errors import Conflict

    with pytest.raises(Conflict):
        services.training_stop(training_id=training.pk)


@pytest.mark.django_db
def test_deadline_with_too_few_updates_reopens_with_other_agents(make_agent: Any, make_training: Any) -> None:
    agents = [make_agent()[0] for _ in range(4)]
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_round_attempts=3)
    round_ = training.rounds.get()
    first = set(round_.tasks.values_list("agent_id", flat=True))
    assert len(first) == 2
    Round.objects.filter(pk=round_.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    summary = services.rounds_check_deadlines()
    assert summary.get("reopened") == 1
    round_.refresh_from_db()
    assert round_.status == Round.Status.COLLECTING and round_.attempt == 2
    second = set(round_.tasks.filter(attempt=2).values_list("agent_id", flat=True))
    assert second == {a.pk for a in agents} - first  # other agents first
    assert round_.tasks.filter(attempt=1, status=Task.Status.EXPIRED).count() == 2
    assert training.alerts.filter(kind="round_failed").count() == 1
    # the expired agents' reliability dropped
    for agent in agents:
        agent.refresh_from_db()
    assert sorted(a.tasks_expired for a in agents) == [0, 0, 1, 1]


@pytest.mark.django_db
def test_round_fails_training_after_max_attempts(make_agent: Any, make_training: Any) -> None:
    make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_round_attempts=1)
    round_ = training.rounds.get()
    Round.objects.filter(pk=round_.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    services.rounds_check_deadlines()
    training.refresh_from_db()
    round_.refresh_from_db()
    assert round_.status == Round.Status.FAILED
    assert training.status == Training.Status.FAILED
    assert training.alerts.filter(kind="training_failed", severity="critical").exists()


@pytest.mark.django_db
@override_settings(FEDSITE_AGENT_TIMEOUT=60)
def test_agents_not_seen_recently_are_not_selected(make_agent: Any, make_training: Any) -> None:
    from clients.models import Agent

    stale, _ = make_agent()
    Agent.objects.filter(pk=stale.pk).update(last_seen_at=timezone.now() - timedelta(seconds=120))
    make_agent(), make_agent()
    training = make_training(min_clients_per_round=2, max_clients_per_round=3)
    assert stale.pk not in set(training.rounds.get().tasks.values_list("agent_id", flat=True))
    assert training.rounds.get().tasks.count() == 2


@pytest.mark.django_db
def test_selection_is_deterministic_for_a_seed(make_agent: Any, make_training: Any) -> None:
    for _ in range(8):
        make_agent()
    a = make_training(seed=7, min_clients_per_round=3, max_clients_per_round=3)
    chosen_a = sorted(a.rounds.get().tasks.values_list("agent__agent_id", flat=True))
    services.training_stop(training_id=a.pk)
    b = make_training(seed=7, min_clients_per_round=3, max_clients_per_round=3)
    chosen_b = sorted(b.rounds.get().tasks.values_list("agent__agent_id", flat=True))
    assert chosen_a == chosen_b
