"""DRF authentication for agents: ``Authorization: Bearer <agent token>``.

Operators use ``Authorization: Token <fso_...>`` (fedsite.operator_auth): each scheme answers only its own
header prefix, and a token of the other kind under the wrong prefix is refused with a message saying so.
Failed attempts are throttled per client IP (fedsite.throttling).

``request.auth`` is the ``Agent``; ``request.user`` is a principal that is never staff, so an agent
token can never reach an operator endpoint.
"""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission

from clients.models import Agent
from clients.services import agent_authenticate
from fedsite.throttling import client_ip


class AgentPrincipal:
    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False
    is_anonymous = False

    def __init__(self, agent: Agent):
        self.agent = agent
        self.pk = None

    def __str__(self) -> str:
        return f"agent:{self.agent.agent_id}"

    def get_username(self) -> str:
        return f"agent:{self.agent.agent_id}"


class AgentTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Any) -> tuple[AgentPrincipal, Agent] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header.startswith("Bearer "):
            return None  # not an agent request: let other authenticators (or the permission) decide
        agent = agent_authenticate(
            authorization=request.META.get("HTTP_AUTHORIZATION"), client_ip=client_ip(request)
        )
        return AgentPrincipal(agent), agent

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="fedsite-agent"'


class IsAgent(BasePermission):
    def has_permission(self, request: Any, view: Any) -> bool:
        return isinstance(request.auth, Agent)


try:  # document the scheme in the OpenAPI schema
    from drf_spectacular.extensions import OpenApiAuthenticationExtension

    class AgentTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[misc]
        target_class = "fedsite.agent_auth.AgentTokenAuthentication"
        name = "agentToken"

        def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
            return {"type": "http", "scheme": "bearer", "description": "Agent token: 'Bearer fsa_...'"}

except ImportError:  # pragma: no cover - drf-spectacular is a base requirement
    pass
