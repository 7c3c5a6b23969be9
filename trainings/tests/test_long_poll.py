"""The long-poll returns a task that appears while the agent is waiting, and 204 when none does."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection


@pytest.mark.django_db(transaction=True)
def test_long_poll_returns_a_task_created_while_waiting(
    client: Any, make_agent: Any, make_training: Any
) -> None:
    (_, token), _ = make_agent(), make_agent()
    started = threading.Event()

    def start_training_later() -> None:
        started.wait(5)
        try:
            make_training(min_clients_per_round=2, max_clients_per_round=2)
        finally:
            connection.close()

    thread = threading.Thread(target=start_training_later)
    thread.start()
    started.set()
    response = client.get("/api/v1/agent/tasks/next?wait=20", HTTP_AUTHORIZATION=f"Bearer {token}")
    thread.join()
    assert response.status_code == 200, response.content
    task = response.json()
    assert task["kind"] == "fit" and task["round"] == 1
    assert task["model"]["parameters"][0]["name"] == "layer0.weight"


@pytest.mark.django_db(transaction=True)
def test_long_poll_with_nothing_to_do_is_204(client: Any, make_agent: Any) -> None:
    _, token = make_agent()
    response = client.get("/api/v1/agent/tasks/next?wait=1", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 204
    assert response.content == b""


def test_an_idle_poll_is_held_between_one_minus_the_jitter_and_all_of_its_wait(settings: Any) -> None:
    from trainings.api.agent_views import poll_duration

    settings.FEDSITE_LONG_POLL_JITTER = 0.2
    assert poll_duration(30.0, draw=0.0) == 30.0
    assert poll_duration(30.0, draw=0.5) == pytest.approx(27.0)
    durations = [poll_duration(30.0) for _ in range(2000)]
    assert all(24.0 < d <= 30.0 for d in durations)
    # spread over the whole window (uniform: mean 27, standard deviation 6 / sqrt(12) = 1.73)
    assert min(durations) < 24.5 and max(durations) > 29.5
    assert abs(sum(durations) / len(durations) - 27.0) < 0.2
    settings.FEDSITE_LONG_POLL_JITTER = 0
    assert {poll_duration(30.0) for _ in range(100)} == {30.0}


@pytest.mark.django_db
def test_an_idle_poll_with_jitter_is_204_within_its_window(
    client: Any, make_agent: Any, settings: Any
) -> None:
    import time

    settings.FEDSITE_LONG_POLL_JITTER = 0.5
    _, token = make_agent()
    took = []
    for _ in range(3):
        started = time.monotonic()
        response = client.get("/api/v1/agent/tasks/next?wait=2", HTTP_AUTHORIZATION=f"Bearer {token}")
        took.append(time.monotonic() - started)
        assert response.status_code == 204
    assert all(t > 0.95 for t in took), took  # never answered before (1 - jitter) x wait
