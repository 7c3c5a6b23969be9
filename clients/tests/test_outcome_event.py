"""A task outcome's counter increment returns the row of the dashboards' ``agent_update`` event (one
statement, ``UPDATE ... RETURNING``): the event is the one ``agent_broadcast`` sends after reading it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import connection
from django.test.utils import CaptureQueriesContext

from clients.services import agent_broadcast, agent_record_outcome
from monitoring.events import SYSTEM_GROUP


async def _receive(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout=5)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("outcome", ["completed", "failed", "expired"])
def test_the_outcome_event_is_the_row_the_increment_returned(make_agent: Any, outcome: str) -> None:
    agent, _ = make_agent()
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(SYSTEM_GROUP, channel)
    try:
        with CaptureQueriesContext(connection) as context:
            agent_record_outcome(agent_id=agent.pk, outcome=outcome)
        returned = async_to_sync(_receive)(layer, channel)
        agent_broadcast(agent_pk=agent.pk)  # the same agent, read by the ORM
        read = async_to_sync(_receive)(layer, channel)
    finally:
        async_to_sync(layer.group_discard)(SYSTEM_GROUP, channel)

    assert returned == read
    assert returned["payload"][f"tasks_{outcome}"] == 1
    assert returned["payload"]["last_seen_at"] is not None and returned["payload"]["last_seen_at"].endswith(
        "+00:00"
    )
    agent_rows = [q["sql"] for q in context.captured_queries if '"clients_agent"' in q["sql"]]
    assert agent_rows[0].startswith('UPDATE "clients_agent"') and "RETURNING" in agent_rows[0]
    assert not any(
        sql.startswith('SELECT "clients_agent"."agent_id", "clients_agent"."status"') for sql in agent_rows
    )
