"""Handing a task to a polling agent: one read (with what the task JSON needs) and one conditional UPDATE,
the pending -> delivered move still checked against the state machine, and a task changed meanwhile not
moved (trainings.state.deliver_task_if_pending)."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from trainings.models import Task
from trainings.selectors import task_payload
from trainings.services.tasks import task_next_for_agent
from trainings.state import deliver_task_if_pending

pytestmark = pytest.mark.django_db
KS = Task.Status


def test_a_pending_task_is_delivered_with_one_read_and_one_update(
    make_agent: Any, make_training: Any
) -> None:
    (agent, _), _ = make_agent(), make_agent()
    make_training(min_clients_per_round=2, max_clients_per_round=2)

    with CaptureQueriesContext(connection) as context:
        task = task_next_for_agent(agent=agent)
        payload = task_payload(task)
    sql = [q["sql"] for q in context.captured_queries]
    assert len(sql) == 2, sql
    assert sql[0].startswith("SELECT") and sql[1].startswith('UPDATE "trainings_task"')
    stored = Task.objects.get(pk=task.pk)
    assert stored.status == task.status == KS.DELIVERED
    assert stored.delivered_at == task.delivered_at is not None
    assert payload["task_id"] == str(task.pk) and payload["round"] == 1

    with CaptureQueriesContext(connection) as again:  # already delivered: the same task, read only
        assert task_next_for_agent(agent=agent).pk == task.pk
    assert [q["sql"][:6] for q in again.captured_queries] == ["SELECT"]
    assert Task.objects.get(pk=task.pk).delivered_at == stored.delivered_at


@pytest.mark.parametrize("meanwhile", [KS.CANCELLED, KS.EXPIRED, KS.DELIVERED])
def test_a_task_changed_since_it_was_read_is_not_moved(
    make_agent: Any, make_training: Any, meanwhile: str
) -> None:
    (agent, _), _ = make_agent(), make_agent()
    make_training(min_clients_per_round=2, max_clients_per_round=2)
    read = Task.objects.get(agent=agent)
    assert read.status == KS.PENDING
    Task.objects.filter(pk=read.pk).update(status=meanwhile)  # another request, between read and write

    assert deliver_task_if_pending(read) is False
    assert read.status == KS.PENDING and read.delivered_at is None
    stored = Task.objects.get(pk=read.pk)
    assert stored.status == meanwhile and stored.delivered_at is None
