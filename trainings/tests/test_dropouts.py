"""Agents that let a task expire: not selected again until they show life, and an agents_dropping alert.

The experiment behind it: three agents were killed; they stayed "recently seen" for the 90 s agent timeout,
so the next two rounds picked them again and each waited its full deadline.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from monitoring.models import Alert
from trainings import services
from trainings.models import Round, Task, Training
from trainings.selectors import agents_selectable
from trainings.tests.agent_rest import constant_delta, next_task, post_update


def _upload(client: Any, token: str, task: dict[str, Any], training: Training) -> Any:
    return post_update(client, token, task, constant_delta(training, 0.1), num_examples=5, metrics={})


def _run_round(client: Any, training: Training, number: int, alive: dict[str, str], capture: Any) -> set[str]:
    """The agents in ``alive`` poll and upload; the others' tasks run past the deadline. Returns the agent
    ids the round had tasks for."""
    round_ = Round.objects.get(training=training, number=number)
    selected = set(Task.objects.filter(round=round_).values_list("agent__agent_id", flat=True))
    with capture(execute=True):
        for agent_id in sorted(selected & alive.keys()):
            response = next_task(client, alive[agent_id])
            assert response.status_code == 200, response.content
            assert _upload(client, alive[agent_id], response.json(), training).status_code == 201
        Round.objects.filter(pk=round_.pk).update(deadline=timezone.now() - timedelta(seconds=1))
        services.rounds_check_deadlines()
    round_.refresh_from_db()
    assert round_.status == Round.Status.COMPLETED
    return selected


@pytest.mark.django_db
def test_an_agent_that_let_its_task_expire_is_skipped_until_it_polls_again(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    agents = {agent.agent_id: token for agent, token in (make_agent(f"drop-{i}") for i in range(3))}
    training = make_training(min_clients_per_round=2, max_clients_per_round=3, max_rounds=3)
    alive = {k: v for k, v in agents.items() if k != "drop-2"}

    # round 1: all three are selected; drop-2 dies (it polled once, then never again)
    assert next_task(client, agents["drop-2"]).status_code == 200
    assert _run_round(client, training, 1, alive, django_capture_on_commit_callbacks) == set(agents)
    assert Task.objects.get(round__number=1, agent__agent_id="drop-2").status == Task.Status.EXPIRED
    alert = Alert.objects.get(training=training, kind=Alert.Kind.AGENTS_DROPPING)
    assert alert.round_number == 1 and alert.details["agents"] == ["drop-2"]
    assert "drop-2" in alert.message

    # round 2 opened at once without drop-2, although it is still "recently seen" (agent timeout 90 s)
    round_two = Round.objects.get(training=training, number=2)
    assert set(round_two.tasks.values_list("agent__agent_id", flat=True)) == {"drop-0", "drop-1"}
    assert "drop-2" not in set(agents_selectable().values_list("agent_id", flat=True))

    # it comes back (a poll after the expiry): the next round may pick it again
    assert next_task(client, agents["drop-2"]).status_code == 204
    assert "drop-2" in set(agents_selectable().values_list("agent_id", flat=True))
    assert _run_round(client, training, 2, alive, django_capture_on_commit_callbacks) == {"drop-0", "drop-1"}
    assert Alert.objects.filter(kind=Alert.Kind.AGENTS_DROPPING).count() == 1  # nobody dropped in round 2
    assert _run_round(client, training, 3, agents, django_capture_on_commit_callbacks) == set(agents)
    training.refresh_from_db()
    assert training.status == Training.Status.COMPLETED


@pytest.mark.django_db
@override_settings(FEDSITE_DROPOUT_ALERT_FRACTION=0.5)
def test_dropouts_under_the_threshold_raise_no_alert(
    client: Any,
    make_agent: Any,
    make_training: Any,
    django_capture_on_commit_callbacks: Any,
    eager_celery: Any,
) -> None:
    agents = {agent.agent_id: token for agent, token in (make_agent(f"few-{i}") for i in range(3))}
    training = make_training(min_clients_per_round=2, max_clients_per_round=3, max_rounds=1)
    alive = {k: v for k, v in agents.items() if k != "few-0"}
    _run_round(client, training, 1, alive, django_capture_on_commit_callbacks)  # lost 1 of 3: 33% <= 50%
    assert not Alert.objects.filter(kind=Alert.Kind.AGENTS_DROPPING).exists()
