"""The per-process agent token cache: fewer queries, and status changes and rotations seen at once here."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from clients.models import Agent
from clients.services import agent_authenticate, agent_rotate_token, agent_set_status
from fedsite.errors import AuthenticationFailed, Forbidden


def _agent_queries(context: CaptureQueriesContext) -> int:
    return sum(1 for q in context.captured_queries if 'FROM "clients_agent"' in q["sql"])


@pytest.mark.django_db
def test_a_token_seen_recently_is_resolved_without_a_query(make_agent: Any) -> None:
    agent, token = make_agent()

    with CaptureQueriesContext(connection) as first:
        resolved = agent_authenticate(authorization=f"Bearer {token}")
    with CaptureQueriesContext(connection) as second:
        again = agent_authenticate(authorization=f"Bearer {token}")

    assert resolved.pk == again.pk == agent.pk
    assert _agent_queries(first) == 1 and _agent_queries(second) == 0
    again.state = "changed by one request"  # each caller gets its own copy
    assert agent_authenticate(authorization=f"Bearer {token}").state != again.state


@pytest.mark.django_db
def test_disabling_and_rotating_take_effect_at_once_in_this_process(make_agent: Any) -> None:
    (disabled, disabled_token), (rotated, old_token) = make_agent(), make_agent()
    agent_authenticate(authorization=f"Bearer {disabled_token}")
    agent_authenticate(authorization=f"Bearer {old_token}")

    agent_set_status(agent=disabled, status=Agent.Status.DISABLED, actor="test")
    new_token = agent_rotate_token(agent=rotated, actor="test")

    with pytest.raises(Forbidden, match="disabled"):
        agent_authenticate(authorization=f"Bearer {disabled_token}")
    with pytest.raises(AuthenticationFailed, match="not valid"):
        agent_authenticate(authorization=f"Bearer {old_token}")
    assert agent_authenticate(authorization=f"Bearer {new_token}").pk == rotated.pk


@pytest.mark.django_db
def test_an_entry_lives_at_most_its_ttl_and_zero_turns_the_cache_off(make_agent: Any, settings: Any) -> None:
    settings.FEDSITE_AGENT_TOKEN_CACHE_SECONDS = 0.2
    agent, token = make_agent()
    agent_authenticate(authorization=f"Bearer {token}")
    # a change another process makes (no signal here): seen once the entry expired
    Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.DISABLED)
    agent_authenticate(authorization=f"Bearer {token}")  # still the cached entry
    time.sleep(0.3)
    with pytest.raises(Forbidden):
        agent_authenticate(authorization=f"Bearer {token}")

    settings.FEDSITE_AGENT_TOKEN_CACHE_SECONDS = 0
    Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.ACTIVE)
    with CaptureQueriesContext(connection) as uncached:
        agent_authenticate(authorization=f"Bearer {token}")
        agent_authenticate(authorization=f"Bearer {token}")
    assert _agent_queries(uncached) == 2
