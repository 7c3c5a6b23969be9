"""Read-side queries about agents."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from clients.models import Agent


def agents_eligible() -> QuerySet[Agent]:
    """Agents that may be selected for a round: active and seen within the heartbeat timeout."""
    cutoff = timezone.now() - timedelta(seconds=settings.FEDSITE_AGENT_TIMEOUT)
    return Agent.objects.filter(status=Agent.Status.ACTIVE, last_seen_at__gte=cutoff)


def agents_online() -> QuerySet[Agent]:
    """Agents seen within the heartbeat timeout, whatever their status."""
    cutoff = timezone.now() - timedelta(seconds=settings.FEDSITE_AGENT_TIMEOUT)
    return Agent.objects.filter(last_seen_at__gte=cutoff)


def agent_is_online(agent: Agent) -> bool:
    if agent.last_seen_at is None:
        return False
    return agent.last_seen_at >= timezone.now() - timedelta(seconds=settings.FEDSITE_AGENT_TIMEOUT)
