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
