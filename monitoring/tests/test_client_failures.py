"""The ``client_failures`` alert, raised by an agent really failing its tasks over the agent protocol, and
the convergence status on the status document."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from flcore.parameters import ParameterSpec
from monitoring.models import Alert
from monitoring.services import metrics_record


def _task(client: Any, token: str) -> dict[str, Any]:
    response = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    return response.json()


def _fail(client: Any, token: str, capture: Any) -> None:
    task = _task(client, token)
    with capture(execute=True):
        response = client.post(
            f"/api/v1/agent/tasks/{task['task_id']}/fail",
            {"reason": "out of memory"},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
    assert response.status_code == 200, response.content


@pytest.mark.django_db
def test_an_agent_failing_its_tasks_raises_one_alert_that_counts_repeats_and_resolves_itself(
    settings: Any,
    client: Any,
    staff_client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    rest_round: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    settings.FEDSITE_ALERT_CLIENT_FAILURE_WINDOW = 4
    settings.FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS = 3
    settings.FEDSITE_ALERT_CLIENT_FAILURE_RATE = 0.5
    agent, token = make_agent("flaky")
    training = make_training(
        min_clients_per_round=1, max_clients_per_round=1, max_rounds=5, max_round_attempts=10
    )
    spec = ParameterSpec.from_json(training.parameter_spec)
    capture = django_capture_on_commit_callbacks
    alerts = Alert.objects.filter(kind=Alert.Kind.CLIENT_FAILURES, subject="agent:flaky")

    def complete() -> None:
        delta = {t.name: np.full(t.shape, 0.01, dtype=np.float32) for t in spec.tensors}
        rest_round(training, [(agent, token)], lambda index, base: (delta, 5, None))

    _fail(client, token, capture)
    _fail(client, token, capture)
    assert not alerts.exists()  # two finished tasks: fewer than MIN_TASKS
    _fail(client, token, capture)
    alert = alerts.get()
    assert alert.resolved_at is None and alert.count == 1
    assert alert.details == {"agent_id": "flaky", "tasks": 3, "failed": 3, "expired": 0, "rate": 1.0}

    complete()  # last four: 1 done, 3 failed -> 75 %
    complete()  # 2 done, 2 failed -> 50 %, still at the threshold
    alert.refresh_from_db()
    assert alert.count == 3 and alert.resolved_at is None and alerts.count() == 1

    complete()  # 3 done, 1 failed -> 25 %
    alert.refresh_from_db()
    assert alert.resolved_at is not None and "25%" in alert.resolution

    listed = staff_client.get("/api/alerts?open=0").json()["alerts"]
    assert any(a["kind"] == "client_failures" and a["subject"] == "agent:flaky" for a in listed)
    acknowledged = staff_client.post(f"/api/alerts/{alert.pk}/acknowledge")
    assert acknowledged.status_code == 200, acknowledged.content


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("values", "status"),
    [
        ([0.5, 0.6, 0.7, 0.8, 0.9], "improving"),
        ([0.9, 0.8, 0.7, 0.6, 0.5], "diverging"),
        ([0.8, 0.8, 0.8, 0.8, 0.8], "converged"),
        ([0.8, 0.9], "insufficient_data"),
    ],
)
def test_status_document_carries_the_convergence_status(
    staff_client: Any, make_training: Any, values: list[float], status: str
) -> None:
    training = make_training(start=False)
    for number, value in enumerate(values, start=1):
        metrics_record(training=training, round_number=number, values={"accuracy": value})

    response = staff_client.get(f"/api/training/{training.pk}/status")

    assert response.status_code == 200, response.content
    convergence = response.json()["convergence"]
    assert convergence["status"] == status and convergence["metric"] == "accuracy"
    assert convergence["latest"] == values[-1]


@pytest.mark.django_db
def test_agents_evaluated_together_each_get_what_their_own_last_tasks_say(
    settings: Any, make_agent: Any, make_training: Any
) -> None:
    """``agents_failures_evaluate`` of many agents against the rule applied by hand to each agent's
    history (random outcomes, some with an open alert), in a fixed number of statements; and
    ``agents_record_outcome`` counts an agent listed twice twice."""
    import random
    from datetime import timedelta

    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from clients.models import Agent
    from clients.services import agents_record_outcome
    from monitoring.services import agents_failures_evaluate, alert_raise
    from trainings.models import Round, Task

    settings.FEDSITE_ALERT_CLIENT_FAILURE_WINDOW = 5
    settings.FEDSITE_ALERT_CLIENT_FAILURE_MIN_TASKS = 3
    settings.FEDSITE_ALERT_CLIENT_FAILURE_RATE = 0.4
    ks = Task.Status
    rng = random.Random(12)
    make_agent(), make_agent()
    template = Task.objects.filter(round__training=make_training()).first()
    assert template is not None
    round_ = Round.objects.get(pk=template.round_id)
    now = timezone.now()
    agents: dict[Any, str] = {}
    expected: dict[Any, str] = {}
    for n in range(12):
        agent, _ = make_agent(f"history-{n:02d}", online=False)
        outcomes = [
            rng.choice([ks.COMPLETED, ks.COMPLETED, ks.FAILED, ks.EXPIRED]) for _ in range(rng.randint(0, 9))
        ]
        for k, status in enumerate(outcomes):  # the last one finished last
            Task.objects.create(
                round=round_,
                agent=agent,
                attempt=k + 1,
                status=status,
                base_version_id=template.base_version_id,
                deadline=now,
                completed_at=now - timedelta(minutes=len(outcomes) - k),
            )
        Task.objects.create(  # an open task: not counted
            round=round_,
            agent=agent,
            attempt=len(outcomes) + 1,
            status=ks.DELIVERED,
            base_version_id=template.base_version_id,
            deadline=now,
        )
        alerted = rng.random() < 0.5
        if alerted:
            alert_raise(kind=Alert.Kind.CLIENT_FAILURES, subject=f"agent:{agent.agent_id}", message="earlier")
        last = outcomes[::-1][:5]
        rate = sum(s != ks.COMPLETED for s in last) / max(len(last), 1)
        if len(last) < 3:
            expected[agent.pk] = "unchanged"
        elif rate >= 0.4:
            expected[agent.pk] = "raised"
        else:
            expected[agent.pk] = "resolved" if alerted else "unchanged"
        agents[agent.pk] = agent.agent_id
    assert set(expected.values()) == {"unchanged", "raised", "resolved"}  # the history covers every case

    with CaptureQueriesContext(connection) as context:
        results = agents_failures_evaluate(agents=agents)

    assert results == expected
    for pk, name in agents.items():
        alert = Alert.objects.filter(kind=Alert.Kind.CLIENT_FAILURES, subject=f"agent:{name}").first()
        if expected[pk] == "resolved":
            assert alert is not None and alert.resolved_at is not None
        if expected[pk] == "raised":
            assert alert is not None and alert.resolved_at is None
    statements = [q["sql"] for q in context.captured_queries]
    assert sum('FROM "trainings_task"' in sql for sql in statements) == 1  # every agent's last tasks at once
    assert sum('"monitoring_alert"."subject" IN' in sql for sql in statements) == 1  # and what to resolve

    first, second = list(agents)[:2]
    agents_record_outcome(agent_ids=[first, second, first], outcome="failed")
    assert Agent.objects.get(pk=first).tasks_failed == 2
    assert Agent.objects.get(pk=second).tasks_failed == 1
