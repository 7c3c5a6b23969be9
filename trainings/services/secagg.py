"""Secure-aggregation rounds (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020) over the polling API.

A round of a training with ``secure_aggregation`` follows the ``secagg`` round protocol registered here::

    waiting_for_agents -> secagg_advertising -> secagg_sharing -> secagg_masked_input
        -> secagg_unmasking -> aggregating -> completed

Each phase hands every party still in the protocol one task (``secagg_advertise``, ``secagg_share``,
``secagg_masked_input``: train, then upload the masked vector, ``secagg_unmask``) whose JSON body is a
message of :mod:`flcore.secagg.messages`; the agent answers at ``POST tasks/<id>/secagg``. A phase closes
when every task of it is closed (answered, given back) or at its deadline (the beat's deadline sweep);
the next phase's messages are what :class:`~flcore.secagg.SecAggServer` returns when it closes the phase.

Invariants:

- The server's protocol state is never kept in memory between requests: it is rebuilt from the
  :class:`~trainings.models.SecAggSession` and :class:`~trainings.models.SecAggMessage` rows at every
  step (every message is re-checked on the way), so a web or worker restart mid-round resumes it.
- The rows hold only public keys, signatures, encrypted share bundles, unmask responses and the names of
  masked-input blobs; no unmasked update is ever written. The masked vectors are summed, and the sum
  unmasked, only in the aggregation task, after the unmask phase closed with enough responders.
- An agent acts only on its own task, in its phase, once (the same bytes again are a no-op; other bytes
  a 409); a message that claims another party id is a 403; a malformed one a 400.
- Fewer survivors than a neighbourhood's threshold (or than ``min_clients_per_round`` masked inputs)
  fails the attempt safe before anything is unmasked; it is re-opened with a fresh selection, a fresh
  setup and fresh keys, up to ``max_round_attempts``, then the training fails (the plain policy).
- The unmasked sum is ``[sum w_i u_i, C sum w_i]`` (trainings/secagg_config.py); the weighted mean goes
  to the strategy through :func:`~trainings.services.aggregation.round_finish`, as a plain round's does.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
from datetime import timedelta
from typing import Any

import numpy as np
from django.db import transaction
from django.utils import timezone

from clients.models import Agent
from clients.services import agent_record_outcome
from fedsite.errors import Conflict, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from fedsite.logs import log_event
from flcore.dp.skellam import padded_dimension, skellam_decode
from flcore.errors import ConfigError, FlcoreError
from flcore.parameters import ParameterSpec, scale, unflatten
from flcore.secagg import (
    AdvertiseKeys,
    InvalidSignature,
    MaskedInput,
    MessageError,
    NotEnoughSurvivors,
    ProtocolViolation,
    RoundSetup,
    SecAggError,
    SecAggServer,
    SecureAggregationConfig,
    ShareKeys,
    UnmaskResponse,
)
from monitoring.events import event_broadcast_on_commit
from monitoring.models import Alert
from monitoring.services import alert_raise
from privacy.models import PrivacyBudget
from privacy.services import budget_allows, skellam_event, skellam_parameters
from trainings.configuration import TrainingConfiguration
from trainings.models import Round, SecAggMessage, SecAggSession, Task, Training
from trainings.outbox import aggregation_intent_record
from trainings.services.rounds import (
    _alert_too_few_agents_once,
    _round_budget_exhausted,
    _round_fail_training,
)
from trainings.services.tasks import _get_agent_task, _task_config, _wake_agents
from trainings.services.trainings import _configuration
from trainings.state import (
    RoundProtocol,
    lock_round,
    round_protocol_register,
    transition_round,
    transition_task,
)
from versioning.blobs import blob_read, blob_save

logger = logging.getLogger("trainings")

TS, RS, KS = Training.Status, Round.Status, Task.Status
Phase = SecAggSession.Phase
Kind = Task.Kind

SECAGG = "secagg"
ADVERTISING = "secagg_advertising"
SHARING = "secagg_sharing"
MASKING = "secagg_masked_input"
UNMASKING = "secagg_unmasking"

SECAGG_ROUND = round_protocol_register(
    RoundProtocol(
        name=SECAGG,
        phases=(RS.WAITING, ADVERTISING, SHARING, MASKING, UNMASKING, RS.AGGREGATING, RS.COMPLETED),
        transitions={
            RS.WAITING: frozenset({ADVERTISING, RS.CANCELLED, RS.FAILED}),
            # back to waiting: the attempt failed safe and the round is re-opened with a fresh selection
            ADVERTISING: frozenset({SHARING, RS.WAITING, RS.FAILED, RS.CANCELLED}),
            SHARING: frozenset({MASKING, RS.WAITING, RS.FAILED, RS.CANCELLED}),
            MASKING: frozenset({UNMASKING, RS.WAITING, RS.FAILED, RS.CANCELLED}),
            UNMASKING: frozenset({RS.AGGREGATING, RS.WAITING, RS.FAILED, RS.CANCELLED}),
            RS.AGGREGATING: frozenset({RS.COMPLETED, RS.FAILED}),
            RS.COMPLETED: frozenset(),
            RS.FAILED: frozenset(),
            RS.CANCELLED: frozenset(),
        },
    )
)

#: Round status of each phase, the session phase, and the task kind its parties get.
PHASES: tuple[tuple[str, str, str], ...] = (
    (ADVERTISING, Phase.ADVERTISE, Kind.SECAGG_ADVERTISE),
    (SHARING, Phase.SHARE, Kind.SECAGG_SHARE),
    (MASKING, Phase.MASKED_INPUT, Kind.SECAGG_MASKED_INPUT),
    (UNMASKING, Phase.UNMASK, Kind.SECAGG_UNMASK),
)
ROUND_STATES = frozenset(state for state, _, _ in PHASES)
STATE_OF_PHASE = {phase: state for state, phase, _ in PHASES}
KIND_OF_PHASE = {phase: kind for _, phase, kind in PHASES}
PHASE_OF_KIND = {kind: phase for _, phase, kind in PHASES}
SECAGG_KINDS = frozenset(PHASE_OF_KIND)

#: Largest JSON answer of one party (its share bundles grow with the neighbours: ~150 bytes each).
MAX_JSON_BYTES = 4 * 1024 * 1024
#: Room for the safetensors header of a masked input.
MASKED_HEADER_BYTES = 1024


def is_secagg(training: Training) -> bool:
    """Whether the training's rounds run secure aggregation."""
    return bool(training.config.get("secure_aggregation"))


# -------------------------------------------------------------------------------------------------------
# Opening an attempt
# -------------------------------------------------------------------------------------------------------


def secagg_round_try_open(round_: Round, training: Training, config: TrainingConfiguration) -> bool:
    """WAITING -> advertising with a fresh selection, setup and session; else alert once and wait.

    Only agents that registered an identity key can take part (their advertised keys are signed with it).
    """
    from trainings.selectors import agents_selectable  # (selectors imports the services package)

    secagg = config.secagg()
    assert secagg is not None
    eligible = list(agents_selectable().exclude(identity_public_key="").order_by("agent_id"))
    rng = np.random.default_rng([config.seed, round_.number, round_.attempt + 1])
    take = min(config.max_clients, len(eligible))
    agents = [eligible[int(i)] for i in sorted(rng.choice(len(eligible), size=take, replace=False))]
    problem = ""
    if len(agents) < max(config.min_clients, 2):
        problem = f"needs {max(config.min_clients, 2)} agents with a registered identity key"
    else:
        try:
            secagg.quantiser_config().validate_for(len(agents))
        except ConfigError as exc:
            problem = str(exc)
    if problem:
        _alert_too_few_agents_once(
            round_,
            training,
            f"Secure-aggregation round {round_.number} {problem}; {len(agents)} are eligible. It "
            "starts as soon as enough agents (fedagent registers its key when it connects) poll.",
            details={"eligible": len(agents), "required": max(config.min_clients, 2)},
        )
        return False
    spec = ParameterSpec.from_json(training.parameter_spec)
    budget = _distributed_budget(training)
    quantiser = secagg.quantiser_config()
    vector_length = spec.num_parameters + 1
    if budget is not None:  # distributed DP: never open a round whose Skellam event would overspend
        allowed, epsilon = budget_allows(budget, skellam_event(budget))
        if not allowed:
            return _round_budget_exhausted(round_, training, budget, epsilon)
        # the agents' Skellam shares are the inputs, in the budget's modulus and rotated dimension
        quantiser = SecureAggregationConfig.from_dict({**quantiser.to_dict(), "bits": int(budget.bits or 0)})
        vector_length = padded_dimension(spec.num_parameters)
    round_.attempt += 1
    parties = {str(index + 1): str(agent.pk) for index, agent in enumerate(agents)}
    setup = RoundSetup(
        session_id=f"{training.pk}/round-{round_.number}/attempt-{round_.attempt}",
        party_ids=tuple(range(1, len(agents) + 1)),
        round_seed=secrets.token_bytes(32),
        vector_length=vector_length,
        config=quantiser,
    )
    session = SecAggSession.objects.create(
        round=round_,
        attempt=round_.attempt,
        phase=Phase.ADVERTISE,
        setup=setup.to_json(),
        parties=parties,
        deadline=timezone.now() + timedelta(seconds=secagg.phase_timeout_seconds),
    )
    round_.deadline = session.deadline
    round_.save(update_fields=["attempt", "deadline"])
    transition_round(round_, ADVERTISING, protocol=SECAGG)
    if round_.opened_at is None:
        round_.opened_at = timezone.now()
        round_.save(update_fields=["opened_at"])
    registry = {party: agents[int(party) - 1].identity_public_key for party in parties}
    _issue(
        session,
        round_,
        Phase.ADVERTISE,
        {int(p): {"setup": setup.to_json(), "identity_keys": registry} for p in parties},
    )
    event_broadcast_on_commit(
        training_id=training.pk, event="round_opened", payload={"round": round_.number, "agents": len(agents)}
    )
    log_event(
        logger,
        "secagg_round_opened",
        training_id=training.pk,
        round=round_.number,
        attempt=round_.attempt,
        agents=len(agents),
    )
    return True


def _issue(session: SecAggSession, round_: Round, phase: str, bodies: dict[int, dict[str, Any]]) -> None:
    """One task of ``phase`` per party in ``bodies`` (its JSON under ``config["secagg"]``)."""
    training = round_.training
    config = _configuration(training)
    agents = {str(a.pk): a for a in Agent.objects.filter(pk__in=list(session.parties.values()))}
    tasks = []
    for index, party in enumerate(sorted(bodies)):
        agent = agents[session.parties[str(party)]]
        extra: dict[str, Any] = {}
        if phase == Phase.MASKED_INPUT:
            extra = _task_config(config, round_.number, 1000 * round_.attempt + index)
        secagg = {"session": session.pk, "session_id": RoundSetup.from_json(session.setup).session_id}
        tasks.append(
            Task(
                round=round_,
                agent=agent,
                kind=KIND_OF_PHASE[phase],
                attempt=session.attempt,
                base_version=round_.base_version,
                deadline=session.deadline,
                config={**extra, "secagg": {**secagg, "phase": phase, "party_id": party, **bodies[party]}},
            )
        )
    Task.objects.bulk_create(tasks)
    agent_pks = [task.agent.pk for task in tasks]
    transaction.on_commit(lambda: _wake_agents(agent_pks))


# -------------------------------------------------------------------------------------------------------
# The server's state, rebuilt from the rows
# -------------------------------------------------------------------------------------------------------


def _messages(session: SecAggSession) -> dict[str, list[SecAggMessage]]:
    grouped: dict[str, list[SecAggMessage]] = {phase: [] for _, phase, _ in PHASES}
    for message in SecAggMessage.objects.filter(session=session).order_by("party_id"):
        grouped[message.phase].append(message)
    return grouped


def _registry(session: SecAggSession) -> dict[int, bytes]:
    keys = dict(
        Agent.objects.filter(pk__in=list(session.parties.values())).values_list("pk", "identity_public_key")
    )
    by_pk = {str(pk): key for pk, key in keys.items()}
    return {int(party): base64.b64decode(by_pk[pk]) for party, pk in session.parties.items()}


def _masked_from_row(message: SecAggMessage, setup: RoundSetup) -> MaskedInput:
    return MaskedInput.from_bytes(
        blob_read(message.blob_name), length=setup.vector_length, bits=setup.config.bits
    )


def _server(session: SecAggSession, *, upto: str, with_inputs: bool = False) -> SecAggServer:
    """The server of ``session`` in phase ``upto``, every stored message of it and before received.

    Without ``with_inputs`` the masked inputs are replayed as zeros (only who uploaded matters until
    the aggregation task sums the real ones).
    """
    setup = RoundSetup.from_json(session.setup)
    server = SecAggServer(setup, identity_public_keys=_registry(session))
    rows = _messages(session)
    for row in rows[Phase.ADVERTISE]:
        server.receive_advertisement(AdvertiseKeys.from_json(row.body))
    if upto == Phase.ADVERTISE:
        return server
    server.close_advertising()
    for row in rows[Phase.SHARE]:
        server.receive_shares(ShareKeys.from_json(row.body))
    if upto == Phase.SHARE:
        return server
    server.close_sharing()
    zeros = np.zeros(setup.vector_length, dtype=_mask_dtype(setup))
    for row in rows[Phase.MASKED_INPUT]:
        message = _masked_from_row(row, setup) if with_inputs else MaskedInput(row.party_id, zeros)
        server.receive_masked_input(message)
    if upto == Phase.MASKED_INPUT:
        return server
    server.close_collecting()
    for row in rows[Phase.UNMASK]:
        server.receive_unmask(UnmaskResponse.from_json(row.body))
    return server


def _mask_dtype(setup: RoundSetup) -> Any:
    from flcore.secagg.masks import mask_dtype

    return mask_dtype(setup.config.bits)


# -------------------------------------------------------------------------------------------------------
# An agent's answer
# -------------------------------------------------------------------------------------------------------


def secagg_body_limit(task: Task) -> int:
    """Largest body accepted for ``task``'s answer."""
    if task.kind == Kind.SECAGG_MASKED_INPUT:
        length = int(task.config.get("secagg", {}).get("vector_length") or 0)
        if not length:
            spec = ParameterSpec.from_json(task.round.training.parameter_spec)
            length = spec.num_parameters + 1
        return 8 * length + MASKED_HEADER_BYTES
    return MAX_JSON_BYTES


def _parse(phase: str, data: bytes, setup: RoundSetup) -> Any:
    if phase == Phase.ADVERTISE:
        return AdvertiseKeys.from_bytes(data)
    if phase == Phase.SHARE:
        return ShareKeys.from_bytes(data)
    if phase == Phase.MASKED_INPUT:
        return MaskedInput.from_bytes(data, length=setup.vector_length, bits=setup.config.bits)
    return UnmaskResponse.from_bytes(data)


def _receive(server: SecAggServer, phase: str, message: Any) -> None:
    if phase == Phase.ADVERTISE:
        server.receive_advertisement(message)
    elif phase == Phase.SHARE:
        server.receive_shares(message)
    elif phase == Phase.MASKED_INPUT:
        server.receive_masked_input(message)
    else:
        server.receive_unmask(message)


def secagg_submit(
    *, agent: Agent, task_id: Any, body: Any, declared_bytes: int | None, meta: Any = None
) -> tuple[SecAggMessage, bool]:
    """Accept an agent's answer to its secure-aggregation task; returns ``(row, created)``.

    ``body`` is read up to the task's limit (a ``declared_bytes`` above it is refused before reading):
    UTF-8 JSON of AdvertiseKeys, ShareKeys or UnmaskResponse, or the MaskedInput safetensors. ``meta``
    (masked input only, optional): JSON with the agent's federated evaluation of the round's model.
    """
    task = _get_agent_task(agent, task_id)
    if task.kind not in SECAGG_KINDS:
        raise Conflict(
            f"Task {task.pk} is a {task.kind!r} task; upload its result to its upload_url "
            f"(/api/v1/agent/tasks/{task.pk}/update).",
            code="not_a_secagg_task",
        )
    phase = PHASE_OF_KIND[task.kind]
    limit = secagg_body_limit(task)
    if declared_bytes is not None and declared_bytes > limit:
        raise _too_large(declared_bytes, limit)
    data = body.read(limit + 1)
    if len(data) > limit:
        raise _too_large(f"more than {limit}", limit)
    metrics = _parse_meta(meta) if phase == Phase.MASKED_INPUT else {}
    session = SecAggSession.objects.filter(pk=task.config.get("secagg", {}).get("session")).first()
    if session is None or session.round_id != task.round_id:
        raise NotFound(
            f"Task {task.pk} names no secure-aggregation session.", code="secagg_session_not_found"
        )
    setup = RoundSetup.from_json(session.setup)
    party = next((int(p) for p, pk in session.parties.items() if pk == str(agent.pk)), None)
    try:
        message = _parse(phase, data, setup)
    except MessageError as exc:
        raise ValidationFailed(str(exc), code="bad_secagg_message") from exc
    if message.party_id != party:
        raise Forbidden(
            f"The message claims party {message.party_id}; this agent is party {party} of the round.",
            code="not_your_party",
        )
    digest = hashlib.sha256(data).hexdigest()
    with transaction.atomic():
        round_ = lock_round(task.round_id)
        locked = Task.objects.select_for_update().get(pk=task.pk)
        session = SecAggSession.objects.select_for_update().get(pk=session.pk)
        existing = SecAggMessage.objects.filter(session=session, agent=agent, phase=phase).first()
        if existing is not None:
            if existing.blob_sha256 == digest:
                return existing, False
            raise Conflict(
                f"Party {party} already answered phase {phase!r} of this round with other bytes; "
                "an answer cannot be replaced.",
                code="secagg_answer_conflict",
            )
        if (
            locked.status not in Task.OPEN
            or session.phase != phase
            or round_.status != STATE_OF_PHASE[phase]
            or locked.deadline <= timezone.now()
        ):
            raise Conflict(
                f"Task {task.pk} is closed (task {locked.status}, round {round_.status}, session phase "
                f"{session.phase}); drop it and poll again.",
                code="task_closed",
            )
        server = _server(session, upto=phase)
        try:
            _receive(server, phase, message)
        except (MessageError, InvalidSignature) as exc:
            raise ValidationFailed(str(exc), code="bad_secagg_message") from exc
        except ProtocolViolation as exc:
            raise Conflict(str(exc), code="secagg_protocol_violation") from exc
        fields: dict[str, Any] = {"body": {}, "blob_sha256": digest, "size_bytes": len(data)}
        if phase == Phase.MASKED_INPUT:
            fields["blob_name"], _ = blob_save(data)
            fields["body"] = {"metrics": metrics}
        else:
            fields["body"] = message.to_json()
        row = SecAggMessage.objects.create(
            session=session, agent=agent, party_id=party, phase=phase, **fields
        )
        transition_task(locked, KS.COMPLETED)
        agent_record_outcome(agent_id=agent.pk, outcome="completed")
        secagg_round_settle(round_)
    log_event(
        logger,
        "secagg_answer_accepted",
        training_id=round_.training_id,
        round=round_.number,
        agent_id=agent.agent_id,
        phase=phase,
        bytes=len(data),
    )
    return row, True


def _too_large(size: int | str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The answer is {size} bytes; this task accepts at most {limit} bytes.",
        code="secagg_answer_too_large",
        details={"max_bytes": limit},
    )


EVALUATION_METRICS = ("eval_accuracy", "eval_loss", "eval_num_examples")


def _parse_meta(meta: Any) -> dict[str, float]:
    """The optional federated evaluation sent with a masked input (of the round's model, not the update)."""
    from trainings.services.updates import _parse_update_meta

    if meta is None:
        return {}
    _, metrics = _parse_update_meta({"num_examples": 1, "metrics": _meta_metrics(meta)})
    return {key: value for key, value in metrics.items() if key in EVALUATION_METRICS}


def _meta_metrics(meta: Any) -> Any:
    from fedsite.parsers import json_parse

    parsed = json_parse(meta, field="meta") if isinstance(meta, str | bytes) else meta
    if not isinstance(parsed, dict):
        raise ValidationFailed("X-SecAgg-Meta must be a JSON object with 'metrics'.")
    return parsed.get("metrics", {})


# -------------------------------------------------------------------------------------------------------
# Closing a phase
# -------------------------------------------------------------------------------------------------------


def _current_session(round_: Round) -> SecAggSession | None:
    return SecAggSession.objects.select_for_update().filter(round=round_).order_by("-attempt").first()


def secagg_round_settle(round_: Round, *, now: Any = None) -> str:
    """Decide a round in a secure-aggregation phase (locked by the caller): wait, or close the phase."""
    if round_.status not in ROUND_STATES:
        return "not_in_secagg_phase"
    session = _current_session(round_)
    if session is None:
        return "not_in_secagg_phase"
    now = now or timezone.now()
    kind = KIND_OF_PHASE[session.phase]
    tasks = list(Task.objects.select_for_update().filter(round=round_, attempt=session.attempt, kind=kind))
    open_tasks = [t for t in tasks if t.status in Task.OPEN]
    past_deadline = session.deadline <= now
    if open_tasks and not past_deadline:
        return "waiting"
    for task in open_tasks:
        transition_task(task, KS.EXPIRED, reason="deadline passed")
        agent_record_outcome(agent_id=task.agent_id, outcome="expired", training=round_.training)
    return _close_phase(round_, session)


def _close_phase(round_: Round, session: SecAggSession) -> str:
    training = round_.training
    config = _configuration(training)
    secagg = config.secagg()
    assert secagg is not None
    phase = session.phase
    setup = RoundSetup.from_json(session.setup)
    server = _server(session, upto=phase)
    answered = SecAggMessage.objects.filter(session=session, phase=phase).count()
    try:
        # A phase nobody answered would leave the server with empty neighbourhoods to check.
        needed = min(setup.threshold(p) for p in setup.party_ids)
        if answered < needed:
            raise NotEnoughSurvivors(
                f"only {answered} parties answered phase {phase!r}, below the smallest threshold {needed}"
            )
        if phase == Phase.ADVERTISE:
            directories = server.close_advertising()
            bodies = {p: {"directory": d.to_json()} for p, d in directories.items()}
            return _next_phase(round_, session, Phase.SHARE, bodies, secagg.phase_timeout_seconds)
        if phase == Phase.SHARE:
            deliveries = server.close_sharing()
            bodies = {
                p: {
                    "delivery": d.to_json(),
                    "clip_norm": secagg.clip_norm,
                    "weight_cap": secagg.weight_cap,
                    "vector_length": setup.vector_length,
                }
                for p, d in deliveries.items()
            }
            budget = _distributed_budget(training)
            if budget is not None:
                parameters = _skellam_parameters(budget, setup).to_json()
                for body in bodies.values():
                    body["distributed_dp"] = parameters
            timeout = max(secagg.phase_timeout_seconds, config.round_timeout)
            return _next_phase(round_, session, Phase.MASKED_INPUT, bodies, timeout)
        if phase == Phase.MASKED_INPUT:
            if answered < config.min_clients:
                raise NotEnoughSurvivors(
                    f"only {answered} masked inputs arrived; the round needs {config.min_clients}"
                )
            budget = _distributed_budget(training)
            if budget is not None and answered < int(budget.noise_agents or 0):
                raise NotEnoughSurvivors(
                    f"only {answered} masked inputs arrived; the privacy accounting counts the Skellam noise "
                    f"of {budget.noise_agents} agents, so fewer may not be released"
                )
            requests = server.close_collecting()
            bodies = {p: {"request": r.to_json()} for p, r in requests.items()}
            return _next_phase(round_, session, Phase.UNMASK, bodies, secagg.phase_timeout_seconds)
        _check_responders(server)
    except NotEnoughSurvivors as exc:
        return _fail_safe(round_, session, training, config, str(exc))
    session.phase = Phase.AGGREGATING
    session.save(update_fields=["phase"])
    transition_round(round_, RS.AGGREGATING, protocol=SECAGG)
    aggregation_intent_record(round_)
    log_event(
        logger, "round_closed", training_id=training.pk, round=round_.number, updates=len(server.uploaded)
    )
    return "closed"


def _check_responders(server: SecAggServer) -> None:
    """Every neighbourhood holds ``t`` responders, or :class:`NotEnoughSurvivors` (nothing unmasked)."""
    setup = server.setup
    for owner in sorted(server.shared):
        available = len(setup.neighbourhood(owner) & server.responders)
        if available < setup.threshold(owner):
            raise NotEnoughSurvivors(
                f"only {available} parties of party {owner}'s neighbourhood answered the unmask request, "
                f"below its threshold of {setup.threshold(owner)}"
            )


def _next_phase(
    round_: Round, session: SecAggSession, phase: str, bodies: dict[int, dict[str, Any]], timeout: float
) -> str:
    session.phase = phase
    session.deadline = timezone.now() + timedelta(seconds=timeout)
    session.save(update_fields=["phase", "deadline"])
    round_.deadline = session.deadline
    round_.save(update_fields=["deadline"])
    transition_round(round_, STATE_OF_PHASE[phase], protocol=SECAGG)
    _issue(session, round_, phase, bodies)
    log_event(
        logger,
        "secagg_phase_opened",
        training_id=round_.training_id,
        round=round_.number,
        phase=phase,
        parties=len(bodies),
    )
    return phase


def _fail_safe(
    round_: Round, session: SecAggSession, training: Training, config: TrainingConfiguration, reason: str
) -> str:
    """Nothing is unmasked: the attempt ends, and the round re-opens or (after the last attempt) fails."""
    failed_in = session.phase
    session.phase = Phase.FAILED
    session.error = reason[:2000]
    session.closed_at = timezone.now()
    session.save(update_fields=["phase", "error", "closed_at"])
    for task in Task.objects.select_for_update().filter(round=round_, status__in=list(Task.OPEN)):
        transition_task(task, KS.CANCELLED, reason="the secure-aggregation attempt failed safe")
    log_event(logger, "secagg_failed_safe", training_id=training.pk, round=round_.number, reason=repr(reason))
    if round_.attempt >= config.round_attempts:
        message = (
            f"Secure-aggregation round {round_.number} failed safe in each of its {round_.attempt} attempts "
            f"(last: {reason}); nothing was unmasked and the training has failed. Run more agents or lower "
            "secure_aggregation.threshold, then start a new training."
        )
        return _round_fail_training(round_, training, message, protocol=SECAGG)
    alert_raise(
        kind=Alert.Kind.ROUND_FAILED,
        severity=Alert.Severity.WARNING,
        training=training,
        round_number=round_.number,
        message=(
            f"Secure-aggregation round {round_.number}, attempt {round_.attempt}, failed safe: {reason}. "
            "Nothing was unmasked; the round is re-opened with a fresh selection and fresh keys."
        ),
        details={"attempt": round_.attempt, "phase": failed_in, "reason": reason[:500]},
    )
    transition_round(round_, RS.WAITING, protocol=SECAGG)
    return "reopened" if secagg_round_try_open(round_, training, config) else "waiting"


def secagg_rounds_check_deadlines(now: Any) -> dict[str, int]:
    """Run by the beat's deadline sweep: close every secure-aggregation phase past its deadline."""
    summary: dict[str, int] = {}
    due = Round.objects.filter(status__in=list(ROUND_STATES), deadline__lte=now).values_list("pk", flat=True)
    for round_id in due:
        with transaction.atomic():
            outcome = secagg_round_settle(lock_round(round_id), now=now)
        key = f"secagg_{outcome}"
        summary[key] = summary.get(key, 0) + 1
    return summary


# -------------------------------------------------------------------------------------------------------
# Aggregation (Celery worker)
# -------------------------------------------------------------------------------------------------------


def secagg_aggregate(*, round_id: int, started: float | None = None) -> str:
    """Sum the masked inputs, unmask the sum, and hand the weighted mean to the strategy.

    Raises
    ------
    SecAggError, FlcoreError
        When the sum cannot be unmasked (a corrupted share or blob): the aggregation task retries, then
        fails the round (``round_mark_aggregation_failed``).
    """
    from trainings.services.aggregation import round_finish

    started = started if started is not None else time.time()
    round_ = Round.objects.select_related("training").get(pk=round_id)
    if round_.status != RS.AGGREGATING:
        return "skipped"
    training = round_.training
    config = _configuration(training)
    secagg = config.secagg()
    assert secagg is not None
    session = SecAggSession.objects.filter(round=round_, phase=Phase.AGGREGATING).order_by("-attempt").first()
    if session is None:
        raise FlcoreError(
            f"Round {round_.number} is aggregating but has no secure-aggregation session to unmask."
        )
    server = _server(session, upto=Phase.UNMASK, with_inputs=True)
    spec = ParameterSpec.from_json(training.parameter_spec)
    budget = _distributed_budget(training)
    if budget is not None:
        # distributed DP: the unmasked sum is the Skellam-noised sum of the clipped deltas (unweighted)
        result = server.finish_integers()
        setup = RoundSetup.from_json(session.setup)
        total = skellam_decode(result.total.astype(np.int64), _skellam_parameters(budget, setup), spec)
        delta = scale(total, 1.0 / len(result.survivors))
        extra = _round_metrics(session, result, float(len(result.survivors)))
    else:
        result = server.finish()
        weight_sum = float(result.total[-1]) / secagg.clip_norm
        if not weight_sum > result.error_bound / secagg.clip_norm:
            raise SecAggError(f"The unmasked sum of weights is {weight_sum:.6g}: no weight to average by.")
        delta = unflatten(result.total[:-1] / weight_sum, spec)
        extra = _round_metrics(session, result, weight_sum)
    # One transaction: the round completes exactly when its session does (no reader, and no crash in
    # between, sees a completed round whose session is still aggregating).
    with transaction.atomic():
        outcome = round_finish(
            round_id=round_id,
            delta=delta,
            combination_metrics={"num_updates": float(len(result.survivors))},
            started=started,
            extra_metrics=extra,
        )
        SecAggSession.objects.filter(pk=session.pk).update(phase=Phase.COMPLETED, closed_at=timezone.now())
    return outcome


def _round_metrics(session: SecAggSession, result: Any, weight_sum: float) -> dict[str, float]:
    """What a secure-aggregation round publishes: counts, the quantisation bound, federated evaluation."""
    metrics = {
        "num_agents_reporting": float(len(result.survivors)),
        "secagg_survivors": float(len(result.survivors)),
        "secagg_responders": float(len(result.responders)),
        "secagg_dropped_after_advertising": float(len(result.dropped_after_advertising)),
        "secagg_dropped_after_sharing": float(len(result.dropped_after_sharing)),
        "secagg_error_bound": float(result.error_bound),
        "secagg_weight_sum": weight_sum,
        "secagg_attempt": float(session.attempt),
    }
    survivors = set(result.survivors)
    rows = SecAggMessage.objects.filter(session=session, phase=Phase.MASKED_INPUT)
    evaluations = [row.body.get("metrics", {}) for row in rows if row.party_id in survivors]
    weight = sum(float(m.get("eval_num_examples", 0.0)) for m in evaluations)
    if weight > 0:
        for key, target in (("eval_accuracy", "federated_accuracy"), ("eval_loss", "federated_loss")):
            pairs = [(m[key], float(m.get("eval_num_examples", 0.0))) for m in evaluations if key in m]
            total = sum(w for _, w in pairs)
            if total > 0:
                metrics[target] = sum(v * w for v, w in pairs) / total
    return metrics


def _distributed_budget(training: Training) -> PrivacyBudget | None:
    return PrivacyBudget.objects.filter(training=training, mode=PrivacyBudget.Mode.DISTRIBUTED).first()


def _skellam_parameters(budget: PrivacyBudget, setup: RoundSetup) -> Any:
    """The round's Skellam parameters: the budget's, with a rotation seed from the public round seed."""
    return skellam_parameters(budget, rotation_seed=int.from_bytes(setup.round_seed[:4], "big"))


def secagg_task_fields(task: Task) -> dict[str, Any]:
    """What a secure-aggregation task's JSON has instead of a plain task's upload fields."""
    return {
        "upload_url": f"/api/v1/agent/tasks/{task.pk}/secagg",
        "max_update_bytes": secagg_body_limit(task),
    }
