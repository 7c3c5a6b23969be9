"""Celery tasks: thin wrappers that take ids and call one service. Names are a deployed API."""

from __future__ import annotations

import logging

from celery import shared_task

from trainings import services

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
