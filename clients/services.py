"""Agent registry: creation, enrolment, authentication, heartbeats, reliability counters."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from clients.models import Agent, EnrollmentKey, agent_id_validator
from fedsite.errors import AuthenticationFailed, Conflict, Forbidden, ValidationFailed
from fedsite.parsers import json_check, text_check
from monitoring.services import audit_record

TOKEN_PREFIX = "fsa_"  # noqa: S105 - a public prefix, not a secret
KEY_PREFIX = "fse_"
MAX_CAPABILITIES_BYTES = 16 * 1024


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _validate_agent_id(agent_id: Any) -> str:
    if not isinstance(agent_id, str):
        raise ValidationFailed("agent_id must be a string.", details={"agent_id": "Must be a string."})
    try:
        agent_id_validator(agent_id)
    except DjangoValidationError as exc:
        raise ValidationFailed(
            f"agent_id {agent_id!r} is not valid: {exc.messages[0]}", details={"agent_id": exc.messages[0]}
        ) from exc
    return agent_id


def _validate_capabilities(capabilities: Any) -> dict[str, Any]:
    if capabilities is None:
        return {}
    if not isinstance(capabilities, dict):
        raise ValidationFailed(
            "capabilities must be a JSON object.", details={"capabilities": "Must be an object."}
        )
    json_check(capabilities, field="capabilities")  # depth, NUL and lone surrogates, naming the path
    if len(json.dumps(capabilities)) > MAX_CAPABILITIES_BYTES:
        raise ValidationFailed(f"capabilities must be at most {MAX_CAPABILITIES_BYTES} bytes of JSON.")
    return capabilities


def agent_create(
    *,
    agent_id: str,
    capabilities: dict[str, Any] | None = None,
    actor: str = "system",
    enrolled_via: str = Agent.EnrolledVia.OPERATOR,
) -> tuple[Agent, str]:
    """Register an agent and return it with its clear token (shown only now; stored hashed)."""
    agent_id = _validate_agent_id(agent_id)
    capabilities = _validate_capabilities(capabilities)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    try:
        with transaction.atomic():
            agent = Agent.objects.create(
                agent_id=agent_id,
                token_hash=_hash_secret(token),
                token_prefix=token[:10],
                capabilities=capabilities,
                enrolled_via=enrolled_via,
            )
    except IntegrityError as exc:
        raise Conflict(
            f"An agent named {agent_id!r} already exists; choose another agent_id or rotate its token.",
            code="agent_exists",
        ) from exc
    audit_record(actor=actor, action="agent.create", obj=agent, details={"enrolled_via": enrolled_via})
    return agent, token


def agent_rotate_token(*, agent: Agent, actor: str) -> str:
    """Replace an agent's token; the old one stops working at once."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    agent.token_hash = _hash_secret(token)
    agent.token_prefix = token[:10]
    agent.save(update_fields=["token_hash", "token_prefix"])
    audit_record(actor=actor, action="agent.rotate_token", obj=agent)
    return token


def enrollment_key_create(
    *, label: str, max_uses: int | None = None, expires_at: Any = None, created_by: Any = None
) -> tuple[EnrollmentKey, str]:
    """Create an enrolment key and return it with its clear secret (stored hashed)."""
    secret = KEY_PREFIX + secrets.token_urlsafe(24)
    key = EnrollmentKey.objects.create(
        label=label,
        key_hash=_hash_secret(secret),
        key_prefix=secret[:10],
        max_uses=max_uses,
        expires_at=expires_at,
        created_by=created_by,
    )
    audit_record(actor=str(created_by or "system"), action="enrollment_key.create", obj=key)
    return key, secret


def _validate_enrollment_key(enrollment_key: Any) -> str:
    if not isinstance(enrollment_key, str) or not enrollment_key:
        raise ValidationFailed("enrollment_key is required.", details={"enrollment_key": "Required."})
    return text_check(enrollment_key, field="enrollment_key")


def agent_enroll(*, enrollment_key: Any, agent_id: Any, capabilities: Any = None) -> tuple[Agent, str]:
    """Self-enrolment: an agent that knows a valid key registers itself and gets a token."""
    enrollment_key = _validate_enrollment_key(enrollment_key)
    agent_id = _validate_agent_id(agent_id)
    capabilities = _validate_capabilities(capabilities)
    configured = settings.FEDSITE_ENROLLMENT_KEY
    with transaction.atomic():
        if configured and hmac.compare_digest(configured.encode(), enrollment_key.encode()):
            key = None
        else:
            key = (
                EnrollmentKey.objects.select_for_update()
                .filter(key_hash=_hash_secret(enrollment_key))
                .first()
            )
            now = timezone.now()
            if (
                key is None
                or key.revoked
                or (key.expires_at is not None and key.expires_at <= now)
                or (key.max_uses is not None and key.uses >= key.max_uses)
            ):
                raise Forbidden(
                    "The enrolment key is unknown, revoked, expired or used up; "
                    "ask the operator for a new one.",
                    code="bad_enrollment_key",
                )
            EnrollmentKey.objects.filter(pk=key.pk).update(uses=F("uses") + 1)
        agent, token = agent_create(
            agent_id=agent_id,
            capabilities=capabilities,
            actor=f"enrollment_key:{key.key_prefix if key else 'settings'}",
            enrolled_via=Agent.EnrolledVia.ENROLLMENT_KEY,
        )
    return agent, token


def agent_authenticate(*, authorization: str | None) -> Agent:
    """Resolve ``Authorization: Bearer <token>`` to an active agent or raise 401/403."""
    if not authorization or not authorization.startswith("Bearer "):
        raise AuthenticationFailed(
            "Send the agent token as 'Authorization: Bearer <token>'.", code="not_authenticated"
        )
    token = authorization[len("Bearer ") :].strip()
    if not token or len(token) > 200:
        raise AuthenticationFailed("The agent token is malformed.", code="invalid_token")
    agent = Agent.objects.filter(token_hash=_hash_secret(token)).first()
    if agent is None:
        raise AuthenticationFailed(
            "The agent token is not valid; enrol again or ask the operator.", code="invalid_token"
        )
    if agent.status == Agent.Status.DISABLED:
        raise Forbidden(f"Agent {agent.agent_id} is disabled by the operator.", code="agent_disabled")
    return agent


def agent_touch(*, agent: Agent, state: str | None = None, capabilities: Any = None) -> Agent:
    """Record that the agent is alive (heartbeat or poll)."""
    fields: dict[str, Any] = {"last_seen_at": timezone.now()}
    if state is not None:
        if state not in ("idle", "training"):
            raise ValidationFailed("state must be 'idle' or 'training'.", details={"state": "Unknown state."})
        fields["state"] = state
    if capabilities is not None:
        fields["capabilities"] = _validate_capabilities(capabilities)
    Agent.objects.filter(pk=agent.pk).update(**fields)
    for key, value in fields.items():
        setattr(agent, key, value)
    return agent


def agent_record_outcome(*, agent_id: Any, outcome: str) -> None:
    """Count a task outcome for the reliability score (``completed``, ``failed`` or ``expired``)."""
    column = {"completed": "tasks_completed", "failed": "tasks_failed", "expired": "tasks_expired"}[outcome]
    Agent.objects.filter(pk=agent_id).update(**{column: F(column) + 1})


def agent_set_status(*, agent: Agent, status: str, actor: str) -> Agent:
    if status not in Agent.Status.values:
        raise ValidationFailed(f"status must be one of {Agent.Status.values}.")
    agent.status = status
    agent.save(update_fields=["status"])
    audit_record(actor=actor, action=f"agent.{status}", obj=agent)
    return agent
