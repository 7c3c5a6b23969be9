"""Asynchronous trainings over REST: tasks on demand from the newest version, staleness-weighted steps.

Agents poll and upload at different speeds: a slow agent's update, computed from an older version, joins
a later buffer and is discounted by its staleness. Expected values are worked out from the papers'
formulas in the test (FedBuff: Nguyen et al. 2022, Algorithm 1; FedAsync: Xie et al. 2019, eq. 2).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from flcore.parameters import ParameterSpec
from trainings.models import ClientUpdate, Round, Task, Training
from trainings.tests.agent_rest import post_update
from versioning.services import version_read_parameters


def _poll(client: Any, token: str) -> dict[str, Any]:
    response = client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    return response.json()


def _delta(spec: ParameterSpec, value: float) -> dict[str, np.ndarray]:
    return {t.name: np.full(t.shape, value, dtype=np.float32) for t in spec.tensors}


def _upload(
    client: Any, token: str, task: dict[str, Any], delta: dict[str, np.ndarray], capture: Any
) -> None:
    with capture(execute=True):
        response = post_update(client, token, task, delta, num_examples=7)
    assert response.status_code == 201, response.content


@pytest.mark.django_db
def test_fedbuff_slow_agent_is_discounted_by_staleness(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    (_, fast), (_, medium), (_, slow) = make_agent(), make_agent(), make_agent()
    training = make_training(
        algorithm="fedbuff",
        hyperparameters={"buffer_size": 2},
        min_clients_per_round=1,
        max_clients_per_round=3,
        max_rounds=2,
    )
    spec = ParameterSpec.from_json(training.parameter_spec)
    v0 = version_read_parameters(training.current_version)
    # all three start from version 0
    tasks = {
        name: _poll(client, token) for name, token in (("fast", fast), ("medium", medium), ("slow", slow))
    }
    assert {t["model"]["number"] for t in tasks.values()} == {0}
    _upload(client, fast, tasks["fast"], _delta(spec, 1.0), django_capture_on_commit_callbacks)
    assert training.rounds.get(number=1).status == Round.Status.COLLECTING  # buffer 1 of 2
    _upload(client, medium, tasks["medium"], _delta(spec, 3.0), django_capture_on_commit_callbacks)
    assert training.rounds.get(number=1).status == Round.Status.COMPLETED
    v1 = version_read_parameters(training.versions.get(number=1))
    for name in v0:  # (1/K) * (s(0)*1 + s(0)*3) with s(0) = 1
        np.testing.assert_allclose(v1[name], v0[name] + 2.0, atol=1e-6)
    # the fast agent comes back and trains from the newest version
    again = _poll(client, fast)
    assert again["model"]["number"] == 1
    _upload(client, fast, again, _delta(spec, 2.0), django_capture_on_commit_callbacks)
    _upload(client, slow, tasks["slow"], _delta(spec, 4.0), django_capture_on_commit_callbacks)
    v2 = version_read_parameters(training.versions.get(number=2))
    expected_step = (1.0 * 2.0 + (1 / math.sqrt(2.0)) * 4.0) / 2  # slow update is 1 version stale
    for name in v0:
        np.testing.assert_allclose(v2[name], v1[name] + expected_step, atol=1e-5)
    stalenesses = {
        str(task_id): staleness
        for task_id, staleness in ClientUpdate.objects.filter(
            round__number=2, round__training=training
        ).values_list("task_id", "staleness")
    }
    assert stalenesses == {again["task_id"]: 0, tasks["slow"]["task_id"]: 1}
    training.refresh_from_db()
    assert training.status == Training.Status.COMPLETED
    assert not Task.objects.filter(round__training=training, status__in=list(Task.OPEN)).exists()


@pytest.mark.django_db
def test_fedasync_mixes_each_client_model_with_a_staleness_discount(
    client: Any,
    make_agent: Any,
    make_training: Any,
    eager_celery: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    (_, fast), (_, slow) = make_agent(), make_agent()
    training = make_training(
        algorithm="fedasync",
        hyperparameters={"mixing": 0.5},
        min_clients_per_round=1,
        max_clients_per_round=2,
        max_rounds=5,
    )
    spec = ParameterSpec.from_json(training.parameter_spec)
    v0 = version_read_parameters(training.current_version)
    task_fast, task_slow = _poll(client, fast), _poll(client, slow)
    _upload(client, fast, task_fast, _delta(spec, 2.0), django_capture_on_commit_callbacks)
    v1 = version_read_parameters(training.versions.get(number=1))
    for name in v0:  # (1 - a) v0 + a (v0 + 2), a = 0.5 * s(0) = 0.5
        np.testing.assert_allclose(v1[name], v0[name] + 1.0, atol=1e-6)
    _upload(client, slow, task_slow, _delta(spec, 4.0), django_capture_on_commit_callbacks)
    v2 = version_read_parameters(training.versions.get(number=2))
    alpha = 0.5 / math.sqrt(2.0)  # staleness 1, polynomial s(t) = (t + 1)^-0.5
    for name in v0:
        expected = (1 - alpha) * v1[name] + alpha * (v0[name] + 4.0)
        np.testing.assert_allclose(v2[name], expected, atol=1e-5)
    assert training.rounds.filter(status=Round.Status.COLLECTING).count() == 1


@pytest.mark.django_db
def test_async_concurrency_is_capped_by_max_clients(client: Any, make_agent: Any, make_training: Any) -> None:
    tokens = [make_agent()[1] for _ in range(3)]
    make_training(
        algorithm="fedbuff",
        hyperparameters={"buffer_size": 5},
        min_clients_per_round=1,
        max_clients_per_round=2,
    )
    statuses = [
        client.get("/api/v1/agent/tasks/next?wait=0", HTTP_AUTHORIZATION=f"Bearer {t}").status_code
        for t in tokens
    ]
    assert statuses == [200, 200, 204]
