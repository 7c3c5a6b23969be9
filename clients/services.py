"""Agent registry: creation, enrolment, authentication, heartbeats, reliability counters."""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from clients.models import Agent, EnrollmentKey, agent_id_validator
from fedsite.errors import AuthenticationFailed, Conflict, Forbidden, ServiceError, ValidationFailed
from fedsite.parsers import json_check, text_check
from fedsite.throttling import (
    auth_failure_guard,
    auth_failure_guard_many,
    auth_failure_record,
    auth_failure_suspected,
)
from monitoring.events import event_broadcast_on_commit
from monitoring.models import Alert
from monitoring.services import agents_failures_evaluate, alert_resolve, audit_record

TOKEN_PREFIX = "fsa_"  # noqa: S105 - a public prefix, not a secret
KEY_PREFIX = "fse_"
OPERATOR_TOKEN_PREFIX = settings.REST_KNOX["TOKEN_PREFIX"]  # fso_: knox tokens (fedsite.operator_auth)
MAX_CAPABILITIES_BYTES = 16 * 1024
# Names that are routes of /api/v1/agents/ (monitoring/api/urls.py): an agent so named could not be read.
RESERVED_AGENT_IDS = frozenset({"leaderboard"})


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class _AgentTokenCache:
    """Agents by token hash, trusted for ``FEDSITE_AGENT_TOKEN_CACHE_SECONDS`` without a query (per process).

    Every agent request starts with the token lookup; an agent makes several requests a round (poll,
    download, upload), often within a second. A status change or a token rotation through this module
    (:func:`agent_set_status`, :func:`agent_rotate_token`), or any ``save()`` of the agent, drops its
    entries at once in this process; in other processes (other web workers, Celery) an entry lives at
    most the TTL, so a disabled agent is refused, and a quarantined one gets no new task, within that
    many seconds everywhere. ``0`` turns the cache off. Callers get a copy: a request's changes to its
    agent (``agent_touch``) never reach another request's.

    Each entry also remembers the client IPs it was accepted from after the failed-authentication check
    (:func:`fedsite.throttling.auth_failure_guard`, a cache round trip): the same token from the same IP
    within the TTL skips that check unless this process saw that IP fail since (fedsite.throttling).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Agent, frozenset[str | None]]] = {}
        self._lock = threading.Lock()

    def lookup(self, token_hash: str, client_ip: str | None) -> tuple[Agent | None, bool]:
        """The cached agent (a copy) or None, and whether ``client_ip`` already passed the check with it."""
        ttl = float(settings.FEDSITE_AGENT_TOKEN_CACHE_SECONDS)
        if ttl <= 0:
            return None, False
        with self._lock:
            entry = self._entries.get(token_hash)
        if entry is None or entry[0] <= time.monotonic():
            return None, False
        return copy.copy(entry[1]), client_ip in entry[2]

    def get(self, token_hash: str) -> Agent | None:
        return self.lookup(token_hash, None)[0]

    def put(self, token_hash: str, agent: Agent, client_ip: str | None = None) -> None:
        """Cache ``agent`` for the TTL, as accepted from ``client_ip`` after the failure check."""
        ttl = float(settings.FEDSITE_AGENT_TOKEN_CACHE_SECONDS)
        if ttl <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._entries) >= AGENT_TOKEN_CACHE_MAX_ENTRIES:  # drop the expired, then if need be all
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= AGENT_TOKEN_CACHE_MAX_ENTRIES:
                    self._entries.clear()
            self._entries[token_hash] = (now + ttl, copy.copy(agent), frozenset([client_ip]))

    def accept_ip(self, token_hash: str, agent_pk: Any, client_ip: str | None) -> None:
        """Remember that ``client_ip`` passed the failure check with this (still cached) token."""
        with self._lock:
            entry = self._entries.get(token_hash)
            if entry is None or entry[1].pk != agent_pk or len(entry[2]) >= AGENT_TOKEN_CACHE_MAX_IPS:
                return
            self._entries[token_hash] = (entry[0], entry[1], entry[2] | {client_ip})

    def forget(self, agent_pk: Any) -> None:
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if v[1].pk != agent_pk}


#: Bound on the token cache's entries (one per agent seen within the TTL; about 1 KiB each).
AGENT_TOKEN_CACHE_MAX_ENTRIES = 100_000
#: Client IPs remembered per cached token; a token used from more addresses is checked each time.
AGENT_TOKEN_CACHE_MAX_IPS = 8
agent_token_cache = _AgentTokenCache()


class _SeenWrites:
    """When this process last wrote each agent's ``last_seen_at`` (monotonic clock, and the value written).

    A poll or a bare heartbeat within ``FEDSITE_AGENT_SEEN_WRITE_SECONDS`` of this process's last write
    for the agent makes no ``UPDATE`` (:func:`agent_touch`): ``last_seen_at`` is then at most that many
    seconds behind, for the online/offline views, the round's eligibility (``FEDSITE_AGENT_TIMEOUT``) and
    the re-selection of an agent that let a task expire (seen again since). Any ``save()`` of the agent
    and any task expiry counted here drop its entry, so the next touch writes.
    """

    def __init__(self) -> None:
        self._written: dict[Any, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def recent(self, agent_pk: Any) -> Any:
        """The ``last_seen_at`` this process wrote within the interval, or None (then write)."""
        interval = float(settings.FEDSITE_AGENT_SEEN_WRITE_SECONDS)
        if interval <= 0:
            return None
        with self._lock:
            entry = self._written.get(agent_pk)
        if entry is None or time.monotonic() - entry[0] >= interval:
            return None
        return entry[1]

    def note(self, agent_pk: Any, written: Any) -> None:
        if float(settings.FEDSITE_AGENT_SEEN_WRITE_SECONDS) <= 0:
            return
        now = time.monotonic()
        with self._lock:
            if len(self._written) >= AGENT_TOKEN_CACHE_MAX_ENTRIES:
                self._written.clear()
            self._written[agent_pk] = (now, written)

    def forget(self, agent_pk: Any) -> None:
        with self._lock:
            self._written.pop(agent_pk, None)


agent_seen_writes = _SeenWrites()


@receiver(post_save, sender=Agent)
@receiver(post_delete, sender=Agent)
def _forget_cached_agent(sender: Any, instance: Agent, **kwargs: Any) -> None:
    agent_token_cache.forget(instance.pk)
    agent_seen_writes.forget(instance.pk)


def _validate_agent_id(agent_id: Any) -> str:
    if not isinstance(agent_id, str):
        raise ValidationFailed("agent_id must be a string.", details={"agent_id": "Must be a string."})
    try:
        agent_id_validator(agent_id)
    except DjangoValidationError as exc:
        raise ValidationFailed(
            f"agent_id {agent_id!r} is not valid: {exc.messages[0]}", details={"agent_id": exc.messages[0]}
        ) from exc
    if agent_id in RESERVED_AGENT_IDS:
        raise ValidationFailed(
            f"agent_id {agent_id!r} is reserved (it is the path of /api/v1/agents/{agent_id}/); "
            "choose another name.",
            details={"agent_id": "Reserved name."},
        )
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
    agent_broadcast(agent_pk=agent.pk)
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


def agent_enroll(
    *, enrollment_key: Any, agent_id: Any, capabilities: Any = None, client_ip: str | None = None
) -> tuple[Agent, str]:
    """Self-enrolment: an agent that knows a valid key registers itself and gets a token.

    ``client_ip`` (given by HTTP callers) counts wrong keys per IP; past the limit, 429 (fedsite.throttling).
    """
    auth_failure_guard(scope="enrollment", client_ip=client_ip)
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
                auth_failure_record(scope="enrollment", client_ip=client_ip)
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


def _agent_token_refused(client_ip: str | None) -> None:
    """A malformed token: 429 if the IP is over the limit, else count the failure (the caller raises 401)."""
    auth_failure_guard(scope="agent_token", client_ip=client_ip)
    auth_failure_record(scope="agent_token", client_ip=client_ip)


def _bearer_token_hash(authorization: str | None, client_ip: str | None) -> str:
    """The hash of the agent token in ``Authorization: Bearer <token>``; 401 (a counted failure) if there
    is none or it is malformed, 429 first if the IP is over the failure limit."""
    if not authorization or not authorization.startswith("Bearer "):
        raise AuthenticationFailed(
            "Send the agent token as 'Authorization: Bearer <token>'.", code="not_authenticated"
        )
    token = authorization[len("Bearer ") :].strip()
    if not token or len(token) > 200:
        _agent_token_refused(client_ip)
        raise AuthenticationFailed("The agent token is malformed.", code="invalid_token")
    if token.startswith(OPERATOR_TOKEN_PREFIX):
        _agent_token_refused(client_ip)
        raise AuthenticationFailed(
            "This is an operator token; operators send 'Authorization: Token <token>', "
            "agents send their own fsa_ token as 'Authorization: Bearer <token>'.",
            code="invalid_token",
        )
    return _hash_secret(token)


def agent_authenticate(*, authorization: str | None, client_ip: str | None = None) -> Agent:
    """Resolve ``Authorization: Bearer <token>`` to an active agent or raise 401/403.

    ``client_ip`` (given by HTTP callers) counts wrong tokens per IP; past the limit every attempt from the
    IP gets 429 before its token is trusted (fedsite.throttling; the counter is not consulted again for
    a token this process accepted from the same IP within ``FEDSITE_AGENT_TOKEN_CACHE_SECONDS``).
    """
    (result,) = agents_authenticate([(authorization, client_ip)])
    if isinstance(result, ServiceError):
        raise result
    return result


def agents_authenticate(requests: Sequence[tuple[str | None, str | None]]) -> list[Agent | ServiceError]:
    """:func:`agent_authenticate` of many ``(authorization, client_ip)`` at once, in order: each request's
    agent, or the error it gets (401, 403 or 429, as :func:`agent_authenticate` would raise it).

    The long-polls that start together are authenticated this way: one cache round trip for the failure
    counters of all their IPs (:func:`fedsite.throttling.auth_failure_guard_many`) and one query for all
    the tokens this process has not cached. The throttle holds as it does one request at a time: a
    failure counted for an IP (a malformed or unknown token) makes every LATER request of the same IP in
    the batch check the shared counter again before it is answered, so a burst of guesses sent together
    gets no more tries than the same guesses sent one after the other.
    """
    results: list[Agent | ServiceError | None] = [None] * len(requests)
    hashes: dict[int, str] = {}
    for index, (authorization, ip) in enumerate(requests):
        try:
            hashes[index] = _bearer_token_hash(authorization, ip)
        except ServiceError as exc:
            results[index] = exc
    ips = [ip for _, ip in requests]
    cached = {index: agent_token_cache.lookup(token_hash, ips[index]) for index, token_hash in hashes.items()}
    # The counter is skipped only for a token accepted here from the same IP within the cache's TTL, while
    # this process saw no failure from the IP (fedsite.throttling).
    guarded = {
        index
        for index, (_, accepted_before) in cached.items()
        if not accepted_before or auth_failure_suspected(scope="agent_token", client_ip=ips[index])
    }
    refused = auth_failure_guard_many(scope="agent_token", client_ips={ips[index] for index in guarded})
    missing = {
        hashes[index]
        for index, (agent, _) in cached.items()
        if agent is None and not (index in guarded and ips[index] in refused)
    }
    found = {a.token_hash: a for a in Agent.objects.filter(token_hash__in=missing)} if missing else {}
    failed_ips: set[str] = set()
    for index, token_hash in hashes.items():
        ip = ips[index]
        agent = cached[index][0]
        try:
            if ip in failed_ips:  # a failure earlier in this batch: check the counter again, as in sequence
                auth_failure_guard(scope="agent_token", client_ip=ip)
            elif index in guarded and ip in refused:
                raise refused[ip]
            if agent is None:
                agent = found.get(token_hash)
                if agent is not None:
                    agent_token_cache.put(token_hash, agent, ip)
                    agent = copy.copy(agent)  # (two requests of one token never share an instance)
            elif index in guarded:
                agent_token_cache.accept_ip(token_hash, agent.pk, ip)
            if agent is None:
                auth_failure_record(scope="agent_token", client_ip=ip)
                if ip is not None:
                    failed_ips.add(ip)
                raise AuthenticationFailed(
                    "The agent token is not valid; enrol again or ask the operator.", code="invalid_token"
                )
            if agent.status == Agent.Status.DISABLED:
                raise Forbidden(f"Agent {agent.agent_id} is disabled by the operator.", code="agent_disabled")
            results[index] = agent
        except ServiceError as exc:
            results[index] = exc
    return results  # type: ignore[return-value]  # (every index was filled above)


def agents_touch_seen(agents: Sequence[Agent]) -> None:
    """A bare touch of each agent (:func:`agent_touch` with no state): one ``UPDATE`` for all of those
    whose ``last_seen_at`` this process has not written within ``FEDSITE_AGENT_SEEN_WRITE_SECONDS``."""
    stale: dict[Any, list[Agent]] = {}
    for agent in agents:
        written = agent_seen_writes.recent(agent.pk)
        if written is not None:
            agent.last_seen_at = written
        else:
            stale.setdefault(agent.pk, []).append(agent)
    if not stale:
        return
    now = timezone.now()
    Agent.objects.filter(pk__in=list(stale)).update(last_seen_at=now)
    for pk, instances in stale.items():
        agent_seen_writes.note(pk, now)
        for agent in instances:
            agent.last_seen_at = now


def agent_touch(*, agent: Agent, state: str | None = None, capabilities: Any = None) -> Agent:
    """Record that the agent is alive (heartbeat or poll).

    A bare touch (no ``state``, no ``capabilities``) within ``FEDSITE_AGENT_SEEN_WRITE_SECONDS`` of this
    process's last write of the agent's ``last_seen_at`` makes no query (:class:`_SeenWrites`).
    """
    if state is None and capabilities is None:
        agents_touch_seen([agent])
        return agent
    fields: dict[str, Any] = {"last_seen_at": timezone.now()}
    if state is not None:
        if state not in ("idle", "training"):
            raise ValidationFailed("state must be 'idle' or 'training'.", details={"state": "Unknown state."})
        fields["state"] = state
    if capabilities is not None:
        fields["capabilities"] = _validate_capabilities(capabilities)
    Agent.objects.filter(pk=agent.pk).update(**fields)
    agent_seen_writes.note(agent.pk, fields["last_seen_at"])
    for key, value in fields.items():
        setattr(agent, key, value)
    return agent


def agent_record_outcome(*, agent_id: Any, outcome: str, training: Any = None) -> None:
    """Count a task outcome for the reliability score (``completed``, ``failed`` or ``expired``), then
    evaluate the agent's ``client_failures`` alert over its last tasks (docs/monitoring.md)."""
    agents_record_outcome(agent_ids=[agent_id], outcome=outcome, training=training)


def agents_record_outcome(*, agent_ids: Sequence[Any], outcome: str, training: Any = None) -> None:
    """:func:`agent_record_outcome` of one outcome for many tasks at once (``agent_ids``: the agent of
    each task, an agent once per task): one ``UPDATE`` of the counters, returning the rows the dashboards'
    events need, then :func:`monitoring.services.agents_failures_evaluate` of those agents."""
    column = {"completed": "tasks_completed", "failed": "tasks_failed", "expired": "tasks_expired"}[outcome]
    if not agent_ids:
        return
    if outcome == "expired":  # their next poll writes last_seen_at: "seen again since" the expiry, at once
        for agent_id in agent_ids:
            agent_seen_writes.forget(agent_id)
    tasks_of = Counter(agent_ids)
    by_count: dict[int, list[Any]] = {}
    for agent_id, count in tasks_of.items():
        by_count.setdefault(count, []).append(agent_id)
    # One statement per number of tasks an agent finished (one, but for an agent with several tasks at
    # once): the counter's increment returns the rows the dashboards' event needs.
    quote = connection.ops.quote_name
    pk = quote(Agent._meta.pk.column)
    returned = ", ".join([pk, *(quote(Agent._meta.get_field(name).column) for name in AGENT_EVENT_FIELDS)])
    counter = quote(Agent._meta.get_field(column).column)
    rows = []
    with connection.cursor() as cursor:
        for count, ids in sorted(by_count.items()):
            cursor.execute(
                f"UPDATE {quote(Agent._meta.db_table)} SET {counter} = {counter} + %s "  # noqa: S608 (names)
                f"WHERE {pk} IN ({', '.join(['%s'] * len(ids))}) RETURNING {returned}",
                [count, *(Agent._meta.pk.get_db_prep_value(agent_id, connection) for agent_id in ids)],
            )
            rows.extend(cursor.fetchall())
    names = {Agent._meta.pk.to_python(row[0]): row[1] for row in rows}  # (SQLite: a UUID's hex)
    agents_failures_evaluate(
        agents={agent_id: names.get(agent_id, str(agent_id)) for agent_id in tasks_of}, training=training
    )
    for row in rows:
        values = dict(zip(AGENT_EVENT_FIELDS, row[1:], strict=True))
        seen = values["last_seen_at"]  # SQLite's cursor: naive (UTC), or text, where the ORM converts
        if isinstance(seen, str):
            seen = parse_datetime(seen)
        if seen is not None and seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
        values["last_seen_at"] = seen
        _agent_event(values)


AGENT_EVENT_FIELDS = (
    "agent_id",
    "status",
    "state",
    "last_seen_at",
    "tasks_completed",
    "tasks_failed",
    "tasks_expired",
)


def agent_broadcast(*, agent_pk: Any) -> None:
    """Tell every dashboard the agent's counters and status (``agent_update``, a system event: no
    training group), after the surrounding transaction commits; one small read, no blob."""
    values = Agent.objects.filter(pk=agent_pk).values(*AGENT_EVENT_FIELDS).first()
    if values is not None:
        _agent_event(values)


def _agent_event(values: dict[str, Any]) -> None:
    done = values["tasks_completed"]
    total = done + values["tasks_failed"] + values["tasks_expired"]
    last_seen = values["last_seen_at"]
    payload = {
        **values,
        "last_seen_at": last_seen.isoformat() if last_seen else None,
        "reliability": (done + 1) / (total + 2),  # as Agent.reliability
    }
    event_broadcast_on_commit(training_id=None, event="agent_update", payload=payload)


def agent_set_status(*, agent: Agent, status: str, actor: str) -> Agent:
    if status not in Agent.Status.values:
        raise ValidationFailed(f"status must be one of {Agent.Status.values}.")
    agent.status = status
    agent.save(update_fields=["status"])
    audit_record(actor=actor, action=f"agent.{status}", obj=agent)
    agent_broadcast(agent_pk=agent.pk)
    if status == Agent.Status.ACTIVE:
        alert_resolve(
            kind=Alert.Kind.AGENT_QUARANTINED,
            subject=f"agent:{agent.agent_id}",
            resolution=f"Agent {agent.agent_id} was activated by {actor}.",
        )
    return agent


# --- operator API tokens (django-rest-knox: stored as a SHA-512 digest, shown once) -------------------
def operator_token_create(*, username: str, expires_in_days: float | None, actor: str) -> tuple[Any, str]:
    """Make an operator token for a staff user; return the knox ``AuthToken`` and the clear token.

    ``expires_in_days`` None takes ``FEDSITE_OPERATOR_TOKEN_TTL_DAYS``; 0 makes a token that never expires.
    """
    from datetime import timedelta

    from django.contrib.auth import get_user_model
    from knox.models import AuthToken
    from knox.settings import knox_settings

    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise ValidationFailed(f"No user named {username!r}; create one with `manage.py createsuperuser`.")
    if not user.is_staff or not user.is_active:
        raise ValidationFailed(f"User {username!r} must be an active staff user to get an operator token.")
    if expires_in_days is None:
        expiry = knox_settings.TOKEN_TTL
    elif expires_in_days < 0:
        raise ValidationFailed(
            f"expires-in must be 0 (never) or a positive number of days. Found {expires_in_days}."
        )
    else:
        expiry = timedelta(days=expires_in_days) if expires_in_days > 0 else None
    instance, token = AuthToken.objects.create(user=user, expiry=expiry)
    audit_record(
        actor=actor,
        action="operator_token.create",
        obj=user,
        details={
            "token_key": instance.token_key,
            "expiry": instance.expiry.isoformat() if instance.expiry else None,
        },
    )
    return instance, token


def operator_token_revoke(*, token_key: str | None = None, username: str | None = None, actor: str) -> int:
    """Revoke (delete) operator tokens: the one whose visible prefix is ``token_key``, or all of a user's."""
    from knox.models import AuthToken

    if bool(token_key) == bool(username):
        raise ValidationFailed(
            "Give either a token prefix or a username (to revoke all of that user's tokens)."
        )
    tokens = AuthToken.objects.all()
    if token_key:
        if len(token_key) < 8:
            raise ValidationFailed(f"The token prefix must have at least 8 characters. Found {token_key!r}.")
        tokens = tokens.filter(token_key__startswith=token_key)
    else:
        tokens = tokens.filter(user__username=username)
    keys = list(tokens.values_list("token_key", flat=True))
    if token_key and len(keys) > 1:
        raise ValidationFailed(
            f"The prefix {token_key!r} matches {len(keys)} tokens; give the full 15-character token key "
            "printed by create_operator_token, or --user to revoke all of a user's tokens."
        )
    deleted, _ = tokens.delete()
    if keys:
        audit_record(
            actor=actor,
            action="operator_token.revoke",
            object_type="operator_token",
            object_id=keys[0] if len(keys) == 1 else f"{len(keys)} tokens",
            details={"token_keys": keys, "username": username},
        )
    return deleted


IDENTITY_KEY_BYTES = 32
IDENTITY_PROOF_LABEL = b"fedsite/identity-key/v1/"


def identity_key_proof_payload(agent_id: str, public_key: bytes) -> bytes:
    """What an agent signs with its new identity key to prove it holds the private half."""
    return IDENTITY_PROOF_LABEL + agent_id.encode("utf-8") + b"/" + public_key


def _decode_b64_field(value: Any, field: str, length: int) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * length:
        raise ValidationFailed(
            f"{field} must be a base64 string of {length} bytes.", details={field: "Required."}
        )
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationFailed(f"{field} is not valid base64.", details={field: "Not base64."}) from exc
    if len(decoded) != length:
        raise ValidationFailed(
            f"{field} must decode to {length} bytes. Found {len(decoded)}.", details={field: "Wrong length."}
        )
    return decoded


def agent_register_identity_key(*, agent: Agent, public_key: Any, proof: Any) -> tuple[Agent, bool]:
    """Register the agent's Ed25519 identity key, once; returns ``(agent, created)``.

    ``proof`` is the key's signature of :func:`identity_key_proof_payload`, so nobody registers a key they
    do not hold. The same key again is a no-op (200); a different key once one is set is a 409: a key
    that could be swapped later would let whoever holds the agent's token impersonate it in secure
    aggregation. Every registration is in the audit log.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = _decode_b64_field(public_key, "public_key", IDENTITY_KEY_BYTES)
    signature = _decode_b64_field(proof, "proof", 64)
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(
            signature, identity_key_proof_payload(agent.agent_id, key)
        )
    except (InvalidSignature, ValueError) as exc:
        raise ValidationFailed(
            "proof must be the Ed25519 signature, by the key being registered, of "
            "'fedsite/identity-key/v1/<agent_id>/' followed by the 32 key bytes.",
            details={"proof": "Invalid signature."},
            code="bad_identity_proof",
        ) from exc
    encoded = base64.b64encode(key).decode("ascii")
    with transaction.atomic():
        locked = Agent.objects.select_for_update().get(pk=agent.pk)
        if locked.identity_public_key == encoded:
            return locked, False
        if not locked.identity_public_key:
            locked.identity_public_key = encoded
            locked.identity_key_registered_at = timezone.now()
            locked.save(update_fields=["identity_public_key", "identity_key_registered_at"])
            audit_record(
                actor=locked, action="agent.identity_key_register", obj=locked, details={"key": encoded}
            )
            return locked, True
    # outside the transaction, so the refusal stays in the audit log although the request fails
    audit_record(
        actor=locked,
        action="agent.identity_key_refused",
        obj=locked,
        details={"registered": locked.identity_public_key, "offered": encoded},
    )
    raise Conflict(
        f"Agent {locked.agent_id} already registered another identity key on "
        f"{locked.identity_key_registered_at:%Y-%m-%d %H:%M} UTC; it cannot be changed. Restore the "
        "agent's state directory, or have the operator enrol it again under a new id.",
        code="identity_key_set",
    )
