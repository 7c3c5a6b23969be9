"""A poll or bare heartbeat soon after this process wrote the agent's last_seen_at makes no UPDATE; the
value stays within FEDSITE_AGENT_SEEN_WRITE_SECONDS of the truth (clients.services._SeenWrites)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from clients.models import Agent
from clients.selectors import agent_is_online, agents_online
from clients.services import agent_record_outcome, agent_touch

pytestmark = pytest.mark.django_db


def _updates(context: CaptureQueriesContext) -> int:
    return sum(1 for q in context.captured_queries if q["sql"].startswith('UPDATE "clients_agent"'))


def _touch_counting(agent: Agent, **kwargs: Any) -> int:
    with CaptureQueriesContext(connection) as context:
        agent_touch(agent=agent, **kwargs)
    return _updates(context)


def test_a_touch_within_the_interval_writes_nothing_and_after_it_writes(
    make_agent: Any, settings: Any
) -> None:
    settings.FEDSITE_AGENT_SEEN_WRITE_SECONDS = 0.3
    agent, _ = make_agent()  # touched once (written) by the factory
    first = Agent.objects.get(pk=agent.pk).last_seen_at

    assert _touch_counting(agent) == 0
    assert Agent.objects.get(pk=agent.pk).last_seen_at == first
    assert timezone.now() - first < timedelta(seconds=0.3)  # within the interval of the truth
    time.sleep(0.35)
    assert _touch_counting(agent) == 1
    assert Agent.objects.get(pk=agent.pk).last_seen_at > first


def test_state_and_capabilities_are_always_written(make_agent: Any) -> None:
    agent, _ = make_agent()
    assert _touch_counting(agent, state="training") == 1
    assert Agent.objects.get(pk=agent.pk).state == "training"
    assert _touch_counting(agent, capabilities={"gpu": True}) == 1
    assert Agent.objects.get(pk=agent.pk).capabilities == {"gpu": True}


def test_an_expiry_or_a_save_makes_the_next_touch_write(make_agent: Any) -> None:
    agent, _ = make_agent()
    assert _touch_counting(agent) == 0
    agent_record_outcome(agent_id=agent.pk, outcome="completed")
    assert _touch_counting(agent) == 0  # a completed task changes nothing about being seen
    agent_record_outcome(agent_id=agent.pk, outcome="expired")
    assert _touch_counting(agent) == 1  # "seen again since" the expiry: written at once
    assert _touch_counting(agent) == 0
    Agent.objects.get(pk=agent.pk).save()
    assert _touch_counting(agent) == 1


def test_zero_writes_every_touch_and_an_unwritten_agent_is_written(make_agent: Any, settings: Any) -> None:
    agent, _ = make_agent(online=False)
    assert not agent_is_online(Agent.objects.get(pk=agent.pk))
    assert _touch_counting(agent) == 1  # never written by this process
    assert agents_online().filter(pk=agent.pk).exists()
    settings.FEDSITE_AGENT_SEEN_WRITE_SECONDS = 0
    assert _touch_counting(agent) == 1 and _touch_counting(agent) == 1
