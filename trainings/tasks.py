"""Celery tasks: thin wrappers that take ids and call one service. Names are a deployed API."""

from __future__ import annotations

import logging

from celery import shared_task

from trainings import chunked, services
from trainings.outbox import aggregation_drill_delay, aggregation_heartbeat

logger = logging.getLogger("trainings.tasks")


@shared_task(
    name="trainings.aggregate_round",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=3,
    default_retry_delay=2,
)
def aggregate_round(self, round_id: int) -> str:  # type: ignore[no-untyped-def]
    try:
        with aggregation_heartbeat(round_id=round_id, beat=not self.request.is_eager):
            aggregation_drill_delay()
            return services.round_aggregate(round_id=round_id)
    except Exception as exc:
        if self.request.is_eager or self.request.retries >= self.max_retries:
            logger.exception("aggregation_failed round_id=%s", round_id)
            services.round_mark_aggregation_failed(round_id=round_id, error=f"{type(exc).__name__}: {exc}")
            return "failed"
        raise self.retry(exc=exc) from exc


@shared_task(name="trainings.check_deadlines", acks_late=True, ignore_result=True)
def check_deadlines() -> dict[str, int]:
    return services.rounds_check_deadlines()


def _fail_round(round_id: int, exc: Exception) -> None:
    logger.exception("split_aggregation_failed round_id=%s", round_id)
    services.round_mark_aggregation_failed(round_id=round_id, error=f"{type(exc).__name__}: {exc}")


@shared_task(
    name="trainings.aggregate_chunk_statistics",
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=False,
)
def aggregate_chunk_statistics(round_id: int, start: int, stop: int) -> list[float]:
    with aggregation_heartbeat(round_id=round_id, start=False):
        return chunked.chunk_statistics(round_id=round_id, start=start, stop=stop)


@shared_task(name="trainings.aggregate_chunk_finalize", acks_late=True, reject_on_worker_lost=True)
def aggregate_chunk_finalize(
    parts: list[list[float]], round_id: int, chunks: list[list[int]], started: float
) -> None:
    try:
        with aggregation_heartbeat(round_id=round_id, start=False):
            context = chunked.finalize_statistics(round_id=round_id, parts=parts)
            ranges = [(int(a), int(b)) for a, b in chunks]
            chunked.start_combine(round_id=round_id, chunks=ranges, context=context, started=started)
    except Exception as exc:
        _fail_round(round_id, exc)


@shared_task(
    name="trainings.aggregate_chunk_combine", acks_late=True, reject_on_worker_lost=True, ignore_result=False
)
def aggregate_chunk_combine(round_id: int, start: int, stop: int, context: dict | None) -> str:  # type: ignore[type-arg]
    with aggregation_heartbeat(round_id=round_id, start=False):
        return chunked.chunk_combine(round_id=round_id, start=start, stop=stop, context=context)


@shared_task(name="trainings.aggregate_chunk_join", acks_late=True, reject_on_worker_lost=True)
def aggregate_chunk_join(
    blob_names: list[str], round_id: int, chunks: list[list[int]], context: dict | None, started: float
) -> str:  # type: ignore[type-arg]
    try:
        with aggregation_heartbeat(round_id=round_id, start=False):
            ranges = [(int(a), int(b)) for a, b in chunks]
            return chunked.join_chunks(
                round_id=round_id, chunks=ranges, blob_names=blob_names, context=context, started=started
            )
    except Exception as exc:
        _fail_round(round_id, exc)
        return "failed"


@shared_task(name="trainings.aggregate_chunk_failed")
def aggregate_chunk_failed(request: object, exc: Exception, traceback: object, round_id: int) -> None:
    """Errback of a split aggregation's chord: a chunk task failed for good."""
    _fail_round(round_id, exc)
