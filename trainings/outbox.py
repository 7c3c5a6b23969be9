"""The transactional outbox of aggregations: the intent to aggregate is a row, not a broker message.

A round that closes writes an ``AggregationOutbox`` row in the same transaction that moves it to
``aggregating``; the row is relayed to Celery after commit and, whenever that did not happen or the task
went silent, again by the beat check (``trainings.check_deadlines``). This is the outbox pattern
(Richardson, *Microservices Patterns*, ch. 3.3.7) with the beat check as the relay's retry loop.

Invariants:
- Every round in ``aggregating`` has one outbox row, committed with the state change: a broker outage at
  close, or a process dying between commit and publish, loses no aggregation.
- Relaying never raises into the caller: a refused publish is counted on the row (``send_failures``,
  ``last_error``) and retried by the next beat check, so the upload that closed the round still gets 201.
- A running aggregation task heartbeats on its row every ``FEDSITE_AGGREGATION_HEARTBEAT_SECONDS``; a row
  whose last sign of life (publish, start, heartbeat) is older than ``FEDSITE_AGGREGATION_STALL_SECONDS``
  is sent again, and an ``aggregation_stalled`` alert is raised once per round and resolved when the
  round leaves ``aggregating``.
- Sending twice is safe: aggregation re-reads the round under a row lock before it writes the version, so
  of two tasks for one round one commits and the other returns ``skipped`` (one version per round).
- Nothing here rewrites a round's timestamps: ``closed_at`` stays the close time; sends, refusals and
  runs are counted on the row.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connections, transaction
from django.db.models import F
from django.utils import timezone

from fedsite.logs import log_event
from monitoring.models import Alert
from monitoring.services import alert_raise, alert_resolve
from trainings.models import AggregationOutbox, Round

logger = logging.getLogger("trainings.outbox")

RS = Round.Status
# Publishing is bounded so a dead broker costs the closing request about a second, not the default
# retry schedule; the beat check is the real retry loop.
RELAY_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.3, "interval_max": 0.3}


def aggregation_intent_record(round_: Round) -> AggregationOutbox:
    """Record the intent to aggregate ``round_`` (locked, just moved to ``aggregating`` in the caller's
    transaction) and relay it to Celery once that transaction commits."""
    outbox, _ = AggregationOutbox.objects.get_or_create(round=round_)
    round_id = round_.pk
    transaction.on_commit(lambda: aggregation_relay(round_id=round_id))
    return outbox


def aggregation_relay(*, round_id: int) -> bool:
    """Publish the aggregation task of a round; True if the broker took it. Never raises."""
    from trainings.tasks import aggregate_round

    try:
        aggregate_round.apply_async((round_id,), retry=True, retry_policy=RELAY_RETRY_POLICY)
    except Exception as exc:  # the broker is down or refused: the row stays, the beat check retries
        error = f"{type(exc).__name__}: {exc}"
        AggregationOutbox.objects.filter(round_id=round_id).update(
            send_failures=F("send_failures") + 1, last_error=error[:2000]
        )
        log_event(
            logger,
            "aggregation_relay_failed",
            level=logging.WARNING,
            round_id=round_id,
            error=repr(error[:200]),
        )
        return False
    AggregationOutbox.objects.filter(round_id=round_id).update(sent_at=timezone.now(), sends=F("sends") + 1)
    return True


def aggregation_intent_complete(round_: Round) -> None:
    """The round left ``aggregating`` (completed or failed): close its row and resolve its stall alert.
    Runs in the transaction that moved the round."""
    AggregationOutbox.objects.filter(round=round_, completed_at__isnull=True).update(
        completed_at=timezone.now()
    )
    alert_resolve(kind=Alert.Kind.AGGREGATION_STALLED, training=round_.training, round_number=round_.number)


@contextmanager
def aggregation_heartbeat(*, round_id: int, start: bool = True, beat: bool = True) -> Iterator[None]:
    """Heartbeat on the round's outbox row while the body runs (in a thread with its own connection).

    ``start`` marks a new run of the aggregation task (the chunk tasks of a split aggregation only beat);
    ``beat=False`` skips the thread (eager Celery runs inside the caller's transaction).
    """
    now = timezone.now()
    pending = AggregationOutbox.objects.filter(round_id=round_id, completed_at__isnull=True)
    if start:
        pending.update(started_at=now, heartbeat_at=now, runs=F("runs") + 1)
    else:
        pending.update(heartbeat_at=now)
    if not beat:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(
        target=_beat, args=(round_id, stop), name=f"aggregation-heartbeat-{round_id}", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=settings.FEDSITE_AGGREGATION_HEARTBEAT_SECONDS + 5)


def _beat(round_id: int, stop: threading.Event) -> None:
    try:
        while not stop.wait(settings.FEDSITE_AGGREGATION_HEARTBEAT_SECONDS):
            try:
                AggregationOutbox.objects.filter(round_id=round_id, completed_at__isnull=True).update(
                    heartbeat_at=timezone.now()
                )
            except DatabaseError:  # a missed beat only risks a harmless duplicate run
                logger.warning("aggregation_heartbeat_failed round_id=%s", round_id, exc_info=True)
    finally:
        connections.close_all()  # this thread's own connections


def aggregation_drill_delay() -> None:
    """Fault drills only: hold the running aggregation for ``FEDSITE_AGGREGATION_DRILL_DELAY_SECONDS``
    (heartbeating), so a worker can be killed mid-aggregation on purpose. 0 (the default) does nothing."""
    delay = settings.FEDSITE_AGGREGATION_DRILL_DELAY_SECONDS
    if delay > 0:
        time.sleep(delay)


def aggregations_recover(*, now: Any = None) -> dict[str, int]:
    """Run by the beat check: relay intents never published, re-send aggregations gone silent.

    Returns counts: ``aggregations_relayed`` (never published before), ``aggregations_resent`` (published
    but no sign of life for the stall period) and ``aggregations_refused`` (the broker is still down).
    """
    now = now or timezone.now()
    stall = timedelta(seconds=settings.FEDSITE_AGGREGATION_STALL_SECONDS)
    # the commit-time relay of a fresh row may be in flight: leave it one check period
    grace = timedelta(
        seconds=min(settings.FEDSITE_DEADLINE_CHECK_SECONDS, settings.FEDSITE_AGGREGATION_STALL_SECONDS)
    )
    summary = {"aggregations_relayed": 0, "aggregations_resent": 0, "aggregations_refused": 0}
    for outbox_id in AggregationOutbox.objects.filter(completed_at__isnull=True).values_list("pk", flat=True):
        with transaction.atomic():
            outbox = (
                AggregationOutbox.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("round__training")
                .filter(pk=outbox_id, completed_at__isnull=True)
                .first()
            )
            if outbox is None:
                continue
            action = _recovery_action(outbox, now=now, stall=stall, grace=grace)
            if action is None:
                continue
            _alert_stalled(outbox, action=action, now=now)
            # under the row lock, so two overlapping checks never both send
            sent = aggregation_relay(round_id=outbox.round_id)
        if not sent:
            summary["aggregations_refused"] += 1
        elif action == "relay":
            summary["aggregations_relayed"] += 1
        else:
            summary["aggregations_resent"] += 1
    return summary


def _recovery_action(
    outbox: AggregationOutbox, *, now: Any, stall: timedelta, grace: timedelta
) -> str | None:
    round_ = outbox.round
    if round_.status != RS.AGGREGATING:  # left aggregating without closing its row (an older code path)
        AggregationOutbox.objects.filter(pk=outbox.pk).update(completed_at=round_.completed_at or now)
        return None
    previous_aggregating = Round.objects.filter(
        training_id=round_.training_id, number=round_.number - 1, status=RS.AGGREGATING
    ).exists()
    if previous_aggregating:
        return None  # an asynchronous step waits for the one before; that one is watched, and enqueues it
    if outbox.sent_at is None:
        return "relay" if now - outbox.created_at >= grace else None
    last_sign_of_life = max(
        t for t in (outbox.sent_at, outbox.started_at, outbox.heartbeat_at) if t is not None
    )
    return "resend" if now - last_sign_of_life >= stall else None


def _alert_stalled(outbox: AggregationOutbox, *, action: str, now: Any) -> None:
    round_ = outbox.round
    training = round_.training
    since = max(t for t in (outbox.created_at, outbox.sent_at, outbox.started_at, outbox.heartbeat_at) if t)
    silent = (now - since).total_seconds()
    if action == "relay":
        cause = (
            f"was never handed to a worker: the broker refused it {outbox.send_failures} times "
            f"({outbox.last_error[:200] or 'no error recorded: the process died before publishing'})"
        )
    else:
        cause = (
            f"has shown no sign of life for {silent:.0f} s (no heartbeat from a worker: the worker died or "
            "the message was lost)"
        )
    details = {
        "action": action,
        "silent_seconds": round(silent, 1),
        "sends": outbox.sends,
        "send_failures": outbox.send_failures,
        "runs": outbox.runs,
        "closed_at": round_.closed_at.isoformat() if round_.closed_at else None,
    }
    log_event(
        logger,
        "aggregation_stalled",
        level=logging.WARNING,
        training_id=training.pk,
        round=round_.number,
        action=action,
        silent=f"{silent:.1f}",
    )
    existing = Alert.objects.filter(
        kind=Alert.Kind.AGGREGATION_STALLED,
        training=training,
        round_number=round_.number,
        resolved_at__isnull=True,
    ).first()
    if existing is not None:  # one alert per stall; later attempts only update its figures
        existing.details = {**details, "recoveries": int(existing.details.get("recoveries", 1)) + 1}
        existing.save(update_fields=["details"])
        return
    alert_raise(
        kind=Alert.Kind.AGGREGATION_STALLED,
        severity=Alert.Severity.WARNING,
        training=training,
        round_number=round_.number,
        message=(
            f"The aggregation of round {round_.number} {cause}; sending it to a worker again. "
            "If this repeats, check that Redis and the Celery workers of the aggregation queue are up."
        ),
        details={**details, "recoveries": 1},
    )
