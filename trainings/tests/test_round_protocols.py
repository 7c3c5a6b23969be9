"""Round protocols: the plain phase table, the registry, and moves accepted only by their own protocol."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from django.db import transaction
from django.db.models.signals import post_save

from flcore.parameters import ParameterSpec, to_bytes
from trainings import services
from trainings.models import Round
from trainings.state import (
    PLAIN,
    PLAIN_ROUND,
    ROUND_PROTOCOLS,
    ROUND_TRANSITIONS,
    IllegalTransition,
    RoundProtocol,
    UnknownRoundProtocol,
    lock_round,
    round_protocol,
    round_protocol_register,
    transition_round,
)

RS = Round.Status
ADVERTISE_KEYS, SHARE_KEYS, UNMASKING = "advertise_keys", "share_keys", "unmasking"


def _masked_protocol(name: str = "test-masked") -> RoundProtocol:
    """A secure-aggregation-shaped protocol: key phases before collecting, unmasking after it."""
    return PLAIN_ROUND.extended(
        name=name,
        phases=(
            RS.WAITING,
            ADVERTISE_KEYS,
            SHARE_KEYS,
            RS.COLLECTING,
            UNMASKING,
            RS.AGGREGATING,
            RS.COMPLETED,
        ),
        transitions={
            RS.WAITING: {ADVERTISE_KEYS, RS.CANCELLED, RS.FAILED},
            ADVERTISE_KEYS: {SHARE_KEYS, RS.FAILED, RS.CANCELLED},
            SHARE_KEYS: {RS.COLLECTING, RS.FAILED, RS.CANCELLED},
            RS.COLLECTING: {UNMASKING, RS.FAILED, RS.CANCELLED},
            UNMASKING: {RS.AGGREGATING, RS.FAILED},
        },
    )


@pytest.fixture
def masked() -> Iterator[RoundProtocol]:
    protocol = round_protocol_register(_masked_protocol())
    yield protocol
    ROUND_PROTOCOLS.pop(protocol.name)


def test_plain_protocol_is_the_round_table_and_its_phases_are_the_happy_path() -> None:
    assert round_protocol(PLAIN) is PLAIN_ROUND
    assert ROUND_TRANSITIONS is PLAIN_ROUND.transitions
    assert PLAIN_ROUND.phases == (RS.WAITING, RS.COLLECTING, RS.AGGREGATING, RS.COMPLETED)
    assert set(PLAIN_ROUND.transitions) == set(RS.values)  # every status of a round has its row


def test_plain_protocol_reaches_every_state_and_every_state_can_end() -> None:
    assert PLAIN_ROUND.reachable_from(PLAIN_ROUND.initial) == set(RS.values)
    assert PLAIN_ROUND.final_states == {RS.COMPLETED, RS.FAILED, RS.CANCELLED}
    for state in PLAIN_ROUND.transitions:
        assert PLAIN_ROUND.reachable_from(state) & PLAIN_ROUND.final_states, state
    for final in PLAIN_ROUND.final_states:
        assert PLAIN_ROUND.allowed(final) == frozenset()


def test_plain_protocol_keeps_its_failure_and_reopen_edges() -> None:
    assert RS.COLLECTING in PLAIN_ROUND.allowed(RS.COLLECTING)  # a re-opened round stays collecting
    for state in (RS.WAITING, RS.COLLECTING, RS.AGGREGATING):
        assert RS.FAILED in PLAIN_ROUND.allowed(state)
    assert RS.CANCELLED not in PLAIN_ROUND.allowed(RS.AGGREGATING)  # a stop lets the aggregation finish


@pytest.mark.parametrize(
    ("phases", "transitions", "fragment"),
    [
        (("a", "b"), {"a": {"b"}}, "moves to ['b']"),
        (("a", "b"), {"a": set(), "b": set()}, "must be allowed to move to the next, 'b'"),
        (("a", "b"), {"a": {"b"}, "b": {"a"}}, "must be final"),
        (("a", "b"), {"a": {"b"}, "b": set(), "c": {"b"}}, "['c'] cannot be reached from 'a'"),
        (("a",), {"a": set()}, "at least two distinct states"),
        (("a", "b"), {"a": {"b"}, "b": set(), "x" * 25: set()}, "at most 24 characters"),
    ],
)
def test_a_malformed_protocol_is_refused_with_what_is_wrong(
    phases: tuple[str, ...], transitions: dict[str, set[str]], fragment: str
) -> None:
    table = {source: frozenset(targets) for source, targets in transitions.items()}
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        RoundProtocol(name="broken", phases=phases, transitions=table)


def test_registering_a_different_protocol_under_a_taken_name_is_refused(masked: RoundProtocol) -> None:
    assert round_protocol_register(_masked_protocol()) is not None  # the same table again: a no-op
    with pytest.raises(ValueError, match="already registered as 'plain'"):
        round_protocol_register(
            PLAIN_ROUND.extended(
                name=PLAIN,
                phases=PLAIN_ROUND.phases,
                transitions={RS.AGGREGATING: {RS.COMPLETED, RS.FAILED, RS.CANCELLED}},
            )
        )
    assert round_protocol(PLAIN) is PLAIN_ROUND
    with pytest.raises(UnknownRoundProtocol, match="No round protocol 'nope'"):
        round_protocol("nope")


def test_an_extended_protocol_leaves_the_plain_table_alone(masked: RoundProtocol) -> None:
    assert masked.reachable_from(masked.initial) == set(RS.values) | {ADVERTISE_KEYS, SHARE_KEYS, UNMASKING}
    assert masked.final_states == PLAIN_ROUND.final_states
    assert PLAIN_ROUND.allowed(RS.WAITING) == {RS.COLLECTING, RS.CANCELLED, RS.FAILED}
    assert ADVERTISE_KEYS not in PLAIN_ROUND.transitions


@pytest.mark.django_db
def test_a_protocols_phases_are_accepted_only_for_that_protocol(
    make_training: Any, masked: RoundProtocol
) -> None:
    round_ = make_training().rounds.get()  # no agents: the round waits
    assert round_.status == RS.WAITING
    plain_refuses = pytest.raises(IllegalTransition, match="from 'waiting_for_agents' to 'advertise_keys'")
    with plain_refuses, transaction.atomic():
        transition_round(lock_round(round_.pk), ADVERTISE_KEYS)
    masked_refuses = pytest.raises(IllegalTransition, match=r"Round 1 \(test-masked\) cannot go")
    with masked_refuses, transaction.atomic():  # plain's waiting -> collecting is not a masked move
        transition_round(lock_round(round_.pk), RS.COLLECTING, protocol=masked.name)
    for phase in masked.phases[1:]:
        with transaction.atomic():
            transition_round(lock_round(round_.pk), phase, protocol=masked.name)
        round_.refresh_from_db()
        assert round_.status == phase
        if phase == UNMASKING:  # a masked phase is not a plain state: plain refuses to move it on
            with pytest.raises(IllegalTransition), transaction.atomic():
                transition_round(lock_round(round_.pk), RS.AGGREGATING)
    assert round_.opened_at is not None and round_.closed_at is not None and round_.completed_at is not None
    with pytest.raises(UnknownRoundProtocol), transaction.atomic():
        transition_round(lock_round(round_.pk), RS.FAILED, protocol="nope")


@pytest.mark.django_db
def test_a_plain_round_walks_exactly_the_plain_phases(make_agent: Any, make_training: Any) -> None:
    visited: list[str] = []

    def record(sender: Any, instance: Round, created: bool, update_fields: Any, **kwargs: Any) -> None:
        if created or (update_fields and "status" in update_fields):
            visited.append(instance.status)

    agents = [make_agent()[0] for _ in range(2)]
    post_save.connect(record, sender=Round, dispatch_uid="test-round-phases")
    try:
        training = make_training(min_clients_per_round=2, max_clients_per_round=2, max_rounds=1)
        spec = ParameterSpec.from_json(training.parameter_spec)
        body = to_bytes({t.name: np.full(t.shape, 0.1, dtype=np.float32) for t in spec.tensors})
        round_ = training.rounds.get()
        for agent in agents:
            task = round_.tasks.get(agent=agent)
            services.update_submit(
                agent=agent, task_id=task.pk, body=io.BytesIO(body), meta={"num_examples": 3}
            )
        assert services.round_aggregate(round_id=round_.pk) == "training_completed"
    finally:
        post_save.disconnect(dispatch_uid="test-round-phases", sender=Round)
    assert visited == list(PLAIN_ROUND.phases)
