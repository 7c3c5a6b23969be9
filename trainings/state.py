"""Explicit state machines for trainings, rounds and tasks.

A status changes only through ``transition_*`` here: the row is re-read under ``select_for_update``
inside the caller's transaction and the move is checked against the tables below.

A round's moves depend on its protocol. ``RoundProtocol`` describes one: its phases in order (the path a
round takes when all goes well) and every allowed move, failures and re-opening included. Protocols are
registered by name in ``ROUND_PROTOCOLS``; ``transition_round`` checks a move against the protocol it is
given, ``plain`` when none is (every round of the plain path). A later protocol (secure aggregation:
key advertisement, share exchange, masked upload, unmasking) adds its phases as rows of its own
``RoundProtocol`` (``PLAIN_ROUND.extended(...)``) registered by its one module; the plain table, and so
the plain path, stay as they are.

Invariants: every protocol's table is closed (every move goes to a state of the table), every state is
reachable from the first phase, consecutive phases are moves, the last phase and every state with no
move out are final, and a move is accepted only by the protocol whose table holds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from types import MappingProxyType
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from fedsite.errors import Conflict
from trainings.models import Round, Task, Training

TS = Training.Status
RS = Round.Status
KS = Task.Status

TRAINING_TRANSITIONS: dict[str, frozenset[str]] = {
    TS.PENDING: frozenset({TS.RUNNING, TS.STOPPED, TS.FAILED}),
    TS.RUNNING: frozenset({TS.COMPLETED, TS.STOPPED, TS.FAILED, TS.BUDGET_EXHAUSTED}),
    TS.COMPLETED: frozenset(),
    TS.STOPPED: frozenset(),
    TS.FAILED: frozenset(),
    TS.BUDGET_EXHAUSTED: frozenset(),
}

TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    KS.PENDING: frozenset({KS.DELIVERED, KS.COMPLETED, KS.FAILED, KS.EXPIRED, KS.CANCELLED}),
    KS.DELIVERED: frozenset({KS.COMPLETED, KS.FAILED, KS.EXPIRED, KS.CANCELLED}),
    KS.COMPLETED: frozenset(),
    KS.FAILED: frozenset(),
    KS.EXPIRED: frozenset(),
    KS.CANCELLED: frozenset(),
}

ROUND_STATUS_MAX_LENGTH = Round._meta.get_field("status").max_length


class IllegalTransition(Conflict):
    default_code = "illegal_transition"


class UnknownRoundProtocol(LookupError):
    """A round protocol name that is not registered (a programming error, not bad input)."""


@dataclass(frozen=True)
class RoundProtocol:
    """How a round of one protocol moves: its phases in order and every allowed move between states.

    Parameters
    ----------
    name
        The name the protocol is registered and looked up by.
    phases
        The path of a round when all goes well, from the state it is created in to the state it
        completes in; each phase must be allowed to move to the next.
    transitions
        Every state (phases, and the states a round fails or is cancelled into) mapped to the states it
        may move to; a state that moves nowhere is final. A state may move to itself (a re-opened round
        stays collecting).

    Raises
    ------
    ValueError
        When the table is not closed, a state is unreachable from the first phase, a phase cannot move
        to the next, the last phase is not final, or a state's name does not fit ``Round.status``.
    """

    name: str
    phases: tuple[str, ...]
    transitions: Mapping[str, frozenset[str]]

    def __post_init__(self) -> None:
        table = {
            str(source): frozenset(str(t) for t in targets) for source, targets in self.transitions.items()
        }
        phases = tuple(str(phase) for phase in self.phases)
        object.__setattr__(self, "transitions", MappingProxyType(table))
        object.__setattr__(self, "phases", phases)
        label = f"Round protocol {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"A round protocol needs a non-empty name. Found {self.name!r}.")
        if len(phases) < 2 or len(set(phases)) != len(phases):
            raise ValueError(f"{label}: phases must be at least two distinct states. Found {list(phases)}.")
        too_long = sorted(s for s in table if len(s) > ROUND_STATUS_MAX_LENGTH)
        if too_long:
            raise ValueError(
                f"{label}: state names must be at most {ROUND_STATUS_MAX_LENGTH} characters "
                f"(Round.status). Found {too_long}."
            )
        unknown = sorted({t for targets in table.values() for t in targets} - set(table))
        missing_phases = [phase for phase in phases if phase not in table]
        if unknown or missing_phases:
            raise ValueError(
                f"{label}: every state needs its own row. Found moves to {unknown} and phases "
                f"{missing_phases} without one; add a row for each (an empty one for a final state)."
            )
        for source, target in pairwise(phases):
            if target not in table[source]:
                raise ValueError(
                    f"{label}: phase {source!r} must be allowed to move to the next, {target!r}."
                )
        if table[phases[-1]]:
            raise ValueError(f"{label}: the last phase {phases[-1]!r} must be final (move nowhere).")
        unreachable = sorted(set(table) - self.reachable_from(phases[0]))
        if unreachable:
            raise ValueError(f"{label}: states {unreachable} cannot be reached from {phases[0]!r}.")

    @property
    def initial(self) -> str:
        """The state a round of this protocol is created in."""
        return self.phases[0]

    @property
    def final_states(self) -> frozenset[str]:
        """States a round never leaves (completed, failed, cancelled for the plain protocol)."""
        return frozenset(source for source, targets in self.transitions.items() if not targets)

    def allowed(self, source: str) -> frozenset[str]:
        """The states a round in ``source`` may move to (empty for a final or unknown state)."""
        return self.transitions.get(str(source), frozenset())

    def reachable_from(self, source: str) -> set[str]:
        """Every state a round in ``source`` can get to, ``source`` included."""
        seen, stack = {str(source)}, [str(source)]
        while stack:
            for target in self.allowed(stack.pop()):
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return seen

    def extended(
        self, *, name: str, phases: Iterable[str], transitions: Mapping[str, Iterable[str]]
    ) -> RoundProtocol:
        """A new protocol: this table with the given rows added or replaced, and its own phases."""
        table = dict(self.transitions)
        table.update({str(source): frozenset(targets) for source, targets in transitions.items()})
        return RoundProtocol(name=name, phases=tuple(phases), transitions=table)


ROUND_PROTOCOLS: dict[str, RoundProtocol] = {}


def round_protocol_register(protocol: RoundProtocol) -> RoundProtocol:
    """Register ``protocol`` under its name (again with the same table is a no-op); returns it."""
    existing = ROUND_PROTOCOLS.get(protocol.name)
    if existing is not None and existing != protocol:
        raise ValueError(f"A different round protocol is already registered as {protocol.name!r}.")
    ROUND_PROTOCOLS[protocol.name] = protocol
    return protocol


def round_protocol(name: str) -> RoundProtocol:
    """The registered protocol called ``name``."""
    try:
        return ROUND_PROTOCOLS[name]
    except KeyError:
        raise UnknownRoundProtocol(
            f"No round protocol {name!r} is registered; registered: {sorted(ROUND_PROTOCOLS)}."
        ) from None


PLAIN = "plain"
PLAIN_ROUND = round_protocol_register(
    RoundProtocol(
        name=PLAIN,
        phases=(RS.WAITING, RS.COLLECTING, RS.AGGREGATING, RS.COMPLETED),
        transitions={
            RS.WAITING: frozenset({RS.COLLECTING, RS.CANCELLED, RS.FAILED}),
            RS.COLLECTING: frozenset({RS.COLLECTING, RS.AGGREGATING, RS.FAILED, RS.CANCELLED}),
            RS.AGGREGATING: frozenset({RS.COMPLETED, RS.FAILED}),
            RS.COMPLETED: frozenset(),
            RS.FAILED: frozenset(),
            RS.CANCELLED: frozenset(),
        },
    )
)
ROUND_TRANSITIONS: Mapping[str, frozenset[str]] = PLAIN_ROUND.transitions


def _check(kind: str, table: Mapping[str, frozenset[str]], source: str, target: str, label: str) -> None:
    source, target = str(source), str(target)
    if target not in table.get(source, frozenset()):
        raise IllegalTransition(
            f"{label} cannot go from {source!r} to {target!r}; allowed from {source!r}: "
            f"{sorted(str(s) for s in table.get(source, frozenset())) or 'nothing (final state)'}.",
            details={"object": kind, "from": source, "to": target},
        )


def lock_training(training_id: object) -> Training:
    return Training.objects.select_for_update().get(pk=training_id)


def lock_round(round_id: int) -> Round:
    return Round.objects.select_for_update().select_related("training").get(pk=round_id)


def transition_training(training: Training, target: str, *, reason: str = "") -> Training:
    """Move a training (already locked by the caller) to ``target``."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("transition_training must run inside transaction.atomic()")
    _check("training", TRAINING_TRANSITIONS, training.status, target, f"Training {training.pk}")
    training.status = target
    fields = ["status"]
    now = timezone.now()
    if target == TS.RUNNING:
        training.started_at = now
        fields.append("started_at")
    if target in Training.TERMINAL:
        training.finished_at = now
        training.stop_reason = reason[:200]
        fields += ["finished_at", "stop_reason"]
    training.save(update_fields=fields)
    return training


def transition_round(round_: Round, target: str, *, error: str = "", protocol: str = PLAIN) -> Round:
    """Move a round (already locked by the caller) to ``target``, as ``protocol``'s table allows."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("transition_round must run inside transaction.atomic()")
    table = round_protocol(protocol)
    label = f"Round {round_.number}" if protocol == PLAIN else f"Round {round_.number} ({protocol})"
    _check("round", table.transitions, round_.status, target, label)
    round_.status = target
    fields = ["status"]
    now = timezone.now()
    if target == RS.COLLECTING and round_.opened_at is None:
        round_.opened_at = now
        fields.append("opened_at")
    if target == RS.AGGREGATING:
        round_.closed_at = now
        fields.append("closed_at")
    if target in table.final_states:
        round_.completed_at = now
        fields.append("completed_at")
        if round_.closed_at is None:
            round_.closed_at = now
            fields.append("closed_at")
    if error:
        round_.error = error
        fields.append("error")
    round_.save(update_fields=fields)
    return round_


def deliver_task_if_pending(task: Task) -> bool:
    """``pending -> delivered`` in ONE conditional ``UPDATE`` (no lock, no re-read); False if the task was
    no longer pending (another request delivered, completed, expired or cancelled it meanwhile).

    Checked against the task table as :func:`transition_task` is; the ``WHERE status = 'pending'`` gives the
    same guarantee as re-reading the row under ``select_for_update``.
    """
    _check("task", TASK_TRANSITIONS, KS.PENDING, KS.DELIVERED, f"Task {task.pk}")
    now = timezone.now()
    if not Task.objects.filter(pk=task.pk, status=KS.PENDING).update(status=KS.DELIVERED, delivered_at=now):
        return False
    task.status, task.delivered_at = KS.DELIVERED, now
    return True


def deliver_tasks_if_pending(tasks: Sequence[Task]) -> set[Any]:
    """:func:`deliver_task_if_pending` of many tasks in ONE conditional ``UPDATE ... RETURNING``: the pks of
    those it moved (each updated in memory too); the others were no longer pending."""
    if not tasks:
        return set()
    _check("task", TASK_TRANSITIONS, KS.PENDING, KS.DELIVERED, f"Task {tasks[0].pk}")
    now = timezone.now()
    table = connection.ops.quote_name(Task._meta.db_table)
    status = connection.ops.quote_name(Task._meta.get_field("status").column)
    delivered_at_field = Task._meta.get_field("delivered_at")
    delivered_at = connection.ops.quote_name(delivered_at_field.column)
    pk = connection.ops.quote_name(Task._meta.pk.column)
    pk_field = Task._meta.pk
    values = [pk_field.get_db_prep_value(task.pk, connection) for task in tasks]
    marks = ", ".join(["%s"] * len(values))
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {status} = %s, {delivered_at} = %s "  # noqa: S608 - names quoted, values bound
            f"WHERE {pk} IN ({marks}) AND {status} = %s RETURNING {pk}",
            [
                KS.DELIVERED,
                delivered_at_field.get_db_prep_value(now, connection),
                *values,
                KS.PENDING,
            ],
        )
        moved = {pk_field.to_python(row[0]) for row in cursor.fetchall()}
    for task in tasks:
        if task.pk in moved:
            task.status, task.delivered_at = KS.DELIVERED, now
    return moved


def transition_task(task: Task, target: str, *, reason: str = "") -> Task:
    """Move a task (locked by the caller, or its round locked) to ``target``."""
    transition_tasks([task], target, reason=reason)
    return task


def transition_tasks(tasks: Sequence[Task], target: str, *, reason: str = "") -> None:
    """:func:`transition_task` of several tasks to one ``target``, in one ``UPDATE``; each transition is
    checked first (an illegal one raises before anything is written)."""
    if not tasks:
        return
    for task in tasks:
        _check("task", TASK_TRANSITIONS, task.status, target, f"Task {task.pk}")
    fields: dict[str, Any] = {"status": target}
    now = timezone.now()
    if target == KS.DELIVERED:
        fields["delivered_at"] = now
    if target in (KS.COMPLETED, KS.FAILED, KS.EXPIRED, KS.CANCELLED):
        fields["completed_at"] = now
    if reason:
        fields["failure_reason"] = reason[:2000]
    Task.objects.filter(pk__in=[task.pk for task in tasks]).update(**fields)
    for task in tasks:
        for name, value in fields.items():
            setattr(task, name, value)
