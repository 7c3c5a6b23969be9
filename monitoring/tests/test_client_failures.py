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
