"""DRF authentication for operators: ``Authorization: Token fso_...`` (django-rest-knox).

Knox stores only a SHA-512 digest of each token and its first 15 characters (``token_key``: the ``fso_``
prefix and 11 more) to find it, so a token is shown once, when it is made, and can expire and be
revoked. Agents use ``Authorization: Bearer fsa_...`` (fedsite.agent_auth): knox answers only headers
with its ``Token`` prefix, and an agent token sent under it is refused with a message saying so.
Failed attempts are throttled per client IP (fedsite.throttling). This module is imported by DRF's
settings, so it imports no DRF views; the login/logout views are in fedsite.operator_views.
"""

from __future__ import annotations

from typing import Any

from knox.auth import TokenAuthentication
from knox.settings import knox_settings
from rest_framework import exceptions
from rest_framework.authentication import get_authorization_header
from rest_framework.request import Request

from fedsite.throttling import auth_failure_guard, auth_failure_record, client_ip

AGENT_TOKEN_PREFIX = "fsa_"  # noqa: S105 - a public prefix (clients.services.TOKEN_PREFIX), not a secret


class OperatorTokenAuthentication(TokenAuthentication):
    """Knox token authentication with failed attempts counted per client IP."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != knox_settings.AUTH_HEADER_PREFIX.lower().encode():
            return None  # not an operator token: session login or an agent's Bearer token
        ip = client_ip(request)
        auth_failure_guard(scope="operator_token", client_ip=ip)
        try:
            if len(parts) == 2 and parts[1].startswith(AGENT_TOKEN_PREFIX.encode()):
                raise exceptions.AuthenticationFailed(
                    "This is an agent token; agents send 'Authorization: Bearer <token>'. Operators use an "
                    "fso_ token from `manage.py create_operator_token` as 'Authorization: Token <token>'."
                )
            return super().authenticate(request)
        except exceptions.AuthenticationFailed:
            auth_failure_record(scope="operator_token", client_ip=ip)
            raise

    def validate_user(self, auth_token: Any) -> tuple[Any, Any]:
        user, token = super().validate_user(auth_token)
        if not user.is_staff:
            raise exceptions.AuthenticationFailed(
                f"User {user.get_username()!r} is not staff; operator tokens work only for staff users."
            )
        return user, token
