"""Updates: what happens when an agent uploads its result, or gives its task back.

Invariants:

- The body is spooled to a temporary file, hashed and counted in one pass and cut off at the model's
  ``update_max_bytes``; nothing is stored, and no file is left behind, unless the update is accepted.
- An update is validated against the training's parameter spec and must have a finite norm before its
  blob is saved; blobs are content-addressed, so a retried upload writes the same blob.
- Accepting is idempotent: the same body for the same task returns the stored update; a different body
  is a 409. The task and its round are re-checked under row locks before the update row is written, and
  the round is settled in the same transaction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from clients.models import Agent
from clients.services import agent_record_outcome, agents_record_outcome
from fedsite.errors import Conflict, Forbidden, NotFound, PayloadTooLarge, ValidationFailed
from fedsite.logs import log_event
from fedsite.parsers import json_check, json_parse, text_check
from flcore.errors import SerdeError
from flcore.parameters import ParameterSpec, from_bytes, iter_file_tensors, validate_file
from trainings.models import ClientUpdate, Round, Task, Training
from trainings.services.rounds import _round_settle
from trainings.services.tasks import _get_agent_task
from trainings.services.trainings import is_asynchronous
from trainings.state import lock_round, transition_task, transition_tasks
from versioning.blobs import (
    BlobTooLarge,
    Readable,
    SpooledBlob,
    blob_local_path,
    blob_read,
    blob_save_spooled,
    blob_spool,
    blobs_save_spooled,
)

logger = logging.getLogger("trainings")

RS, KS = Round.Status, Task.Status
MAX_METRICS = 64
MAX_FAIL_REASON_CHARS = 1000


def _parse_update_meta(meta: Any) -> tuple[int, dict[str, float]]:
    if isinstance(meta, bytes | str):
        meta = json_parse(meta, field="meta")
    else:
        json_check(meta, field="meta")
    if not isinstance(meta, dict):
        raise ValidationFailed("meta must be a JSON object with num_examples and metrics.")
    num_examples = meta.get("num_examples")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or not 1 <= num_examples <= 10**9:
        raise ValidationFailed(
            f"num_examples must be an integer between 1 and 10^9. Found {num_examples!r}.",
            details={"num_examples": "Out of range or not an integer."},
        )
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS:
        raise ValidationFailed(f"metrics must be an object with at most {MAX_METRICS} numeric entries.")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > 64:
            raise ValidationFailed("metric names must be strings of at most 64 characters.")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValidationFailed(
                f"metric {key!r} must be a finite number. Found {value!r}.", details={"metrics": key}
            )
        clean[key] = float(value)
    return num_examples, clean


def update_max_bytes(training: Training) -> int:
    """Largest acceptable update body: the model's float32 size plus header room, capped by settings."""
    spec = ParameterSpec.from_json(training.parameter_spec)
    header_room = 1024 + 128 * len(spec.tensors)
    return min(spec.nbytes + header_room, settings.FEDSITE_MAX_UPDATE_BYTES)


def update_too_large(size: int | str, limit: int) -> PayloadTooLarge:
    """The 413 of an update body over its task's limit (``size``: its bytes, or "more than <limit>")."""
    return PayloadTooLarge(
        f"The update is {size} bytes; this model's updates are at most {limit} bytes.",
        code="update_too_large",
        details={"max_update_bytes": limit},
    )


@dataclass(frozen=True)
class UpdateAdmission:
    """What :func:`update_admit` found before any byte of an update's body was read: the agent's task, its
    parsed meta and the most bytes the body may have (:func:`update_max_bytes`)."""

    agent: Agent
    task: Task
    num_examples: int
    metrics: dict[str, float]
    max_bytes: int


def update_admit(
    *, agent: Agent, task_id: Any, meta: Any, declared_bytes: int | None = None
) -> UpdateAdmission:
    """The checks of an upload that need no body: the task is the agent's (404, 403), the meta is valid
    (400) and a ``declared_bytes`` is within the task's limit (413). The body is then read up to
    ``max_bytes`` (a longer one is a 413 too) and given to :func:`update_accept_spooled`."""
    (outcome,) = updates_admit([(agent, task_id, meta, declared_bytes)])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def updates_admit(
    requests: Sequence[tuple[Agent, Any, Any, int | None]],
) -> list[UpdateAdmission | Exception]:
    """:func:`update_admit` of many ``(agent, task_id, meta, declared_bytes)`` at once, in order: each
    request's admission or the error it gets. Their tasks are read in one query."""
    ids: list[Any] = []
    for _, task_id, _, _ in requests:
        try:
            ids.append(Task._meta.pk.to_python(task_id))
        except (ValueError, TypeError, DjangoValidationError):
            ids.append(None)
    tasks = {
        task.pk: task
        for task in Task.objects.select_related("round__training").filter(
            pk__in={pk for pk in ids if pk is not None}
        )
    }
    outcomes: list[UpdateAdmission | Exception] = []
    for (agent, task_id, meta, declared_bytes), pk in zip(requests, ids, strict=True):
        try:
            task = tasks.get(pk)
            if task is None:
                raise NotFound(f"No task with id {task_id!r}.", code="task_not_found")
            if task.agent_id != agent.pk:
                raise Forbidden("This task belongs to another agent.", code="not_your_task")
            task.agent = agent
            num_examples, metrics = _parse_update_meta(meta)
            limit = update_max_bytes(task.round.training)
            if declared_bytes is not None and declared_bytes > limit:
                raise update_too_large(declared_bytes, limit)
            outcomes.append(UpdateAdmission(agent, task, num_examples, metrics, limit))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def update_accept_spooled(admission: UpdateAdmission, spooled: SpooledBlob) -> tuple[ClientUpdate, bool]:
    """Validate and store a body spooled for ``admission`` (the file stays the caller's to remove unless
    it became the blob). Returns ``(update, created)``; see :func:`update_submit`."""
    (outcome,) = updates_accept_spooled([(admission, spooled)])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def update_submit(
    *,
    agent: Agent,
    task_id: Any,
    body: Readable | None = None,
    meta: Any,
    declared_bytes: int | None = None,
    spooled: SpooledBlob | None = None,
) -> tuple[ClientUpdate, bool]:
    """Accept an agent's update for its task. Returns ``(update, created)``.

    ``body`` is read in chunks into a temporary file, hashed and counted in the same pass and cut off
    at the task's ``max_update_bytes`` (a ``declared_bytes`` above it is refused before anything is
    read); the safetensors are then validated from that file, which becomes the blob. Alternatively
    ``spooled`` is a body already spooled that way; its size is held to the same limit, and the file
    stays the caller's to remove unless it became the blob. Nothing is stored and no file is left behind
    unless the update is accepted. Idempotent: the same body again returns the stored update; a
    different body is a 409. The same as :func:`update_admit` then :func:`update_accept_spooled`.
    """
    admission = update_admit(agent=agent, task_id=task_id, meta=meta, declared_bytes=declared_bytes)
    if spooled is not None:
        return update_accept_spooled(admission, spooled)
    if body is None:
        raise ValueError("update_submit needs a body to read or a spooled one.")
    try:
        with blob_spool(body, max_bytes=admission.max_bytes) as spooled:
            return update_accept_spooled(admission, spooled)
    except BlobTooLarge as exc:
        raise update_too_large(f"more than {admission.max_bytes}", admission.max_bytes) from exc


@dataclass
class _Checked:
    """An upload of a batch that passed the checks outside the transaction."""

    index: int
    admission: UpdateAdmission
    spooled: SpooledBlob
    norm: float
    blob_name: str = ""


#: What each upload of :func:`updates_accept_spooled` gets: ``(update, created)``, or its error.
Accepted = tuple[ClientUpdate, bool] | Exception


def updates_accept_spooled(items: Sequence[tuple[UpdateAdmission, SpooledBlob]]) -> list[Accepted]:
    """:func:`update_accept_spooled` of many uploads at once (the uploads of a round arrive together), in
    order: each upload's ``(update, created)``, or the error it gets, as it would get alone.

    Outside any transaction: the stored updates of their tasks in one query (a repeated upload answers
    from it), then each body checked against its task's spec (the values, their norm) and the accepted
    blobs registered and moved into the store together (:func:`versioning.blobs.blobs_save_spooled`). Then,
    per round, ONE transaction: the round's row lock, the tasks' row locks (one statement), their update
    rows (one ``INSERT``), the tasks completed (one ``UPDATE``), the agents' counters and failure alerts
    (``clients.services.agents_record_outcome``), and the round settled once. A task that closed meanwhile
    gets ``task_closed``, or its stored update when the same body was accepted by another request. An
    asynchronous training's uploads are recorded one by one (each may close the round it joins).
    """
    outcomes: list[Accepted | None] = [None] * len(items)
    stored = {
        update.task_id: update
        for update in ClientUpdate.objects.filter(task_id__in={admission.task.pk for admission, _ in items})
    }
    checked: list[_Checked] = []
    for index, (admission, spooled) in enumerate(items):
        try:
            if spooled.size > admission.max_bytes:
                raise update_too_large(spooled.size, admission.max_bytes)
            existing = stored.get(admission.task.pk)
            if existing is not None:
                outcomes[index] = (
                    _idempotent_update(existing, spooled.sha256, admission.num_examples),
                    False,
                )
                continue
            checked.append(_Checked(index, admission, spooled, _checked_norm(admission, spooled)))
        except Exception as exc:
            outcomes[index] = exc
    _save_blobs(checked, outcomes)
    rounds: dict[Any, list[_Checked]] = {}
    for entry in checked:
        if outcomes[entry.index] is None:
            task = entry.admission.task
            key = ("one", entry.index) if is_asynchronous(task.round.training) else ("round", task.round_id)
            rounds.setdefault(key, []).append(entry)
    for (kind, _), entries in rounds.items():
        try:
            _record_updates(entries, outcomes, asynchronous=kind == "one")
        except IntegrityError:  # another request stored one of these tasks' updates first
            for entry in entries:
                outcomes[entry.index] = _stored_outcome(entry)
        except Exception as exc:  # a statement shared by the round's uploads failed: each gets its error
            for entry in entries:
                outcomes[entry.index] = exc
    for entry in checked:
        outcome = outcomes[entry.index]
        if isinstance(outcome, tuple) and outcome[1]:
            task = entry.admission.task
            log_event(
                logger,
                "update_accepted",
                training_id=task.round.training_id,
                round=task.round.number,
                agent_id=entry.admission.agent.agent_id,
                num_examples=entry.admission.num_examples,
                norm=f"{entry.norm:.4g}",
            )
    return outcomes  # type: ignore[return-value]  # (every index was filled above)


def _checked_norm(admission: UpdateAdmission, spooled: SpooledBlob) -> float:
    """The checks of an upload before its blob is saved: its task still open, then its values (the checks
    of load_file and the norm in one pass over the mapped file, no copy of the values)."""
    task = admission.task
    asynchronous = is_asynchronous(task.round.training)
    round_closed = task.round.status != RS.COLLECTING and not asynchronous
    if task.status not in Task.OPEN or round_closed or task.deadline <= timezone.now():
        raise Conflict(
            f"Task {task.pk} is closed (task {task.status}, round {task.round.status}); "
            "drop it and poll again.",
            code="task_closed",
        )
    spec = ParameterSpec.from_json(task.round.training.parameter_spec)
    try:
        norm = validate_file(spooled.path, spec=spec, max_bytes=admission.max_bytes)
    except SerdeError as exc:
        raise ValidationFailed(str(exc), code=f"bad_update_{exc.code}") from exc
    if not math.isfinite(norm):
        raise ValidationFailed(
            "The update's norm overflows float64; send a smaller update.", code="bad_update_non_finite"
        )
    return norm


def _save_blobs(checked: list[_Checked], outcomes: list[Accepted | None]) -> None:
    """Move the checked uploads into the blob store together; if that fails, one by one (an upload whose
    own move fails gets that error)."""
    if not checked:
        return
    try:
        names = blobs_save_spooled([entry.spooled for entry in checked])
    except Exception:
        for entry in checked:
            try:
                entry.blob_name = blob_save_spooled(entry.spooled)
            except Exception as exc:
                outcomes[entry.index] = exc
        return
    for entry, name in zip(checked, names, strict=True):
        entry.blob_name = name


def _record_updates(entries: list[_Checked], outcomes: list[Accepted | None], *, asynchronous: bool) -> None:
    """The update rows of uploads for tasks of one round (or one upload of an asynchronous training), in
    one transaction; each entry's outcome is set when it commits."""
    decided: list[tuple[_Checked, Accepted]] = []
    with transaction.atomic():
        round_ = _collecting_round_for(entries[0].admission.task, asynchronous)
        locked = {
            task.pk: task
            for task in Task.objects.select_for_update()
            .filter(pk__in=[entry.admission.task.pk for entry in entries])
            .order_by("pk")
        }
        new: dict[Any, tuple[_Checked, ClientUpdate]] = {}
        late: list[_Checked] = []
        for entry in entries:
            task, admission = locked[entry.admission.task.pk], entry.admission
            if task.pk in new:  # the same task twice in one batch: as a repeated upload
                try:
                    update = _idempotent_update(new[task.pk][1], entry.spooled.sha256, admission.num_examples)
                    decided.append((entry, (update, False)))
                except Conflict as exc:
                    decided.append((entry, exc))
            elif task.status not in Task.OPEN or round_.status != RS.COLLECTING:
                late.append(entry)
            else:
                update = ClientUpdate(
                    task=task,
                    round=round_,
                    agent=admission.agent,
                    blob_name=entry.blob_name,
                    blob_sha256=entry.spooled.sha256,
                    size_bytes=entry.spooled.size,
                    num_examples=admission.num_examples,
                    metrics=admission.metrics,
                    update_norm=entry.norm,
                )
                new[task.pk] = (entry, update)
        decided.extend((entry, _stored_outcome(entry)) for entry in late)
        if new:
            ClientUpdate.objects.bulk_create([update for _, update in new.values()])
            transition_tasks([locked[pk] for pk in new], KS.COMPLETED)
            agents_record_outcome(
                agent_ids=[entry.admission.agent.pk for entry, _ in new.values()], outcome="completed"
            )
            _round_settle(round_)
            decided.extend((entry, (update, True)) for entry, update in new.values())
    for entry, outcome in decided:
        outcomes[entry.index] = outcome


def _stored_outcome(entry: _Checked) -> Accepted:
    """A task found closed when its update was to be written: the update stored for it if that is this
    same upload (200), else ``task_closed`` or ``update_conflict``."""
    existing = ClientUpdate.objects.filter(task_id=entry.admission.task.pk).first()
    if existing is None:
        return Conflict(
            f"Task {entry.admission.task.pk} closed while the update was being checked; poll again.",
            code="task_closed",
        )
    try:
        return _idempotent_update(existing, entry.spooled.sha256, entry.admission.num_examples), False
    except Conflict as exc:
        return exc


def _collecting_round_for(task: Task, asynchronous: bool) -> Round:
    """The round an update joins, locked: the task's own round, or for asynchronous trainings the one
    collecting now (a task may outlive the round it was issued in)."""
    if not asynchronous:
        return lock_round(task.round_id)
    round_ = (
        Round.objects.select_for_update()
        .select_related("training")
        .filter(training_id=task.round.training_id, status=RS.COLLECTING)
        .order_by("-number")
        .first()
    )
    if round_ is None:
        raise Conflict("The training is not collecting updates any more; poll again.", code="task_closed")
    return round_


def _idempotent_update(existing: ClientUpdate, sha256: str, num_examples: int) -> ClientUpdate:
    if existing.blob_sha256 == sha256 and existing.num_examples == num_examples:
        return existing
    raise Conflict(
        "An update with different content was already accepted for this task; updates cannot be replaced.",
        code="update_conflict",
        details={"accepted_sha256": existing.blob_sha256},
    )


def task_fail(*, agent: Agent, task_id: Any, reason: Any) -> Task:
    """The agent gives its task back; the round may re-open sooner."""
    if not isinstance(reason, str) or not reason.strip():
        raise ValidationFailed("reason must be a non-empty string.", details={"reason": "Required."})
    reason = text_check(reason.strip(), field="reason")
    if len(reason) > MAX_FAIL_REASON_CHARS:
        raise ValidationFailed(
            f"reason must be at most {MAX_FAIL_REASON_CHARS} characters. Found {len(reason)}; shorten it.",
            details={"reason": f"At most {MAX_FAIL_REASON_CHARS} characters."},
        )
    task = _get_agent_task(agent, task_id)
    with transaction.atomic():
        round_ = lock_round(task.round_id)
        locked = Task.objects.select_for_update().get(pk=task.pk)
        if locked.status not in Task.OPEN:
            raise Conflict(f"Task {task.pk} is already {locked.status}.", code="task_closed")
        transition_task(locked, KS.FAILED, reason=reason)
        agent_record_outcome(agent_id=agent.pk, outcome="failed")
        _round_settle(round_)
    log_event(
        logger,
        "task_failed",
        training_id=round_.training_id,
        round=round_.number,
        agent_id=agent.agent_id,
        reason=repr(reason[:200]),
    )
    return locked


def _update_views(update: ClientUpdate, spec: ParameterSpec) -> Any:
    """The stored delta of an update: zero-copy memory-mapped views when the blob store is local."""
    path = blob_local_path(update.blob_name)
    if path is not None:
        return dict(iter_file_tensors(path))
    return from_bytes(blob_read(update.blob_name), spec=spec, max_bytes=update.size_bytes)
